"""Training objectives of LLaDA: pre-training (Alg. 1) and supervised fine-tuning (Alg. 2).

Both objectives are a weighted cross-entropy over the masked tokens only:

* pre-training: ``t ~ U(0, 1]``, ``p_mask = (1 - eps) * t + eps``, every token masked iid with
  probability ``p_mask``; ``loss = sum_masked CE / p_mask / (B * L)``. With probability 1% the
  batch is first cut to a length drawn uniformly from ``[1, L]`` (``L`` is then the cut length).
* SFT: the prompt is never masked, the answer (EOS padding included) is masked as above;
  ``loss = sum_masked CE / p_mask / answer_len / B``.

The per-token factor goes into the ``weights`` of :func:`llada_ext.linear_masked_cross_entropy`,
which only touches the rows whose weight is non-zero and never materialises the ``[N, V]``
logits. With ``model.backend == "torch"`` the same value is computed the plain way (full logits,
then ``F.cross_entropy`` on the masked rows), which is the reference the kernels are compared to.

Randomness is explicit: every function takes a :class:`MaskNoise` or a ``torch.Generator``. The
trainer draws the noise of each sequence from a generator keyed by ``(seed, sequence index)``,
so the masks do not depend on the batch layout, the number of processes or a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import config_token_id

__all__ = [
    "EPS",
    "MaskNoise",
    "MaskedBatch",
    "MaskedLMObjective",
    "build_pretrain_batch",
    "build_sft_batch",
    "cut_length",
    "draw_noise",
    "keyed_generator",
    "keyed_noise",
    "masked_token_loss",
    "pretrain_loss",
    "sft_loss",
]

#: Smallest masking probability of the forward process (Alg. 1 of the paper).
EPS = 1e-3

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` whose seed is a hash of ``keys``.

    Parameters
    ----------
    *keys : int
        Any non-negative integers, e.g. ``(seed, stream_id, index)``.

    Returns
    -------
    torch.Generator
        A fresh CPU generator; the same keys always give the same stream.
    """
    h = 0x1234_5678
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    # torch seeds must fit a signed 64-bit integer.
    return torch.Generator(device="cpu").manual_seed(h & ((1 << 63) - 1))


@dataclass
class MaskNoise:
    """The random numbers of the forward process for one batch.

    Attributes
    ----------
    t : Tensor
        float32 ``[B]``, the masking time of each sequence, in ``(0, 1]``.
    u : Tensor
        float32 ``[B, L]``, uniforms in ``[0, 1)``; token ``i`` is masked when ``u_i < p_mask``.
    """

    t: Tensor
    u: Tensor

    def to(self, device: torch.device | str) -> MaskNoise:
        """Return the noise moved to ``device``."""
        return MaskNoise(self.t.to(device), self.u.to(device))

    def narrow(self, length: int) -> MaskNoise:
        """Keep the first ``length`` positions (used when a batch is cut short)."""
        return MaskNoise(self.t, self.u[:, :length])


