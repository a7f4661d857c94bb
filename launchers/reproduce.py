#!/usr/bin/env python
"""Table 1 as one command: doctor, pairing and shards, the grid(s), the report. `clipit reproduce` as a script.

python launchers/reproduce.py --grid configs/grids/paper_table1.yaml --dry-run
python launchers/reproduce.py --grid configs/grids/paper_table1.yaml --profile mycluster
python launchers/reproduce.py --grid configs/grids/demo_methods.yaml --local
"""

import sys

from clipit.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
