"""Array libraries behind :mod:`llada_ext.dlpack`: how one call imports its array arguments,
reads their C ABI views, allocates outputs and workspaces, finds its stream and hands the
results back (the table in :mod:`llada_ext.dlpack` says which library gets which backend).

Only NumPy is imported here at module level; torch, CuPy and JAX are imported when a call
needs them.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

# llada_dtype / llada_device_type codes of csrc/include/llada/llada.h, by dtype name (the
# names NumPy, CuPy, ml_dtypes and torch (minus "torch.") agree on) and device type.
_DTYPE_CODES = {
    "float32": 0,
    "float16": 1,
    "bfloat16": 2,
    "float64": 3,
    "int64": 4,
    "int32": 5,
    "bool": 6,
}
_DEVICE_CODES = {"cpu": 0, "cuda": 1}
# DLPack DLDeviceType values.
_KDL_CPU, _KDL_CUDA = 1, 2

Array = Any  # any object with __dlpack__ (numpy.ndarray, cupy.ndarray, jax.Array, ...)


def _top_module(obj: object) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_jax(obj: object) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(obj, jax.Array)


class _Backend:
    """What every backend offers on top of its library's own calls."""

    device_type = "cpu"  # "cpu" or "cuda", as the argument checks name devices
    device_id = 0

    def ptr(self, a: Any) -> int:
        raise NotImplementedError

    def view(self, a: Any) -> tuple:
        raise NotImplementedError

    def empty(self, shape: tuple, dtype: Any) -> Any:
        raise NotImplementedError

    def opt_view(self, a: Any) -> Optional[tuple]:
        return None if a is None else self.view(a)

    def workspace(self, nbytes: int) -> tuple:
        """Scratch of ``nbytes`` for one kernel call: the buffer (keep it referenced until the
        call returns) and its address; ``(None, 0)`` when the kernel needs none. The buffer
        is never given a dtype code."""
        if not nbytes:
            return None, 0
        ws = self.empty((nbytes,), "uint8")
        return ws, self.ptr(ws)


class _StridedBackend(_Backend):
    """NumPy and CuPy arrays: a pointer and byte strides read from the array itself."""

    def contiguous(self, a: Any) -> Any:
        raise NotImplementedError

    def prepare(self, a: Any, inner: bool) -> Any:
        # The ABI wants strides in whole elements; a negative or byte-odd stride, or a
        # strided last dimension where it must be contiguous, costs one copy.
        size = a.dtype.itemsize
        bad = any(s < 0 or s % size for s in a.strides)
        if inner and a.ndim and a.shape[-1] > 1 and a.strides[-1] != size:
            bad = True
        return self.contiguous(a) if bad else a

    def view(self, a: Any) -> tuple:
        size = a.dtype.itemsize
        return (
            self.ptr(a),
            _DTYPE_CODES[a.dtype.name],
            _DEVICE_CODES[self.device_type],
            self.device_id,
            list(a.shape),
            [s // size for s in a.strides],
        )


class _NumpyBackend(_StridedBackend):
    """Host arrays as NumPy arrays; outputs handed back to the caller's library."""

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

    def contiguous(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def ptr(self, a: np.ndarray) -> int:
        return a.__array_interface__["data"][0]

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

    def zero_where(self, weights: np.ndarray, targets: np.ndarray, value: int) -> np.ndarray:
        return np.where(targets == value, np.float32(0), weights).astype(np.float32)

    def mean(self, total: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.asarray(total / np.float32(max(int(np.count_nonzero(weights)), 1)))

    def stream(self) -> int:
        return 0

    def host_values(self, a: np.ndarray) -> np.ndarray:
        return a

    def wrap(self, a: np.ndarray) -> Array:
        if self.kind == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return a


class _CupyBackend(_StridedBackend):
    """CuPy arrays on their own device and CuPy's current stream of that device."""

    device_type = "cuda"
    host = False

    def __init__(self, device_id: int) -> None:
        import cupy

        self.cp = cupy
        self.device_id = device_id

    def asarray(self, obj: Array) -> Any:
        if isinstance(obj, self.cp.ndarray):
            return obj
        return self.cp.from_dlpack(obj)

    def contiguous(self, a: Any) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return self.cp.ascontiguousarray(a)

    def ptr(self, a: Any) -> int:
        return int(a.data.ptr)

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

    def zero_where(self, weights: Any, targets: Any, value: int) -> Any:
        with self.cp.cuda.Device(self.device_id):
            return self.cp.where(targets == value, 0, weights).astype("float32")

    def mean(self, total: Any, weights: Any) -> Any:
        # on the device: no synchronisation for the count
        with self.cp.cuda.Device(self.device_id):
            count = self.cp.maximum(self.cp.count_nonzero(weights), 1)
            return (total / count).astype("float32")

    def stream(self) -> int:
        with self.cp.cuda.Device(self.device_id):
            return int(self.cp.cuda.get_current_stream().ptr)

    def host_values(self, a: Any) -> None:
        return None

    def wrap(self, a: Any) -> Any:
        return a


class _TorchBackend(_Backend):
    """torch tensors as they are; other CUDA arrays imported and handed back through torch."""

    def __init__(self, device: Any, kind: str, source: object = None) -> None:
        import torch

        from .. import _views

        self.torch = torch
        self.views = _views
        self.device = torch.device(device)
        self.device_type = "cpu" if self.device.type == "cpu" else "cuda"
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

    def ptr(self, a: Any) -> int:
        return int(a.data_ptr())

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

    def zero_where(self, weights: Any, targets: Any, value: int) -> Any:
        return self.torch.where(targets == value, self.torch.zeros_like(weights), weights)

    def mean(self, total: Any, weights: Any) -> Any:
        return total / (weights != 0).sum().clamp_min(1).to(total.dtype)

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


class Call:
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

    def opt_arg(self, obj: Optional[Array], name: str) -> Any:
        return None if obj is None else self.arg(obj, name)
