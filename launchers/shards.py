#!/usr/bin/env python
"""Shard building as SLURM arrays (parts, then --finalize per shard dir): `clipit prepare shards` as a script.

python launchers/shards.py --grid configs/grids/paper_table1.yaml --dry-run
python launchers/shards.py --config configs/demo-tiny.yaml --local
"""

import sys

from clipit.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "shards", *sys.argv[1:]]))
