"""``python -m mtrank``: the ``mtrank`` command (torchrun starts training processes this way)."""

import sys

from mtrank.cli import main

sys.exit(main())
