#!/usr/bin/env python
"""Pairing (clipit pair) as a SLURM array: one task per pairing directory; see clipit/prepare.py.

    python launchers/pair.py --grid configs/grids/paper_table1.yaml --dry-run
    python launchers/pair.py --config configs/demo-tiny.yaml --local
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clipit.prepare import main_pair  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_pair())
