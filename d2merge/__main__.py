"""`python -m d2merge` runs the command line, for environments where the script is not on PATH."""

import sys

from d2merge.cli.app import run

sys.exit(run())
