"""``python -m llada_ext``: the ``llada-ext`` command line."""

from .cli import main

raise SystemExit(main())
