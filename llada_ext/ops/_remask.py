"""``lx.remask`` / ``lx.remask_``: one parallel confidence-remasking step as torch ops."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _C
from .._views import opt_view, stream_of, view
from . import _checks as checks
from ._checks import RemaskScalars, meta
from ._common import _eager, _has_internal_overlap, _inner_contiguous, _tensor, _workspace

# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------

# The arguments of both remask ops: the arrays, the fields of RemaskScalars, the Philox seed.
# remask_ writes x in place (the alias annotation "(a!)").
_REMASK_ARGS = (
    "Tensor logits, Tensor{x_alias} x, Tensor num_transfer, Tensor? uncond_logits, "
    "int mask_id, int offset, int strategy, float temperature, bool has_threshold, "
    "float threshold, float cfg_scale, int seed"
)


def _remask_into(
    logits: Tensor,
    x: Tensor,
    x_out: Tensor,
    num_transfer: Tensor,
    uncond_logits: Optional[Tensor],
    *params: object,
) -> tuple[Tensor, Tensor]:
    """Runs the kernel, writing the new sequence into ``x_out`` (which may be ``x``);
    ``params`` are the fields of :class:`RemaskScalars` and the seed. Returns (x0, conf)."""
    *scalars, seed = params
    B, W = logits.shape[0], logits.shape[1]
    x0 = torch.empty((B, W), dtype=torch.int64, device=x.device)
    conf = torch.empty((B, W), dtype=torch.float32, device=x.device)
    ws_bytes = _C.remask_workspace_size(view(logits), view(x))
    ws, ws_ptr = _workspace(ws_bytes, x.device)
    _C.remask(
        view(logits),
        opt_view(uncond_logits),
        view(x),
        view(num_transfer),
        *RemaskScalars(*scalars).c_args(seed),
        view(x_out),
        view(x0),
        view(conf),
        ws_ptr,
        ws_bytes,
        stream_of(x),
    )
    return x0, conf


def _remask_new_x(logits: Tensor, x: Tensor, *args: object) -> tuple[Tensor, Tensor, Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return (x_out, *_remask_into(logits, x, x_out, *args))


def _remask_x_in_place(logits: Tensor, x: Tensor, *args: object) -> tuple[Tensor, Tensor]:
    return _remask_into(logits, x, x, *args)


_remask = torch.library.custom_op(
    "llada_ext::remask",
    _remask_new_x,
    mutates_args=(),
    schema=f"({_REMASK_ARGS.format(x_alias='')}) -> (Tensor, Tensor, Tensor)",
)
_remask_inplace = torch.library.custom_op(
    "llada_ext::remask_",
    _remask_x_in_place,
    mutates_args=("x",),
    schema=f"({_REMASK_ARGS.format(x_alias='(a!)')}) -> (Tensor, Tensor)",
)


def _fake_details(logits: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    B, W = logits.shape[0], logits.shape[1]
    return x.new_empty((B, W)), logits.new_empty((B, W), dtype=torch.float32)


@_remask.register_fake
def _(logits, x, *args):
    return (torch.empty_like(x), *_fake_details(logits, x))


@_remask_inplace.register_fake
def _(logits, x, *args):
    return _fake_details(logits, x)


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


def _num_transfer(num_transfer: object, B: int, W: int, logits: Tensor) -> Tensor:
    """num_transfer as int64 ``[B]`` on logits' device."""
    count = checks.num_transfer_count(num_transfer, W, isinstance(num_transfer, Tensor))
    if count is not None:
        return torch.full((B,), count, dtype=torch.int64, device=logits.device)
    nt = _tensor(num_transfer, "num_transfer", logits, "logits")
    if checks.num_transfer_array(meta(nt, "num_transfer"), B):
        nt = nt.expand(B)
    nt = nt.to(torch.int64)
    if _eager(nt) and B > 0:
        checks.num_transfer_values(bool((nt < 0).any()))
    return nt


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
) -> tuple:
    """The checked arguments of the remask ops, in their schema's order."""
    logits = _tensor(logits, "logits")
    x = _tensor(x, "x", logits, "logits")
    if uncond_logits is not None:
        uncond_logits = _tensor(uncond_logits, "uncond_logits", logits, "logits")
    B, W, V, L = checks.remask_arrays(
        meta(logits, "logits"),
        meta(x, "x"),
        None if uncond_logits is None else meta(uncond_logits, "uncond_logits"),
        logits.device.type,
    )
    scalars = checks.remask_scalars(
        mask_id=mask_id,
        offset=offset,
        strategy=strategy,
        temperature=temperature,
        threshold=threshold,
        cfg_scale=cfg_scale,
        W=W,
        L=L,
    )
    num_transfer = _num_transfer(num_transfer, B, W, logits)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    seed = _draw_seed(generator) if scalars.needs_seed else 0
    if uncond_logits is not None:
        uncond_logits = _inner_contiguous(uncond_logits)
    return (_inner_contiguous(logits), x, num_transfer, uncond_logits, *scalars, seed)


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

    Parameters
    ----------
    x : Tensor
        int64 ``[B, L]``, updated in place. It must own its elements: rows that share memory
        (``expand``, zero strides) raise a ValueError naming ``x``, as torch does for in-place
        ops on expanded tensors.
    logits, num_transfer, mask_id, offset, strategy, temperature, threshold, generator
        As in :func:`remask`, and so are ``uncond_logits``, ``cfg_scale``, ``return_details``.

    Returns
    -------
    Tensor or (Tensor, Tensor, Tensor)
        ``x`` itself, and the details (``x0``, ``confidence``) when asked.
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
