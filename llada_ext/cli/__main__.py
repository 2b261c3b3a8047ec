"""``python -m llada_ext.cli`` (and ``torchrun -m llada_ext.cli``): the command line."""

import sys

from . import main

sys.exit(main())
