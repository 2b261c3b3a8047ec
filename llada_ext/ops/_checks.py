"""Argument checks of the ops for any array library: shapes, dtype names and plain values.

The torch ops (:mod:`llada_ext.ops`) and the DLPack functions (:mod:`llada_ext.dlpack`) both
validate their arguments here, so each kind of argument has one check and one message. A
check sees an array only as a :class:`Meta` (its name, shape and dtype name) and a scalar as
the Python value the caller passed. It raises a ``TypeError`` (wrong type or dtype) or a
``ValueError`` (wrong shape or value) whose message starts with the argument's name.

Checks of array *values* need the array's own library: the callers compute the few facts
(any target out of range, all weights finite, any negative count) that :func:`ce_values` and
:func:`num_transfer_values` turn into errors. What stays with each caller is how it imports
its arrays: the type of an array argument and the device it lives on.

This module imports neither torch nor NumPy.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

REMASK_STRATEGIES = {"low_confidence": 0, "random": 1, "margin": 2, "entropy": 3}

# dtypes by name, as NumPy, CuPy, ml_dtypes and torch (minus "torch.") spell them
ATTENTION_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16")}
LOGIT_DTYPES = ("float32", "bfloat16", "float16")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
REDUCTIONS = ("sum", "mean", "none")

_UINT64 = (1 << 64) - 1


class Meta(NamedTuple):
    """An array argument as the checks see it."""

    name: str
    shape: tuple
    dtype: str


def dtype_name(dtype: object) -> str:
    """The name of a dtype of any library, without torch's prefix ("torch.bfloat16" ->
    "bfloat16")."""
    name = str(dtype)
    return name[6:] if name.startswith("torch.") else name


def meta(a: Any, name: str) -> Meta:
    """The :class:`Meta` of an array of any library with ``shape`` and ``dtype``."""
    return Meta(name, tuple(a.shape), dtype_name(a.dtype))


# ---------------------------------------------------------------------------------------
# one argument
# ---------------------------------------------------------------------------------------


def ndim(a: Meta, n: int, layout: str) -> None:
    """ValueError unless ``a`` has ``n`` dimensions; ``layout`` names them, e.g. "[B, W, V]"."""
    if len(a.shape) != n:
        raise ValueError(f"{a.name}: expected {n} dimensions {layout}, got shape {a.shape}")


def dtype_in(a: Meta, allowed: tuple, device: str) -> None:
    """TypeError unless ``a``'s dtype is one of ``allowed`` (the dtypes of ``device``)."""
    if a.dtype not in allowed:
        raise TypeError(
            f"{a.name}: dtype {a.dtype} is not supported on {device}; "
            f"expected one of {', '.join(allowed)}"
        )


def dtype_is(a: Meta, want: str) -> None:
    """TypeError unless ``a``'s dtype is ``want``."""
    if a.dtype != want:
        raise TypeError(f"{a.name}: expected dtype {want}, got {a.dtype}")


