"""`python -m compress ...`: the same command line as the `compress` script."""

import sys

from compress.cli import main

sys.exit(main())
