"""``lx.remask`` / ``lx.remask_``: one parallel confidence-remasking step as torch ops."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _C
from .._views import opt_view, stream_of, view
from ._common import (
    _INT_DTYPES,
    _LOGIT_DTYPES,
    REMASK_STRATEGIES,
    _dtype_in,
    _eager,
    _finite,
    _has_internal_overlap,
    _inner_contiguous,
    _same_device,
    _tensor,
)

# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llada_ext::remask", mutates_args=())
def _remask(
    logits: Tensor,
    x: Tensor,
    num_transfer: Tensor,
    uncond_logits: Optional[Tensor],
    mask_id: int,
    offset: int,
    strategy: int,
    temperature: float,
    has_threshold: bool,
    threshold: float,
    cfg_scale: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x0, conf = _remask_into(
        logits,
        x,
        x_out,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        strategy,
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )
    return x_out, x0, conf


@_remask.register_fake
def _(
    logits,
    x,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty((B, W)),
        logits.new_empty((B, W), dtype=torch.float32),
    )


@torch.library.custom_op("llada_ext::remask_", mutates_args=("x",))
def _remask_inplace(
    logits: Tensor,
    x: Tensor,
    num_transfer: Tensor,
    uncond_logits: Optional[Tensor],
    mask_id: int,
    offset: int,
    strategy: int,
    temperature: float,
    has_threshold: bool,
    threshold: float,
    cfg_scale: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    return _remask_into(
        logits,
        x,
        x,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        strategy,
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )


@_remask_inplace.register_fake
def _(
    logits,
    x,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    return x.new_empty((B, W)), logits.new_empty((B, W), dtype=torch.float32)


def _remask_into(
    logits,
    x,
    x_out,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    x0 = torch.empty((B, W), dtype=torch.int64, device=x.device)
    conf = torch.empty((B, W), dtype=torch.float32, device=x.device)
    ws_bytes = _C.remask_workspace_size(view(logits), view(x))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    _C.remask(
        view(logits),
        opt_view(uncond_logits),
        view(x),
        view(num_transfer),
        mask_id,
        offset,
        strategy,
        has_threshold,
        threshold,
        temperature,
        cfg_scale,
        seed & ((1 << 64) - 1),
        view(x_out),
        view(x0),
        view(conf),
        ws.data_ptr() if ws is not None else 0,
        ws_bytes,
        stream_of(x),
    )
    return x0, conf


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """A 62-bit Philox seed for one remask call.

    CPU generators (and the default generator when ``generator`` is None) give their next
    ``randint``. A CUDA generator gives the same sequence as a CPU generator with the same
    ``manual_seed``: its n-th call here returns the CPU stream's n-th draw (the count is kept
    in the CUDA generator's offset), so the same seed selects the same tokens on either device.
    """
    high = 1 << 62
    if generator is None:
        return int(torch.randint(0, high, (1,)).item())
    if generator.device.type == "cpu":
        return int(torch.randint(0, high, (1,), generator=generator).item())
    offset = generator.get_offset()
    n = offset // 4
    replay = torch.Generator().manual_seed(generator.initial_seed())
    seed = int(torch.randint(0, high, (n + 1,), generator=replay)[-1].item())
    generator.set_offset(offset + 4)
    return seed


def _remask_args(
    logits,
    x,
    num_transfer,
    mask_id,
    offset,
    strategy,
    temperature,
    threshold,
    generator,
    uncond_logits,
    cfg_scale,
):
    logits = _tensor(logits, "logits")
    x = _tensor(x, "x")
    if logits.dim() != 3:
        raise ValueError(
            f"logits: expected 3 dimensions [B, W, V], got shape {tuple(logits.shape)}"
        )
    _dtype_in(logits, "logits", _LOGIT_DTYPES[logits.device.type], "device")
    B, W, V = logits.shape
    if V == 0:
        raise ValueError("logits: the vocabulary dimension must be > 0")
    _same_device(x, "x", logits, "logits")
    if x.dtype != torch.int64:
        raise TypeError(f"x: expected dtype int64, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] != B:
        raise ValueError(f"x: expected shape [{B}, L], got {tuple(x.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    if offset < 0 or offset + W > x.shape[1]:
        raise ValueError(
            f"offset: the window [{offset}, {offset + W}) does not fit in x of length {x.shape[1]}"
        )
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    if not -(2**63) <= mask_id < 2**63:
        raise ValueError(f"mask_id: {mask_id} is not an int64 token id")
    if not isinstance(strategy, str) or strategy not in REMASK_STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(REMASK_STRATEGIES)}, got {strategy!r}")
    temperature = _finite(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    has_threshold = threshold is not None
    threshold = _finite(threshold, "threshold") if has_threshold else 0.0
    cfg_scale = _finite(cfg_scale, "cfg_scale")
    if uncond_logits is not None:
        uncond_logits = _tensor(uncond_logits, "uncond_logits")
        _same_device(uncond_logits, "uncond_logits", logits, "logits")
        if uncond_logits.shape != logits.shape or uncond_logits.dtype != logits.dtype:
            raise ValueError(
                f"uncond_logits: expected shape {tuple(logits.shape)} and dtype "
                f"{logits.dtype}, got {tuple(uncond_logits.shape)} "
                f"{uncond_logits.dtype}"
            )
        uncond_logits = _inner_contiguous(uncond_logits)
    if isinstance(num_transfer, Tensor):
        _same_device(num_transfer, "num_transfer", logits, "logits")
        if num_transfer.dtype not in _INT_DTYPES:
            raise TypeError(f"num_transfer: expected an integer tensor, got {num_transfer.dtype}")
        if num_transfer.dim() == 0:
            num_transfer = num_transfer.expand(B)
        if tuple(num_transfer.shape) != (B,):
            raise ValueError(f"num_transfer: expected shape [{B}], got {tuple(num_transfer.shape)}")
        num_transfer = num_transfer.to(torch.int64)
        if _eager(num_transfer) and B > 0 and bool((num_transfer < 0).any()):
            raise ValueError("num_transfer: values must be >= 0")
    elif isinstance(num_transfer, int) and not isinstance(num_transfer, bool):
        if num_transfer < 0:
            raise ValueError(f"num_transfer: must be >= 0, got {num_transfer}")
        # More than W means every candidate (a row has at most W): any int is accepted.
        num_transfer = torch.full(
            (B,), min(num_transfer, W), dtype=torch.int64, device=logits.device
        )
    else:
        raise TypeError(
            f"num_transfer: expected an int or an integer tensor [B], "
            f"got {type(num_transfer).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    needs_random = temperature > 0 or strategy == "random"
    seed = _draw_seed(generator) if needs_random else 0
    return (
        _inner_contiguous(logits),
        x,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        REMASK_STRATEGIES[strategy],
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )


def remask(
    logits: Tensor,
    x: Tensor,
    num_transfer: Union[int, Tensor],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    uncond_logits: Optional[Tensor] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One parallel decoding step: predict every masked token of a window, keep the most
    confident, leave the rest masked.

    Parameters
    ----------
    logits : Tensor
        ``[B, W, V]`` predictions for ``x[:, offset:offset + W]`` (float32, bfloat16, float16).
    x : Tensor
        int64 ``[B, L]`` current sequence; positions equal to ``mask_id`` in the window are the
        candidates. Not modified.
    num_transfer : int or Tensor
        Tokens to unmask per row (int, or integer tensor ``[B]``); at most the row's
        candidates are unmasked, so any int >= W (however large) means all of them.
    mask_id : int
        The mask token id: any int64 token id of x. It need not be a class of the logits
        (e.g. ``mask_id == V`` when the model never predicts it).
    offset : int
        Start of the window in x.
    strategy : {"low_confidence", "random", "margin", "entropy"}
        Confidence: softmax probability of the prediction (untempered), a uniform draw, top-1
        minus top-2 probability, or minus the entropy.
    temperature : float
        0: argmax (ties -> lowest id); > 0: Gumbel-argmax of ``l / temperature`` with Gumbel
        noise from double-precision Philox uniforms.
    threshold : float, optional
        If given, unmask every candidate with confidence > threshold and at least
        ``min(k, #candidates)`` of the most confident.
    generator : torch.Generator, optional
        Source of the Philox seed (see ``_draw_seed``); the default generator if None. Not
        consumed when the step is deterministic (temperature 0, strategy not "random").
    uncond_logits : Tensor, optional
        Unconditional logits for classifier-free guidance:
        ``l = uncond + (cfg_scale + 1) * (logits - uncond)``.
    cfg_scale : float
        Guidance scale, used with uncond_logits.
    return_details : bool
        Also return ``x0`` int64 ``[B, W]`` (the predictions; x where not a candidate) and
        ``confidence`` float32 ``[B, W]`` (-inf at non-candidates).

    Returns
    -------
    Tensor or (Tensor, Tensor, Tensor)
        The new x (a new tensor), and the details when asked.
    """
    args = _remask_args(
        logits,
        x,
        num_transfer,
        mask_id,
        offset,
        strategy,
        temperature,
        threshold,
        generator,
        uncond_logits,
        cfg_scale,
    )
    x_new, x0, conf = _remask(*args)
    return (x_new, x0, conf) if return_details else x_new


def remask_(
    logits: Tensor,
    x: Tensor,
    num_transfer: Union[int, Tensor],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    uncond_logits: Optional[Tensor] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """In-place twin of :func:`remask`: updates and returns ``x`` itself.

    ``x`` must own its elements: rows that share memory (``expand``, zero strides) raise a
    ValueError naming ``x``, as torch does for in-place ops on expanded tensors.
    """
    if isinstance(x, Tensor) and x.dim() == 2 and _has_internal_overlap(x):
        raise ValueError(
            "x: several of its elements share memory (e.g. an expanded tensor), so an in-place "
            "update would change them all; pass x.clone() or x.contiguous()"
        )
    args = _remask_args(
        logits,
        x,
        num_transfer,
        mask_id,
        offset,
        strategy,
        temperature,
        threshold,
        generator,
        uncond_logits,
        cfg_scale,
    )
    x0, conf = _remask_inplace(*args)
    return (x, x0, conf) if return_details else x
