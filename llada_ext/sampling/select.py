"""Token selection rules that run in PyTorch on the remask kernel's predictions.

The default sampling step is one :func:`llada_ext.remask` call that predicts, scores and selects
in the kernel. The rules here need the whole row of confidences first (the factor rule ranks
them; the EOS rule rewrites some of them; the reference's random remasking draws them from
PyTorch's generator), so the kernel is called with ``num_transfer=0`` for ``x0`` and the
confidences, and the selection below finishes the step. Everything is batched tensor code with
fixed shapes: no host synchronisation, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["factor_count", "select_transfer"]

# below every confidence a strategy produces (minus the entropy is > -log V > -20) and above
# the -inf that marks non-candidates
DEMOTED = -1.0e30


def factor_count(sorted_conf: Tensor, num_candidates: Tensor, factor: float) -> Tensor:
    """Tokens the factor rule of Fast-dLLM decodes in parallel.

    With the candidates' confidences sorted in decreasing order ``c_1 >= c_2 >= ...``, the rule
    keeps the longest prefix with ``c_n >= 1 - factor / (n + 1)`` for every rank ``n`` in it
    (rank 1 always passes): the more tokens are decoded together, the more confident each must
    be, so that the expected number of wrong tokens in the step, about ``(n + 1)(1 - c_n)``,
    stays below ``factor``.

    Parameters
    ----------
    sorted_conf : Tensor
        float32 [B, W], confidences in decreasing order (non-candidates last, -inf).
    num_candidates : Tensor
        int64 [B], candidates per row.
    factor : float
        The rule's factor (> 0); larger decodes more tokens per step.

    Returns
    -------
    Tensor
        int64 [B], at least ``min(1, num_candidates)``.
    """
    width = sorted_conf.shape[1]
    rank = torch.arange(1, width + 1, device=sorted_conf.device, dtype=torch.float64)
    bound = (1.0 - factor / (rank + 1.0)).to(torch.float32)
    ok = sorted_conf >= bound[None, :]
    ok[:, 0] = True
    ok &= rank[None, :] <= num_candidates[:, None]
    return ok.to(torch.int64).cumprod(dim=1).sum(dim=1)


def select_transfer(
    confidence: Tensor,
    num_transfer: Tensor,
    *,
    threshold: float | None = None,
    factor: float | None = None,
) -> Tensor:
    """Which candidates of a window to unmask.

    Parameters
    ----------
    confidence : Tensor
        float32 [B, W]; -inf marks non-candidates.
    num_transfer : Tensor
        int64 [B], the scheduled count ``k``.
    threshold : float, optional
        Also take every candidate with confidence > threshold.
    factor : float, optional
        Also take the factor rule's count (see :func:`factor_count`).

    Returns
    -------
    Tensor
        bool [B, W]: the ``n`` most confident candidates of each row, ties to the lower
        position, where ``n = max(min(k, #candidates), extra)`` and ``extra`` is the count the
        threshold or factor rule asks for (0 without either).
    """
    candidates = confidence > float("-inf")
    num_candidates = candidates.sum(dim=1)
    # a stable descending sort keeps the lower position first among equal confidences
    sorted_conf, order = torch.sort(confidence, dim=1, descending=True, stable=True)
    count = torch.minimum(num_transfer.to(torch.int64), num_candidates)
    if threshold is not None:
        above = (sorted_conf > threshold).sum(dim=1)  # a sorted prefix of the candidates
        count = torch.maximum(count, above)
    if factor is not None:
        count = torch.maximum(count, factor_count(sorted_conf, num_candidates, factor))
    rank = torch.arange(confidence.shape[1], device=confidence.device)
    take_sorted = rank[None, :] < count[:, None]
    return torch.zeros_like(take_sorted).scatter(1, order, take_sorted)
