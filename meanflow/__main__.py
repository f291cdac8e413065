"""`python -m meanflow ...` runs the command line (see meanflow.cli)."""
import sys

from .cli import main

sys.exit(main())
