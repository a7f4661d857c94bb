#!/usr/bin/env python
"""Pairing as a SLURM array, one task per pairing directory: `clipit prepare pair` as a script.

python launchers/pair.py --grid configs/grids/paper_table1.yaml --dry-run
python launchers/pair.py --config configs/demo-tiny.yaml --local
"""

import sys

from clipit.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "pair", *sys.argv[1:]]))