def draw_noise(
    batch_size: int,
    length: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskNoise:
    """Draw ``t ~ U(0, 1]`` per sequence and one uniform per token.

    Parameters
    ----------
    batch_size, length : int
        Shape ``[B, L]`` of the batch.
    generator : torch.Generator, optional
        Source of randomness (its device decides where the numbers are drawn).
    device : torch.device or str, optional
        Where to put the result (defaults to the generator's device).

    Returns
    -------
    MaskNoise
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    # torch.rand is in [0, 1); 1 - rand is in (0, 1], the support Alg. 1 asks for.
    t = 1.0 - torch.rand(batch_size, generator=generator, device=gdev, dtype=torch.float32)
    u = torch.rand(batch_size, length, generator=generator, device=gdev, dtype=torch.float32)
    noise = MaskNoise(t, u)
    return noise.to(device) if device is not None else noise


def keyed_noise(
    keys: Sequence[int], length: int, *, seed: int, device: torch.device | str | None = None
) -> MaskNoise:
    """Noise for a batch whose row ``b`` depends only on ``(seed, keys[b])``.

    The trainer keys each row by the global index of the sequence in the data stream, so a
    sequence gets the same mask whether it is trained alone, in a larger batch, on another rank
    or after a resume.

    Parameters
    ----------
    keys : sequence of int
        One key per row.
    length : int
        Number of positions ``L``.
    seed : int
        Run seed.
    device : torch.device or str, optional
        Where to put the result.

    Returns
    -------
    MaskNoise
    """
    ts, us = [], []
    for k in keys:
        g = keyed_generator(seed, 0x6E6F697365, int(k))  # 0x6E6F697365 = "noise"
        ts.append(1.0 - torch.rand(1, generator=g, dtype=torch.float32))
        us.append(torch.rand(length, generator=g, dtype=torch.float32))
    noise = MaskNoise(torch.cat(ts), torch.stack(us))
    return noise.to(device) if device is not None else noise


def cut_length(length: int, *, prob: float, generator: torch.Generator | None = None) -> int:
    """With probability ``prob`` draw a new length uniformly from ``[1, length]``.

    Parameters
    ----------
    length : int
        Full sequence length ``L``.
    prob : float
        Probability of cutting (0.01 in Alg. 1).
    generator : torch.Generator, optional
        CPU generator; two numbers are always drawn so the stream advances the same way.

    Returns
    -------
    int
        ``length`` or the cut length.
    """
    coin = torch.rand(1, generator=generator).item()
    new_len = int(torch.randint(1, length + 1, (1,), generator=generator).item())
    return new_len if coin < prob else length


@dataclass
class MaskedBatch:
    """A noised batch ready for :func:`masked_token_loss`.

    Attributes
    ----------
    noisy : Tensor
        int64 ``[B, L]``, the input with masked positions replaced by the mask id.
    targets : Tensor
        int64 ``[B, L]``, the clean tokens.
    weights : Tensor
        float32 ``[B, L]``, the loss factor of every token (0 where not masked).
    masked : Tensor
        bool ``[B, L]``, which positions were masked.
    p_mask : Tensor
        float32 ``[B]``, the masking probability of each sequence.
    """

    noisy: Tensor
    targets: Tensor
    weights: Tensor
    masked: Tensor
    p_mask: Tensor


def _check_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be an int64 tensor of shape [B, L]")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")


def _check_noise(noise: MaskNoise, shape: torch.Size) -> None:
    if tuple(noise.u.shape) != tuple(shape) or tuple(noise.t.shape) != (shape[0],):
        raise ValueError(
            f"noise has t {tuple(noise.t.shape)}, u {tuple(noise.u.shape)}; "
            f"expected t [{shape[0]}], u {list(shape)}"
        )


def _draw_mask(input_ids: Tensor, noise: MaskNoise, eps: float) -> tuple[Tensor, Tensor]:
    """Checks the inputs; returns ``p_mask`` ``[B]`` and the drawn mask ``u < p_mask``."""
    _check_ids(input_ids)
    _check_noise(noise, input_ids.shape)
    dev = input_ids.device
    t, u = noise.t.to(dev), noise.u.to(dev)
    p_mask = (1.0 - eps) * t + eps
    return p_mask, u < p_mask[:, None]


def _masked_batch(
    input_ids: Tensor, masked: Tensor, p_mask: Tensor, scale: Tensor, mask_id: int
) -> MaskedBatch:
    """The batch with ``masked`` replaced by ``mask_id`` and weights ``masked * scale`` per row."""
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    weights = (masked.double() * scale[:, None]).float()
    return MaskedBatch(noisy, input_ids, weights, masked, p_mask)


def build_pretrain_batch(
    input_ids: Tensor, *, mask_id: int, noise: MaskNoise, eps: float = EPS
) -> MaskedBatch:
    """Apply the forward process of Alg. 1 and compute the per-token weights.

    Parameters
    ----------
    input_ids : Tensor
        int64 ``[B, L]`` clean tokens (already cut, if the batch was cut).
    mask_id : int
        Id of the mask token.
    noise : MaskNoise
        ``t`` ``[B]`` and ``u`` ``[B, L]``.
    eps : float
        Smallest masking probability.

    Returns
    -------
    MaskedBatch
        With ``weights = masked / (p_mask * B * L)``.
    """
    p_mask, masked = _draw_mask(input_ids, noise, eps)
    B, L = input_ids.shape
    return _masked_batch(input_ids, masked, p_mask, 1.0 / (p_mask.double() * (B * L)), mask_id)


def build_sft_batch(
    input_ids: Tensor,
    prompt_lengths: Tensor,
    *,
    mask_id: int,
    noise: MaskNoise,
    eps: float = EPS,
) -> MaskedBatch:
    """Apply the forward process of Alg. 2 (prompt kept) and compute the per-token weights.

    Parameters
    ----------
    input_ids : Tensor
        int64 ``[B, L]``: prompt, answer, then EOS padding up to ``L``.
    prompt_lengths : Tensor
        int64 ``[B]``, number of prompt tokens of each row.
    mask_id, noise, eps : int, MaskNoise, float
        As for :func:`build_pretrain_batch`.

    Returns
    -------
    MaskedBatch
        With ``weights = masked / (p_mask * answer_len * B)`` where ``answer_len = L - prompt``
        (the EOS padding counts as answer, as in the paper).
    """
    p_mask, drawn = _draw_mask(input_ids, noise, eps)
    B, L = input_ids.shape
    dev = input_ids.device
    prompt_lengths = torch.as_tensor(prompt_lengths, device=dev).long()
    if tuple(prompt_lengths.shape) != (B,):
        raise ValueError(f"prompt_lengths must have shape [{B}], got {tuple(prompt_lengths.shape)}")
    in_prompt = torch.arange(L, device=dev)[None, :] < prompt_lengths[:, None]
    masked = drawn & ~in_prompt
    # A row made only of prompt has no masked token; clamp so its zero weights stay finite.
    answer_len = (L - prompt_lengths).clamp(min=1).double()
    return _masked_batch(
        input_ids, masked, p_mask, 1.0 / (p_mask.double() * answer_len * B), mask_id
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The LLaDA model inside DDP / objective wrappers."""
    while True:
        if isinstance(model, MaskedLMObjective):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP / DataParallel
            model = model.module
        else:
            return model


def masked_token_loss(
    model: nn.Module,
    noisy: Tensor,
    targets: Tensor,
    weights: Tensor,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """``sum_i weights_i * CE(model(noisy)_i, targets_i)`` as a float32 scalar.

    With ``model.backend == "kernels"`` this runs ``model.forward_hidden`` and the fused
    :func:`llada_ext.linear_masked_cross_entropy` on ``model.lm_head.weight`` (no ``[N, V]``
    logits); with ``"torch"`` it computes full logits and ``F.cross_entropy`` on the rows whose
    weight is non-zero.

    Parameters
    ----------
    model : nn.Module
        A :class:`llada_ext.LLaDAModel`.
    noisy : Tensor
        int64 ``[B, L]`` model input.
    targets : Tensor
        int64 ``[B, L]`` clean tokens.
    weights : Tensor
        float32 ``[B, L]`` per-token loss factors.
    attention_mask : Tensor, optional
        ``[B, L]``, 1 for real tokens, 0 for padding.

    Returns
    -------
    Tensor
        float32 scalar, differentiable w.r.t. the model parameters.
    """
    backend = getattr(model, "backend", "kernels")
    if backend == "torch":
        logits = model(noisy, attention_mask=attention_mask).logits
        sel = weights != 0
        ce = F.cross_entropy(logits[sel].float(), targets[sel], reduction="none")
        return (ce * weights[sel].float()).sum()
    import llada_ext  # late import: the ops module imports the compiled extension

    hidden = model.forward_hidden(noisy, attention_mask=attention_mask)
    weight = model.lm_head.weight
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Custom ops are outside autocast's reach; cast as autocast would for a matmul.
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return llada_ext.linear_masked_cross_entropy(
        hidden, weight, targets, weights.float().contiguous(), reduction="sum"
    )


class MaskedLMObjective(nn.Module):
    """``nn.Module`` form of :func:`masked_token_loss`.

    DistributedDataParallel and FSDP only synchronise gradients for work done inside the
    wrapped module's ``forward``; the fused loss needs ``forward_hidden`` and the LM-head weight,
    so the whole objective is the module that gets wrapped.

    Parameters
    ----------
    model : nn.Module
        The LLaDA model (registered as a submodule, so ``state_dict`` keys gain ``model.``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        noisy: Tensor,
        targets: Tensor,
        weights: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Return the weighted masked cross-entropy (see :func:`masked_token_loss`)."""
        return masked_token_loss(self.model, noisy, targets, weights, attention_mask)


def _mask_id(model: nn.Module, mask_id: int | None) -> int:
    cfg = getattr(_unwrap(model), "config", None)
    return int(config_token_id(cfg, "mask_token_id", mask_id, "mask_id", "the masked loss"))


def pretrain_loss(
    model: nn.Module,
    input_ids: Tensor,
    *,
    mask_id: int | None = None,
    eps: float = EPS,
    random_length_prob: float = 0.01,
    generator: torch.Generator | None = None,
    noise: MaskNoise | None = None,
) -> Tensor:
    """Pre-training loss of Alg. 1 for one batch.

    Parameters
    ----------
    model : nn.Module
        A :class:`llada_ext.LLaDAModel` (its ``backend`` selects kernels or plain torch).
    input_ids : Tensor
        int64 ``[B, L]`` clean tokens.
    mask_id : int, optional
        Mask token id (defaults to ``model.config.mask_token_id``).
    eps : float
        Smallest masking probability.
    random_length_prob : float
        Probability of cutting the batch to a length drawn from ``[1, L]`` (1% in the paper).
    generator : torch.Generator, optional
        CPU generator for the cut decision and, when ``noise`` is None, for the noise.
    noise : MaskNoise, optional
        Explicit noise of shape ``[B, L]`` (cut along with the batch).

    Returns
    -------
    Tensor
        float32 scalar ``sum_masked CE / p_mask / (B * L)``.
    """
    _check_ids(input_ids)
    B, L = input_ids.shape
    new_len = cut_length(L, prob=random_length_prob, generator=generator)
    if noise is None:
        noise = draw_noise(B, L, generator=generator)
    _check_noise(noise, input_ids.shape)
    batch = build_pretrain_batch(
        input_ids[:, :new_len],
        mask_id=_mask_id(model, mask_id),
        noise=noise.narrow(new_len),
        eps=eps,
    )
    return masked_token_loss(model, batch.noisy, batch.targets, batch.weights)


def sft_loss(
    model: nn.Module,
    input_ids: Tensor,
    prompt_lengths: Tensor,
    *,
    mask_id: int | None = None,
    eps: float = EPS,
    generator: torch.Generator | None = None,
    noise: MaskNoise | None = None,
) -> Tensor:
    """SFT loss of Alg. 2 for one batch.

    Parameters
    ----------
    model : nn.Module
        A :class:`llada_ext.LLaDAModel`.
    input_ids : Tensor
        int64 ``[B, L]``: prompt, answer and EOS padding.
    prompt_lengths : Tensor
        int64 ``[B]`` prompt length of each row.
    mask_id : int, optional
        Mask token id (defaults to ``model.config.mask_token_id``).
    eps : float
        Smallest masking probability.
    generator : torch.Generator, optional
        Generator for the noise when ``noise`` is None.
    noise : MaskNoise, optional
        Explicit noise of shape ``[B, L]``.

    Returns
    -------
    Tensor
        float32 scalar ``sum_masked CE / p_mask / answer_len / B``.
    """
    _check_ids(input_ids)
    B, L = input_ids.shape
    if noise is None:
        noise = draw_noise(B, L, generator=generator)
    batch = build_sft_batch(
        input_ids, prompt_lengths, mask_id=_mask_id(model, mask_id), noise=noise, eps=eps
    )
    return masked_token_loss(model, batch.noisy, batch.targets, batch.weights)
