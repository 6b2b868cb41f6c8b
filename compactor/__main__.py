"""``python -m compactor``: the ``compactor`` command."""

import sys

from .cli import main

sys.exit(main())
