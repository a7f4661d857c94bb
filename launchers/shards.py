#!/usr/bin/env python
"""Shard building (clipit shard --part I --num-parts N, then --finalize) as SLURM arrays; see clipit/prepare.py.

    python launchers/shards.py --grid configs/grids/paper_table1.yaml --dry-run
    python launchers/shards.py --config configs/demo-tiny.yaml --local
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clipit.prepare import main_shards  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_shards())
