"""``python -m vlq.cli ARGS``: the same as the ``vlq`` command."""

import sys

from . import main

sys.exit(main())
