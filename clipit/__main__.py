"""`python -m clipit ...` is the `clipit` command."""

import sys

from clipit.cli import main

sys.exit(main())
