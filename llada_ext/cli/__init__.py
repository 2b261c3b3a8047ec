"""The ``llada-ext`` command line: train, fine-tune, sample, score, benchmark, demo.

Every sub-command has ``--help``. User errors (missing files, bad settings, out of memory)
print one plain line and exit with status 1 (2 for bad command-line syntax); set
``LLADA_DEBUG=1`` or pass ``--debug`` to get the full traceback instead.

One module per sub-command (:mod:`.train` for ``train`` / ``sft``, :mod:`.prepare`,
:mod:`.sample`, :mod:`.loglik`, :mod:`.bench`, :mod:`.demo`; ``export`` lives in
:mod:`llada_ext.training.cli_support`), the option groups several of them share in
:mod:`.options`, the shared helpers in :mod:`.common`, and the parser and :func:`main` in
:mod:`.app`.
"""

from __future__ import annotations

from .app import build_parser, main
from .common import SMALL_MODEL_WIDTH as SMALL_MODEL_WIDTH
from .common import CLIError as CLIError
from .common import apply_threads as apply_threads
from .options import MAX_TOKENS as MAX_TOKENS
from .sample import _chat_enabled as _chat_enabled

__all__ = ["build_parser", "main"]