def number(value: object, name: str) -> float:
    """A finite real number as a float (TypeError for other types, bool included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def integer(value: object, name: str) -> int:
    """An integer (Python or NumPy, not bool) as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, numbers.Integral)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def reduction(value: object, allowed: tuple = REDUCTIONS) -> None:
    """ValueError unless ``value`` is one of the reductions ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        names = [repr(r) for r in allowed]
        expected = f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"reduction: expected {expected}, got {value!r}")


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


def attention_shapes(q: Meta, k: Meta, v: Meta, device: str) -> tuple:
    """Checks q ``[B, Sq, Hq, D]`` and k, v ``[B, Sk, Hkv, D]`` of one dtype, ``Hkv``
    dividing ``Hq``, and the head dimensions the device supports.

    Returns
    -------
    tuple
        ``(B, Sq, Hq, D, Sk)``.
    """
    for a in (q, k, v):
        ndim(a, 4, "[B, S, H, D]")
    dtype_in(q, ATTENTION_DTYPES[device], device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: dtypes {k.dtype}, {v.dtype} must equal q's dtype {q.dtype}")
    B, Sq, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k: shape {k.shape} does not match q {q.shape} in batch or head dimension"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: shape {v.shape} must equal k's shape {k.shape}")
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: {Hkv} key/value heads must divide the {Hq} query heads")
    if D == 0:
        raise ValueError("q: head dimension must be > 0")
    if device == "cuda" and (D % 8 != 0 or D > 256):
        raise ValueError(
            f"q: head dimension {D} is not supported on CUDA (a multiple of 8, at most 256)"
        )
    return B, Sq, Hq, D, Sk


def key_mask(mask: Meta, B: int, Sk: int) -> None:
    """Checks a key mask: bool ``[B, Sk]``."""
    dtype_is(mask, "bool")
    if mask.shape != (B, Sk):
        raise ValueError(f"{mask.name}: expected shape {(B, Sk)}, got {mask.shape}")


def attention_scale(scale: object, D: int) -> float:
    """The multiplier of ``q . k``: ``scale`` (a finite number), or ``D ** -0.5`` for None."""
    return float(D) ** -0.5 if scale is None else number(scale, "scale")


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def logits_vocab(logits: Meta, device: str) -> int:
    """Checks logits ``[..., V]`` (a logit dtype, ``V > 0``); returns ``V``."""
    if not logits.shape:
        raise ValueError(f"{logits.name}: expected at least 1 dimension [..., V]")
    dtype_in(logits, LOGIT_DTYPES, device)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"{logits.name}: the vocabulary dimension must be > 0")
    return V


def lm_head(hidden: Meta, weight: Meta, device: str) -> int:
    """Checks hidden states ``[..., d]`` and an LM head weight ``[V, d]``; returns ``V``."""
    if not hidden.shape:
        raise ValueError(f"{hidden.name}: expected at least 1 dimension [..., d]")
    if len(weight.shape) != 2:
        raise ValueError(f"{weight.name}: expected shape [V, d], got {weight.shape}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight.name}: inner size {weight.shape[1]} does not match hidden's "
            f"last dimension {hidden.shape[-1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{weight.name}: the vocabulary dimension must be > 0")
    dtype_in(hidden, LOGIT_DTYPES, device)
    dtype_in(weight, LOGIT_DTYPES, device)
    return weight.shape[0]


def chunk_rows(value: object) -> int:
    """Rows of logits per chunk of the fused loss: an int >= 0 (0 picks a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"chunk_rows: expected an int >= 0, got {value!r}")
    return value


def ce_targets(lead: tuple, targets: Meta, weights: Meta) -> None:
    """Checks targets int64 and weights float32, both of shape ``lead`` (logits' ``[...]``)."""
    dtype_is(targets, "int64")
    dtype_is(weights, "float32")
    for a in (targets, weights):
        if a.shape != lead:
            raise ValueError(f"{a.name}: expected shape {lead}, got {a.shape}")


def ce_values(
    targets_out_of_range: bool,
    weights_finite: bool,
    vocab: int,
    ignore_index: Optional[int] = None,
) -> None:
    """ValueError for a target outside ``[0, vocab)`` on a row that counts, or a weight that
    is not finite (the caller reads the values)."""
    if targets_out_of_range:
        ignored = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(f"targets: values must lie in [0, {vocab}) where weights != 0{ignored}")
    if not weights_finite:
        raise ValueError("weights: must be finite")


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


class RemaskScalars(NamedTuple):
    """The checked scalar arguments of one remask step, in the order of the ops' schema."""

    mask_id: int
    offset: int
    strategy: int  # code of REMASK_STRATEGIES
    temperature: float
    has_threshold: bool
    threshold: float
    cfg_scale: float

    @property
    def needs_seed(self) -> bool:
        """Whether the step draws random numbers (Gumbel noise or "random" confidence)."""
        return self.temperature > 0 or self.strategy == REMASK_STRATEGIES["random"]

    def c_args(self, seed: int) -> tuple:
        """The scalar arguments of ``llada_remask`` (its ``llada_remask_params`` order)."""
        return (
            self.mask_id,
            self.offset,
            self.strategy,
            self.has_threshold,
            self.threshold,
            self.temperature,
            self.cfg_scale,
            seed & _UINT64,
        )


