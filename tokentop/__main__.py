"""``python -m tokentop``: the ``tokentop`` command."""

import sys

from tokentop.tui.cli import main

sys.exit(main())
