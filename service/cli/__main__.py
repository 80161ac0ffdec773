"""``python -m service.cli``: the ``pacs-annotate`` command."""

import sys

from . import main

sys.exit(main())
