"""LLaDA sampling: the reverse process (Alg. 4), its speed options and answer decoding.

:func:`generate` is the sampler (see :mod:`llada_ext.sampling.core` for every option);
:class:`SamplerGraphs` keeps its CUDA graphs between calls; :func:`decode_answers` and
:func:`truncate_at_eos` turn its output into answers.
"""

from .core import (
    CACHE_MODES,
    REMASKING,
    check_schedule,
    generate,
    get_num_transfer_tokens,
    left_pad,
)
from .decode import decode_answers, render_canvas, truncate_at_eos
from .graphs import SamplerGraphs
from .select import factor_count, select_transfer

__all__ = [
    "CACHE_MODES",
    "REMASKING",
    "SamplerGraphs",
    "check_schedule",
    "decode_answers",
    "factor_count",
    "generate",
    "get_num_transfer_tokens",
    "left_pad",
    "render_canvas",
    "select_transfer",
    "truncate_at_eos",
]