def remask_arrays(logits: Meta, x: Meta, uncond: Optional[Meta], device: str) -> tuple:
    """Checks logits ``[B, W, V]``, x int64 ``[B, L]`` and unconditional logits (None, or
    logits' shape and dtype).

    Returns
    -------
    tuple
        ``(B, W, V, L)``.
    """
    ndim(logits, 3, "[B, W, V]")
    V = logits_vocab(logits, device)
    B, W = logits.shape[0], logits.shape[1]
    dtype_is(x, "int64")
    if len(x.shape) != 2 or x.shape[0] != B:
        raise ValueError(f"{x.name}: expected shape [{B}, L], got {x.shape}")
    if uncond is not None and (uncond.shape != logits.shape or uncond.dtype != logits.dtype):
        raise ValueError(
            f"{uncond.name}: expected shape {logits.shape} and dtype {logits.dtype}, "
            f"got {uncond.shape} {uncond.dtype}"
        )
    return B, W, V, x.shape[1]


def remask_scalars(
    *,
    mask_id: object,
    offset: object,
    strategy: object,
    temperature: object,
    threshold: object,
    cfg_scale: object,
    W: int,
    L: int,
) -> RemaskScalars:
    """Checks the scalar arguments of a remask step on a window of W positions of x of
    length L: an int offset with the window inside x, an int64 mask_id, a strategy name, a
    finite temperature >= 0, a finite threshold or None, a finite cfg_scale."""
    offset = integer(offset, "offset")
    if offset < 0 or offset + W > L:
        raise ValueError(
            f"offset: the window [{offset}, {offset + W}) does not fit in x of length {L}"
        )
    mask_id = integer(mask_id, "mask_id")
    if not -(2**63) <= mask_id < 2**63:
        raise ValueError(f"mask_id: {mask_id} is not an int64 token id")
    if not isinstance(strategy, str) or strategy not in REMASK_STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(REMASK_STRATEGIES)}, got {strategy!r}")
    temperature = number(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    return RemaskScalars(
        mask_id,
        offset,
        REMASK_STRATEGIES[strategy],
        temperature,
        threshold is not None,
        0.0 if threshold is None else number(threshold, "threshold"),
        number(cfg_scale, "cfg_scale"),
    )


def num_transfer_count(value: object, W: int, is_array: bool) -> Optional[int]:
    """The count of an int ``num_transfer``, clamped to W (a row has at most W candidates,
    so any larger int means all of them); None when ``value`` is an array."""
    if is_array:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, numbers.Integral)):
        raise TypeError(
            f"num_transfer: expected an int or an integer array [B], got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"num_transfer: must be >= 0, got {value}")
    return min(int(value), W)


def num_transfer_array(nt: Meta, B: int) -> bool:
    """Checks an integer array ``num_transfer``: ``[B]``, or 0-d for one count of every row.

    Returns
    -------
    bool
        True when it is 0-d (the caller broadcasts it to ``[B]``).
    """
    if nt.dtype not in INT_DTYPES:
        raise TypeError(f"{nt.name}: expected an integer array, got {nt.dtype}")
    if not nt.shape:
        return True
    if nt.shape != (B,):
        raise ValueError(f"{nt.name}: expected shape [{B}], got {nt.shape}")
    return False


def num_transfer_values(any_negative: bool) -> None:
    """ValueError when a count of a ``num_transfer`` array is negative (the caller reads the
    values)."""
    if any_negative:
        raise ValueError("num_transfer: values must be >= 0")
