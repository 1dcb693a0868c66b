"""``python -m twotower_rt ...``: the same CLI as the ``twotower-rt`` command."""

import sys

from .cli import main

sys.exit(main())
