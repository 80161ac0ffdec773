"""``python -m service``: the ``pacs-annotate`` command."""

import sys

from .cli import main

sys.exit(main())
