"""Conditional log-likelihood of an answer under LLaDA (Alg. 3 of the paper).

For a prompt ``p`` and an answer ``r`` of length ``L`` the masked-diffusion bound is::

    -log p(r | p) <= E_{l ~ U{1..L}} E_{S ~ uniform l-subset of r} [ L / l * sum_{i in S}
                                                                     -log p(r_i | p, r_S masked) ]

It is estimated by Monte Carlo over ``mc_num`` draws of ``(l, S)``. As in the public
``get_log_likelihood.py``, the draws of one mini-batch are stratified: one uniform ``k`` per
batch, row ``j`` masks ``l_j = ((k - 1 + round(j * L / batch_size)) mod L) + 1`` tokens, and
every row's set of masked tokens is an independent uniform subset of that size; the prompt is
never masked. The row offsets are computed in integer arithmetic (ties round up) so every
row's ``l_j`` is exactly uniform on ``{1..L}`` and the estimator unbiased (the reference's
float ``linspace`` with round-half-to-even skews rows whose ``j * L / batch_size`` ends in .5).

The cross-entropy is :func:`llada_ext.linear_masked_cross_entropy` on the final hidden states
with weight ``L / l`` on masked answer tokens and 0 elsewhere, so the ``[B, T, V]`` logits are
never materialised. Classifier-free guidance is linear in the logits, hence in the hidden
states: ``u + (cfg + 1)(c - u) = ((cfg + 1) h_c - cfg h_u) W^T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .model import config_token_id, model_device, warn_if_too_long
from .sampling.options import integer_ids, positive_int

__all__ = ["log_likelihood", "score_choices", "stratified_mask"]


def stratified_mask(
    answer_len: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One mini-batch of stratified masking draws over an answer.

    Parameters
    ----------
    answer_len : int
        Answer length ``L``.
    batch_size : int
        Rows.
    generator : torch.Generator, optional
        Source of randomness (its device is where the draws happen).

    Returns
    -------
    is_mask : Tensor
        bool [batch_size, L], exactly ``l_j`` True entries in row j, at uniformly random places.
    num_masked : Tensor
        int64 [batch_size], the ``l_j``.

    Notes
    -----
    Consumes the generator as ``randint`` (one draw) then one ``randperm(L)`` per row, in
    that order.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    k = int(torch.randint(1, answer_len + 1, (), generator=generator, device=dev))
    j = torch.arange(batch_size, dtype=torch.int64)
    offsets = (2 * j * answer_len + batch_size) // (2 * batch_size)  # round(j L / b), ties up
    num_masked = (k - 1 + offsets) % answer_len + 1
    base = torch.arange(answer_len, device=dev)
    rows = []
    for b in range(batch_size):
        perm = torch.randperm(answer_len, generator=generator, device=dev)
        rows.append((base < int(num_masked[b]))[perm])
    return torch.stack(rows), num_masked


def _as_1d_ids(t: object, name: str) -> Tensor:
    t = integer_ids(t, name, "[n] or a list of ints")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n] (or [1, n]), got shape {tuple(t.shape)}")
    return t.to(torch.int64)


@torch.no_grad()
def log_likelihood(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    answer_ids: Tensor,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    *,
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Monte Carlo estimate of ``log p(answer | prompt)`` (Alg. 3).

    Returns the log-likelihood, i.e. the *negative* of the estimated loss
    ``mean_mc [ L / l * sum_{masked} CE ]``, so larger is more likely (an estimate of a lower
    bound of the true log-likelihood).

    Parameters
    ----------
    model : LLaDAModel
        Mask predictor (uses ``forward_hidden`` and ``lm_head``).
    prompt_ids : Tensor
        int64 [P] prompt (may be empty); never masked.
    answer_ids : Tensor
        int64 [L] answer, L >= 1.
    mc_num : int
        Monte Carlo samples; a multiple of ``batch_size``.
    batch_size : int
        Samples per forward pass.
    cfg_scale : float
        Classifier-free guidance scale (0 = off); the unconditional pass masks the prompt.
    mask_id : int, optional
        Default ``model.config.mask_token_id``.
    generator : torch.Generator, optional
        Randomness of the masking draws (CPU by default); same seed, same estimate.

    Returns
    -------
    float
        The estimated log-likelihood.
    """
    _check_estimator(mc_num, batch_size, cfg_scale)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    prompt = _as_1d_ids(prompt_ids, "prompt_ids")
    answer = _as_1d_ids(answer_ids, "answer_ids")
    if answer.numel() == 0:
        raise ValueError("answer_ids must hold at least one token")
    warn_if_too_long(model, prompt.numel() + answer.numel(), "prompt + answer")
    mask_id = config_token_id(
        getattr(model, "config", None), "mask_token_id", mask_id, "mask_id", "the likelihood"
    )

    device = model_device(model)
    plen = prompt.numel()
    seq = torch.cat([prompt, answer]).to(device)[None].expand(batch_size, -1).contiguous()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(mc_num // batch_size):
        inp, weights = _noisy_batch(seq, plen, mask_id, cfg_scale, generator)
        loss = _masked_loss(model, inp, seq, weights, cfg_scale)
        total += loss.double() / batch_size
    return -float(total) / (mc_num // batch_size)


def _check_estimator(mc_num: object, batch_size: object, cfg_scale: object) -> None:
    """The Monte Carlo settings of :func:`log_likelihood`; ValueError naming a bad one."""
    positive_int(mc_num, "mc_num")
    positive_int(batch_size, "batch_size")
    if mc_num % batch_size != 0:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
    if (
        isinstance(cfg_scale, bool)
        or not isinstance(cfg_scale, (int, float))
        or not cfg_scale >= 0
        or cfg_scale == float("inf")
    ):
        raise ValueError(f"cfg_scale must be a finite float >= 0, got {cfg_scale!r}")


def _noisy_batch(
    seq: Tensor, plen: int, mask_id: int, cfg_scale: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """One mini-batch of masked copies of ``seq`` [B, P + L] and their CE weights.

    Returns the model input (the unconditional rows, prompt masked too, appended when
    ``cfg_scale > 0``) and float32 weights [B, P + L]: ``L / l_j`` on row j's masked answer
    tokens, 0 elsewhere.
    """
    batch_size, device = seq.shape[0], seq.device
    alen = seq.shape[1] - plen
    is_mask, num_masked = stratified_mask(alen, batch_size, generator)
    is_mask, num_masked = is_mask.to(device), num_masked.to(device)
    noisy = seq.clone()
    noisy[:, plen:] = torch.where(is_mask, mask_id, seq[:, plen:])
    weights = torch.zeros(batch_size, plen + alen, dtype=torch.float32, device=device)
    weights[:, plen:] = is_mask * (alen / num_masked.to(torch.float32))[:, None]
    if cfg_scale > 0:
        uncond = noisy.clone()
        uncond[:, :plen] = mask_id
        return torch.cat([noisy, uncond], dim=0), weights
    return noisy, weights


def _masked_loss(
    model: torch.nn.Module, inp: Tensor, seq: Tensor, weights: Tensor, cfg_scale: float
) -> Tensor:
    """Sum of the weighted CE of ``seq`` under the model's predictions for ``inp`` (with the
    unconditional half after the conditional one when ``cfg_scale > 0``)."""
    from llada_ext.ops import linear_masked_cross_entropy, masked_cross_entropy

    b = seq.shape[0]
    if hasattr(model, "forward_hidden") and hasattr(model, "lm_head"):
        # LLaDAModel: the fused LM head, the [B, L, V] logits never exist
        out, weight = model.forward_hidden(inp), model.lm_head.weight
    else:  # any model whose call returns .logits (e.g. the Hugging Face LLaDA model)
        out, weight = model(inp).logits, None
    dtype = out.dtype
    if cfg_scale > 0:  # guidance is linear: mixing hidden states mixes the logits
        out = (cfg_scale + 1) * out[:b].float() - cfg_scale * out[b:].float()
    # the kernels cover float32/bfloat16/float16; a float64 model runs them in float32
    dtype = torch.float32 if dtype == torch.float64 else dtype
    if weight is None:
        return masked_cross_entropy(out.to(dtype), seq, weights, reduction="sum")
    return linear_masked_cross_entropy(
        out.to(dtype), weight.to(dtype), seq, weights, reduction="sum"
    )


def score_choices(
    model: torch.nn.Module,
    context: Tensor | Sequence[int],
    choices: Sequence[Tensor | Sequence[int]],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
    normalize: bool = False,
) -> list[float]:
    """Score the answers of a multiple-choice question by their log-likelihood (Alg. 3).

    Each choice is scored with :func:`log_likelihood` given the same context, and every one
    from the same generator state (common random numbers): choices of equal length see
    identical mask patterns, so the difference of their scores, which decides the ranking,
    has far less variance than independent estimates would have. Each score is still an
    unbiased estimate of its own bound.

    Parameters
    ----------
    model, mc_num, batch_size, cfg_scale, mask_id
        As for :func:`log_likelihood` (``mc_num`` samples per choice; the unconditional pass
        of guidance masks the context).
    context : Tensor or list of int
        int64 [P] context (question / prompt, may be empty); never masked.
    choices : list of (Tensor or list of int)
        The candidate answers, each int64 [L_i] with ``L_i >= 1``.
    generator : torch.Generator, optional
        Randomness of the masking draws: ``score_choices(..., generator=g)[i]`` equals
        ``log_likelihood(model, context, choices[i], ..., generator=g')`` for a ``g'`` in the
        state ``g`` has on entry (e.g. the same seed). On return ``g`` is where scoring the
        last choice left it, so the next call draws afresh. Default: a generator seeded from
        torch's global random number generator (the choices still share their draws).
    normalize : bool
        Divide each log-likelihood by its choice's length in tokens (a per-token score that
        does not favour short answers).

    Returns
    -------
    list of float
        One score per choice, in order; larger is more likely.

    Raises
    ------
    ValueError
        ``choices`` is empty or one of them has no token, or a bad ``mc_num`` /
        ``batch_size`` / ``cfg_scale``.
    TypeError
        ``context`` or a choice is not a sequence of token ids.
    """
    ctx, answers, generator = _choice_arguments(context, choices, generator)
    state = generator.get_state()
    scores = []
    for answer in answers:
        generator.set_state(state)
        ll = log_likelihood(
            model, ctx, answer, mc_num, batch_size, cfg_scale, mask_id=mask_id, generator=generator
        )
        scores.append(ll / answer.numel() if normalize else ll)
    return scores


def _choice_arguments(
    context: object, choices: object, generator: torch.Generator | None
) -> tuple[Tensor, list[Tensor], torch.Generator]:
    """The context [P] and every choice [L_i] of :func:`score_choices` as int64 tensors, and
    the generator to score them with (a freshly seeded one when ``generator`` is None)."""
    if isinstance(choices, (str, bytes, Tensor)) or not isinstance(choices, Sequence):
        raise TypeError(
            "choices must be a list of token id sequences (tensors [L] or lists of ints), "
            f"got {type(choices).__name__}"
        )
    if len(choices) == 0:
        raise ValueError("choices must hold at least one choice, got an empty list")
    ctx = _as_1d_ids(context, "context")
    answers = [_as_1d_ids(c, f"choices[{i}]") for i, c in enumerate(choices)]
    for i, a in enumerate(answers):
        if a.numel() == 0:
            raise ValueError(f"choices[{i}] is empty: every choice needs at least one token")
    if generator is None:
        seed = int(torch.randint(0, 2**62, ()))
        generator = torch.Generator().manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return ctx, answers, generator
