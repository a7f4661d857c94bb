#!/usr/bin/env python
"""Submit a grid of CLIP-IT runs (configs/grids/*.yaml) as SLURM job arrays: `clipit grid` as a script.

python launchers/grid.py --config configs/grids/paper_table1.yaml --dry-run
python launchers/grid.py --config configs/grids/paper_table1.yaml --profile mycluster
python launchers/grid.py --config configs/grids/demo.yaml --local
"""

import sys

from clipit.cli import main

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
