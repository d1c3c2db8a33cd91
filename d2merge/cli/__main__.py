"""`python -m d2merge.cli`: the command line, as the `d2merge` script runs it."""

import sys

from d2merge.cli.app import run

sys.exit(run())
