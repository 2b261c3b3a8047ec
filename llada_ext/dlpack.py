"""Framework-neutral entry points: the kernels on any array that speaks DLPack.

The functions here take arrays of any library implementing the DLPack protocol
(``__dlpack__`` / ``__dlpack_device__``) and return arrays of that same library. They are
forward-only (no autograd) and have the semantics of the torch ops of the same name
(``llada_ext.attention``, ``masked_cross_entropy``, ``remask``; see ``llada_ext.ops``), except
that :func:`remask` takes an explicit Philox ``seed`` instead of a ``torch.Generator``.

How each library is served (the first array argument decides):

============  ======  =========================================================================
library       device  inputs / outputs / stream
============  ======  =========================================================================
NumPy         CPU     pointer and strides read from the array itself (no copy unless the last
                      dimension is not contiguous); outputs ``np.empty``; runs synchronously.
                      ``ml_dtypes.bfloat16`` arrays are accepted where bfloat16 is.
JAX           CPU     viewed as NumPy (``np.asarray``), outputs returned with ``jnp.asarray``.
CuPy          CUDA    ``.data.ptr`` and strides of the array; outputs ``cupy.empty`` on the
                      array's device; the kernels run on CuPy's *current stream* of that
                      device, with no host synchronisation (capturable in a CUDA graph).
JAX           CUDA    imported zero-copy with ``torch.from_dlpack`` (which orders JAX's pending
                      work before torch's current stream through the protocol's ``stream``
                      argument), outputs allocated by torch, computed on torch's current
                      stream and handed back with ``jax.dlpack.from_dlpack`` (which orders
                      that stream before JAX's). No host synchronisation.
torch         any     used directly (the same views as the torch ops), returned as torch.
other         CPU     imported with ``np.from_dlpack``; NumPy arrays are returned.
other         CUDA    imported with ``torch.from_dlpack``; returned through the library's own
                      ``from_dlpack`` when its top-level module has one, else as torch tensors.
============  ======  =========================================================================

Only the NumPy / CPU path avoids torch entirely (this module imports torch lazily, for the
torch and CUDA-through-torch paths); note that ``import llada_ext`` itself imports torch.
Checks that read array *values* (targets in range, non-negative ``num_transfer``, finite
weights) run only for host arrays: on a GPU they would need a device synchronisation. On the
device an out-of-range target gives a NaN loss, as the C ABI documents.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional, Union

import numpy as np

from . import _C
from ._renamed import refuse_renamed_attention_args

__all__ = ["attention", "masked_cross_entropy", "remask", "REMASK_STRATEGIES"]

REMASK_STRATEGIES = {"low_confidence": 0, "random": 1, "margin": 2, "entropy": 3}

# llada_dtype / llada_device_type codes of csrc/include/llada/llada.h, by dtype name (the
# names NumPy, CuPy, ml_dtypes and torch (minus "torch.") agree on).
_DTYPE_CODES = {
    "float32": 0,
    "float16": 1,
    "bfloat16": 2,
    "float64": 3,
    "int64": 4,
    "int32": 5,
    "bool": 6,
}
_LLADA_CPU, _LLADA_CUDA = 0, 1
# DLPack DLDeviceType values.
_KDL_CPU, _KDL_CUDA = 1, 2

_ATTN_DTYPES = {_LLADA_CPU: ("float32", "bfloat16"), _LLADA_CUDA: ("float16", "bfloat16")}
_LOGIT_DTYPES = ("float32", "bfloat16", "float16")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")

Array = Any  # any object with __dlpack__ (numpy.ndarray, cupy.ndarray, jax.Array, ...)


# ---------------------------------------------------------------------------------------
# backends: how to read a view, allocate and hand back arrays for one array library
# ---------------------------------------------------------------------------------------


def _dtype_name(a: Array) -> str:
    name = str(a.dtype)
    return name[6:] if name.startswith("torch.") else name


def _top_module(obj: object) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_jax(obj: object) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(obj, jax.Array)


class _NumpyBackend:
    """Host arrays as NumPy arrays; outputs handed back to the caller's library."""

    device_type = _LLADA_CPU
    device_id = 0
    host = True

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "numpy", "jax" or "other"

    def asarray(self, obj: Array) -> np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        if _is_jax(obj):
            # np.asarray keeps ml_dtypes.bfloat16, which np.from_dlpack cannot represent.
            return np.asarray(obj)
        return np.from_dlpack(obj)

    def prepare(self, a: np.ndarray, inner: bool) -> np.ndarray:
        # The ABI wants strides in whole elements; a negative or byte-odd stride, or a
        # strided last dimension where it must be contiguous, costs one copy.
        size = a.dtype.itemsize
        bad = any(s < 0 or s % size for s in a.strides)
        if inner and a.ndim and a.shape[-1] > 1 and a.strides[-1] != size:
            bad = True
        return np.ascontiguousarray(a) if bad else a

    def view(self, a: np.ndarray) -> tuple:
        size = a.dtype.itemsize
        return (
            a.__array_interface__["data"][0],
            _DTYPE_CODES[a.dtype.name],
            _LLADA_CPU,
            0,
            list(a.shape),
            [s // size for s in a.strides],
        )

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def astype(self, a: np.ndarray, name: str) -> np.ndarray:
        return a.astype(name)

    def broadcast(self, a: np.ndarray, shape: tuple) -> np.ndarray:
        return np.broadcast_to(a, shape)

    def full(self, shape: tuple, value: int, name: str) -> np.ndarray:
        return np.full(shape, value, dtype=name)

    def sum(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a.sum(dtype=np.float32))

    def stream(self) -> int:
        return 0

    def host_values(self, a: np.ndarray) -> np.ndarray:
        return a

    def wrap(self, a: np.ndarray) -> Array:
        if self.kind == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return a


class _CupyBackend:
    """CuPy arrays on their own device and CuPy's current stream of that device."""

    device_type = _LLADA_CUDA
    host = False

    def __init__(self, device_id: int) -> None:
        import cupy

        self.cp = cupy
        self.device_id = device_id

    def asarray(self, obj: Array) -> Any:
        if isinstance(obj, self.cp.ndarray):
            return obj
        return self.cp.from_dlpack(obj)

    def prepare(self, a: Any, inner: bool) -> Any:
        size = a.dtype.itemsize
        bad = any(s < 0 or s % size for s in a.strides)
        if inner and a.ndim and a.shape[-1] > 1 and a.strides[-1] != size:
            bad = True
        if bad:
            with self.cp.cuda.Device(self.device_id):
                return self.cp.ascontiguousarray(a)
        return a

    def view(self, a: Any) -> tuple:
        size = a.dtype.itemsize
        return (
            int(a.data.ptr),
            _DTYPE_CODES[a.dtype.name],
            _LLADA_CUDA,
            int(a.device.id),
            list(a.shape),
            [s // size for s in a.strides],
        )

    def empty(self, shape: tuple, dtype: Any) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return self.cp.empty(shape, dtype=dtype)

    def astype(self, a: Any, name: str) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return a.astype(name)

    def broadcast(self, a: Any, shape: tuple) -> Any:
        return self.cp.broadcast_to(a, shape)

    def full(self, shape: tuple, value: int, name: str) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return self.cp.full(shape, value, dtype=name)

    def sum(self, a: Any) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return a.sum(dtype="float32")

    def stream(self) -> int:
        with self.cp.cuda.Device(self.device_id):
            return int(self.cp.cuda.get_current_stream().ptr)

    def host_values(self, a: Any) -> None:
        return None

    def wrap(self, a: Any) -> Any:
        return a


class _TorchBackend:
    """torch tensors as they are; other CUDA arrays imported and handed back through torch."""

    def __init__(self, device: Any, kind: str, source: object = None) -> None:
        import torch

        from . import _views

        self.torch = torch
        self.views = _views
        self.device = torch.device(device)
        self.device_type = _LLADA_CPU if self.device.type == "cpu" else _LLADA_CUDA
        self.device_id = self.device.index or 0
        self.host = self.device.type == "cpu"
        self.kind = kind  # "torch", "jax" or "other"
        self.source = source

    def asarray(self, obj: Array) -> Any:
        if isinstance(obj, self.torch.Tensor):
            return obj.detach()
        return self.torch.from_dlpack(obj)

    def prepare(self, a: Any, inner: bool) -> Any:
        if any(s < 0 for s in a.stride()) or (
            inner and a.dim() and a.shape[-1] > 1 and a.stride(-1) != 1
        ):
            return a.contiguous()
        return a

    def view(self, a: Any) -> tuple:
        return self.views.view(a)

    def _dtype(self, dtype: Any) -> Any:
        return getattr(self.torch, dtype) if isinstance(dtype, str) else dtype

    def empty(self, shape: tuple, dtype: Any) -> Any:
        return self.torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def astype(self, a: Any, name: str) -> Any:
        return a.to(self._dtype(name))

    def broadcast(self, a: Any, shape: tuple) -> Any:
        return a.expand(shape)

    def full(self, shape: tuple, value: int, name: str) -> Any:
        return self.torch.full(shape, value, dtype=self._dtype(name), device=self.device)

    def sum(self, a: Any) -> Any:
        return a.sum()

    def stream(self) -> int:
        if self.host:
            return 0
        return int(self.torch.cuda.current_stream(self.device).cuda_stream)

    def host_values(self, a: Any) -> Optional[np.ndarray]:
        return a.numpy() if self.host else None

    def wrap(self, a: Any) -> Any:
        if self.kind == "jax":
            import jax.dlpack

            return jax.dlpack.from_dlpack(a)
        if self.kind == "other":
            from_dlpack = getattr(sys.modules.get(_top_module(self.source)), "from_dlpack", None)
            if from_dlpack is not None:
                return from_dlpack(a)
        return a


def _device_of(obj: object, name: str) -> tuple:
    if isinstance(obj, np.ndarray):
        return (_KDL_CPU, 0)
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(
            f"{name}: expected an array implementing the DLPack protocol (__dlpack__, "
            f"__dlpack_device__), got {type(obj).__name__}"
        )
    dev_type, dev_id = obj.__dlpack_device__()
    return (int(dev_type), int(dev_id))


def _backend_for(anchor: object, name: str) -> Any:
    """The backend serving a call whose first array argument is ``anchor``."""
    dev_type, dev_id = _device_of(anchor, name)
    top = _top_module(anchor)
    if top == "torch":
        return _TorchBackend(anchor.device, "torch")
    if dev_type == _KDL_CPU:
        if isinstance(anchor, np.ndarray):
            return _NumpyBackend("numpy")
        return _NumpyBackend("jax" if _is_jax(anchor) else "other")
    if dev_type == _KDL_CUDA:
        if top == "cupy":
            return _CupyBackend(dev_id)
        kind = "jax" if _is_jax(anchor) else "other"
        return _TorchBackend(f"cuda:{dev_id}", kind, anchor)
    raise ValueError(
        f"{name}: arrays on DLPack device type {dev_type} are not supported (CPU = 1, CUDA = 2)"
    )


class _Call:
    """Imports the array arguments of one call into a backend, checking their devices."""

    def __init__(self, anchor: Array, anchor_name: str) -> None:
        self.be = _backend_for(anchor, anchor_name)
        self.anchor_name = anchor_name
        self.anchor_device = _device_of(anchor, anchor_name)

    def arg(self, obj: Array, name: str) -> Any:
        device = _device_of(obj, name)
        if device != self.anchor_device:
            raise ValueError(
                f"{name}: on DLPack device {device}, but {self.anchor_name} is on "
                f"{self.anchor_device}"
            )
        return self.be.asarray(obj)


# ---------------------------------------------------------------------------------------
# validation helpers (metadata only; values only for host arrays)
# ---------------------------------------------------------------------------------------


def _dtype_in(a: Array, name: str, allowed: tuple) -> None:
    if _dtype_name(a) not in allowed:
        raise TypeError(
            f"{name}: dtype {_dtype_name(a)} is not supported; expected one of {', '.join(allowed)}"
        )


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


def attention(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    **renamed: object,
) -> Union[Array, tuple[Array, Array]]:
    """Non-causal multi-head attention (forward only) on DLPack arrays.

    Parameters
    ----------
    q : array
        Queries ``[B, Sq, Hq, D]``. CPU: float32 or bfloat16; CUDA: float16 or bfloat16.
    k, v : array
        Keys and values ``[B, Sk, Hkv, D]``, q's dtype and device, ``Hq % Hkv == 0``.
    key_mask : array, optional
        bool ``[B, Sk]``; True = this key is attended. None attends every key. The former
        name ``key_padding_mask`` raises a TypeError (see ``llada_ext.attention``).
    scale : float, optional
        Multiplier of ``q . k``; defaults to ``D ** -0.5``.
    return_lse : bool
        Also return the float32 log-sum-exp of the scaled scores ``[B, Hq, Sq]`` (-inf for a
        query whose keys are all masked; its output row is 0).

    Returns
    -------
    array or (array, array)
        ``out [B, Sq, Hq, D]`` in q's dtype (and ``lse``), of q's array library.
    """
    refuse_renamed_attention_args(renamed)
    call = _Call(q, "q")
    be = call.be
    q, k, v = call.arg(q, "q"), call.arg(k, "k"), call.arg(v, "v")
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if len(a.shape) != 4:
            raise ValueError(f"{name}: expected 4 dimensions [B, S, H, D], got {tuple(a.shape)}")
    _dtype_in(q, "q", _ATTN_DTYPES[be.device_type])
    if _dtype_name(k) != _dtype_name(q) or _dtype_name(v) != _dtype_name(q):
        raise TypeError(
            f"k, v: dtypes {_dtype_name(k)}, {_dtype_name(v)} must equal q's {_dtype_name(q)}"
        )
    B, Sq, Hq, D = (int(s) for s in q.shape)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's shape {tuple(k.shape)}")
    Sk, Hkv = int(k.shape[1]), int(k.shape[2])
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: {Hkv} key/value heads must divide the {Hq} query heads")
    if D == 0:
        raise ValueError("q: head dimension must be > 0")
    mask = None
    if key_mask is not None:
        mask = call.arg(key_mask, "key_mask")
        if _dtype_name(mask) != "bool":
            raise TypeError(f"key_mask: expected dtype bool, got {_dtype_name(mask)}")
        if tuple(mask.shape) != (B, Sk):
            raise ValueError(f"key_mask: expected shape {(B, Sk)}, got {tuple(mask.shape)}")
        mask = be.prepare(mask, inner=False)
    scale = float(D) ** -0.5 if scale is None else _finite(scale, "scale")
    q, k, v = (be.prepare(a, inner=True) for a in (q, k, v))
    out = be.empty((B, Sq, Hq, D), q.dtype)
    lse = be.empty((B, Hq, Sq), "float32")
    ws_bytes = _C.attention_fwd_workspace_size(be.view(q), be.view(k))
    ws = be.empty((ws_bytes,), "uint8") if ws_bytes else None
    _C.attention_fwd(
        be.view(q),
        be.view(k),
        be.view(v),
        None if mask is None else be.view(mask),
        scale,
        be.view(out),
        be.view(lse),
        be.stream(),
        _data_ptr(be, ws),
        ws_bytes,
    )
    return (be.wrap(out), be.wrap(lse)) if return_lse else be.wrap(out)


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: Array, targets: Array, weights: Array, *, reduction: str = "sum"
) -> Array:
    """Cross-entropy with per-token weights (forward only) on DLPack arrays.

    ``loss_i = weights_i * (logsumexp(logits_i) - logits_i[targets_i])``, accumulated in
    float32; rows with ``weights_i == 0`` are never read (loss 0).

    Parameters
    ----------
    logits : array
        ``[..., V]``, float32, bfloat16 or float16.
    targets : array
        int64 ``[...]``, in ``[0, V)`` where the weight is nonzero.
    weights : array
        float32 ``[...]``.
    reduction : {"sum", "none"}
        "sum" returns a float32 0-d array, "none" float32 ``[...]``.

    Returns
    -------
    array
        The loss, of logits' array library.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction: expected 'sum' or 'none', got {reduction!r}")
    call = _Call(logits, "logits")
    be = call.be
    logits = call.arg(logits, "logits")
    targets, weights = call.arg(targets, "targets"), call.arg(weights, "weights")
    if len(logits.shape) < 1:
        raise ValueError("logits: expected at least 1 dimension [..., V]")
    _dtype_in(logits, "logits", _LOGIT_DTYPES)
    V = int(logits.shape[-1])
    if V == 0:
        raise ValueError("logits: the vocabulary dimension must be > 0")
    lead = tuple(int(s) for s in logits.shape[:-1])
    if _dtype_name(targets) != "int64":
        raise TypeError(f"targets: expected dtype int64, got {_dtype_name(targets)}")
    if _dtype_name(weights) != "float32":
        raise TypeError(f"weights: expected dtype float32, got {_dtype_name(weights)}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead}, got {tuple(targets.shape)}")
    if tuple(weights.shape) != lead:
        raise ValueError(f"weights: expected shape {lead}, got {tuple(weights.shape)}")
    t_host, w_host = be.host_values(targets), be.host_values(weights)
    if t_host is not None and t_host.size:
        active = w_host != 0
        if np.any(active & ((t_host < 0) | (t_host >= V))):
            raise ValueError(f"targets: values must lie in [0, {V}) where weights != 0")
        if not np.all(np.isfinite(w_host)):
            raise ValueError("weights: must be finite")
    n = math.prod(lead)
    logits2 = be.prepare(be.prepare(logits, inner=True).reshape((n, V)), inner=True)
    targets1 = be.prepare(targets.reshape((n,)), inner=False)
    weights1 = be.prepare(weights.reshape((n,)), inner=False)
    loss = be.empty((n,), "float32")
    _C.masked_ce_fwd(
        be.view(logits2), be.view(targets1), be.view(weights1), be.view(loss), None, be.stream()
    )
    loss = loss.reshape(lead)
    return be.wrap(be.sum(loss) if reduction == "sum" else loss)


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


def remask(
    logits: Array,
    x: Array,
    num_transfer: Union[int, Array],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    seed: int = 0,
    uncond_logits: Optional[Array] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Array, tuple[Array, Array, Array]]:
    """One parallel decoding step (predict, score, keep the most confident) on DLPack arrays.

    Same semantics as :func:`llada_ext.remask`; the Gumbel noise (``temperature > 0``) and the
    "random" confidence come from the counter-based Philox stream keyed by ``seed``, so the
    same seed gives the same result on the CPU and on CUDA for the same float32 logits.

    Parameters
    ----------
    logits : array
        ``[B, W, V]`` predictions for ``x[:, offset:offset + W]`` (float32, bfloat16, float16).
    x : array
        int64 ``[B, L]``; positions equal to ``mask_id`` in the window are the candidates.
        Not modified.
    num_transfer : int or array
        Tokens to unmask per row: an int, or an integer array ``[B]`` (or 0-d).
    mask_id : int
        The mask token id, in ``[0, V)``.
    offset : int
        Start of the window in x.
    strategy : {"low_confidence", "random", "margin", "entropy"}
        How confidence is measured (see :func:`llada_ext.remask`).
    temperature : float
        0: argmax (ties -> lowest id); > 0: Gumbel-argmax of ``l / temperature``.
    threshold : float, optional
        Also unmask every candidate with confidence > threshold.
    seed : int
        Philox key (taken modulo 2**64).
    uncond_logits : array, optional
        Unconditional logits for classifier-free guidance,
        ``l = uncond + (cfg_scale + 1) * (logits - uncond)``.
    cfg_scale : float
        Guidance scale, used with uncond_logits.
    return_details : bool
        Also return ``x0`` int64 ``[B, W]`` and ``confidence`` float32 ``[B, W]`` (-inf at
        non-candidates).

    Returns
    -------
    array or (array, array, array)
        The new x (a new array of x's library), and the details when asked.
    """
    call = _Call(logits, "logits")
    be = call.be
    logits, x = call.arg(logits, "logits"), call.arg(x, "x")
    if len(logits.shape) != 3:
        raise ValueError(f"logits: expected 3 dimensions [B, W, V], got {tuple(logits.shape)}")
    _dtype_in(logits, "logits", _LOGIT_DTYPES)
    B, W, V = (int(s) for s in logits.shape)
    if V == 0:
        raise ValueError("logits: the vocabulary dimension must be > 0")
    if _dtype_name(x) != "int64":
        raise TypeError(f"x: expected dtype int64, got {_dtype_name(x)}")
    if len(x.shape) != 2 or x.shape[0] != B:
        raise ValueError(f"x: expected shape [{B}, L], got {tuple(x.shape)}")
    L = int(x.shape[1])
    offset = _int(offset, "offset")
    if offset < 0 or offset + W > L:
        raise ValueError(
            f"offset: the window [{offset}, {offset + W}) does not fit in x of length {L}"
        )
    mask_id = _int(mask_id, "mask_id")
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
    seed = _int(seed, "seed") % (1 << 64)
    uncond = None
    if uncond_logits is not None:
        uncond = call.arg(uncond_logits, "uncond_logits")
        if tuple(uncond.shape) != (B, W, V) or _dtype_name(uncond) != _dtype_name(logits):
            raise ValueError(
                f"uncond_logits: expected shape {(B, W, V)} and dtype {_dtype_name(logits)}, "
                f"got {tuple(uncond.shape)} {_dtype_name(uncond)}"
            )
        uncond = be.prepare(uncond, inner=True)
    if isinstance(num_transfer, (int, np.integer)) and not isinstance(num_transfer, bool):
        if num_transfer < 0:
            raise ValueError(f"num_transfer: must be >= 0, got {num_transfer}")
        # More than W means every candidate: any int is accepted (clamped to W).
        nt = be.full((B,), min(int(num_transfer), W), "int64")
    elif isinstance(num_transfer, bool):
        raise TypeError("num_transfer: expected an int or an integer array [B], got bool")
    else:
        nt = call.arg(num_transfer, "num_transfer")
        if _dtype_name(nt) not in _INT_DTYPES:
            raise TypeError(f"num_transfer: expected an integer array, got {_dtype_name(nt)}")
        if len(nt.shape) == 0:
            nt = be.broadcast(nt.reshape((1,)), (B,))
        if tuple(nt.shape) != (B,):
            raise ValueError(f"num_transfer: expected shape [{B}], got {tuple(nt.shape)}")
        if _dtype_name(nt) != "int64":
            nt = be.astype(nt, "int64")
        nt_host = be.host_values(nt)
        if nt_host is not None and nt_host.size and np.any(nt_host < 0):
            raise ValueError("num_transfer: values must be >= 0")
    logits = be.prepare(logits, inner=True)
    x = be.prepare(x, inner=False)
    nt = be.prepare(nt, inner=False)
    x_out = be.empty((B, L), "int64")
    x0 = be.empty((B, W), "int64")
    conf = be.empty((B, W), "float32")
    stream = be.stream()
    ws_bytes = _C.remask_workspace_size(be.view(logits), be.view(x))
    ws = be.empty((ws_bytes,), "uint8") if ws_bytes else None
    _C.remask(
        be.view(logits),
        None if uncond is None else be.view(uncond),
        be.view(x),
        be.view(nt),
        mask_id,
        offset,
        REMASK_STRATEGIES[strategy],
        has_threshold,
        threshold,
        temperature,
        cfg_scale,
        seed,
        be.view(x_out),
        be.view(x0),
        be.view(conf),
        _data_ptr(be, ws),
        ws_bytes,
        stream,
    )
    if return_details:
        return be.wrap(x_out), be.wrap(x0), be.wrap(conf)
    return be.wrap(x_out)


def _data_ptr(be: Any, ws: Any) -> int:
    """Address of a workspace buffer (0 for none); it is never given a dtype code."""
    if ws is None:
        return 0
    if isinstance(ws, np.ndarray):
        return ws.__array_interface__["data"][0]
    if hasattr(ws, "data_ptr"):
        return int(ws.data_ptr())
    return int(ws.data.ptr)
