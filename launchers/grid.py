#!/usr/bin/env python
"""Submit a grid of CLIP-IT runs (configs/grids/*.yaml) as SLURM job arrays; see clipit/launch.py.

    python launchers/grid.py --config configs/grids/paper_table1.yaml --dry-run
    python launchers/grid.py --config configs/grids/paper_table1.yaml --profile mycluster
    python launchers/grid.py --config configs/grids/demo.yaml --local
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clipit.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
