"""Build WebDataset shards on a compute node: `clipit shard build` as a script, for SLURM arrays.

    python shards/build.py --config CFG [--set KEY=VALUE ...]                 # everything (pairs first if needed)
    python shards/build.py --config CFG --part I --num-parts N                # part I of N (pairs must exist)
    python shards/build.py --config CFG --finalize                            # only the manifest

Part I writes every N-th shard of the fixed (split, index) order and exits; the part that finds all
shards present writes the manifest. Reruns skip finished shards; output is byte-identical.
Exit status 2 with one line on stderr for errors users can fix (bad config, corrupt image, ...).
"""

import sys

from clipit.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "build", *sys.argv[1:]]))
