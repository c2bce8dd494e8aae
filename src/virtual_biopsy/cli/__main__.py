"""``python -m virtual_biopsy.cli`` is ``vbiopsy``."""
import sys

from virtual_biopsy.cli.main import main

sys.exit(main())
