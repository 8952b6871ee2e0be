"""`python -m tbn_runtime` runs tbn-run."""

import sys

from .cli import main

sys.exit(main())
