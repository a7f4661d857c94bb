"""`python -m clipit ...` is the `clipit` command."""

import sys

from clipit.cli import main

if __name__ == "__main__":  # importing the module (a package walk, a docs tool) does not run the CLI
    sys.exit(main())
