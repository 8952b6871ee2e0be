"""python -m tbn_export: the tbn-export command."""

import sys

from .cli import main

sys.exit(main())
