"""``python -m stepvideo_core``: see :mod:`stepvideo_core.cli`."""

import sys

from .cli import main

sys.exit(main())
