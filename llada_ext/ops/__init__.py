"""Public torch ops of llada_ext: attention, masked cross-entropy, remasking.

Each op validates its arguments (a ``ValueError`` or ``TypeError`` naming the argument),
allocates its outputs with torch and calls the kernel library through ``llada_ext._C`` on the
caller's current CUDA stream. The ops are registered with ``torch.library.custom_op`` with fake
(meta) implementations and autograd formulas, so ``torch.compile(fullgraph=True)`` and autograd
work through them. One module per op family, named like the op, its CPU twin
(``csrc/cpu/``), its CUDA kernel (``csrc/cuda/``) and its tests:

- :mod:`._attention`: ``attention`` (``csrc/cpu/attention.cpp``, ``csrc/cuda/attention_*``);
- :mod:`._cross_entropy`: ``masked_cross_entropy``, ``linear_masked_cross_entropy``
  (``csrc/cpu/masked_ce.cpp``, ``csrc/cuda/masked_ce.cu``);
- :mod:`._remask`: ``remask``, ``remask_`` (``csrc/cpu/remask.cpp``, ``csrc/cuda/remask.cu``);
- :mod:`._checks`: the argument checks, on shapes, dtype names and plain values, that they
  share with ``llada_ext.dlpack``; :mod:`._common`: what the torch ops share besides (tensor
  arguments, workspaces).
"""

from ._attention import attention
from ._checks import REMASK_STRATEGIES
from ._cross_entropy import linear_masked_cross_entropy, masked_cross_entropy
from ._remask import remask, remask_

__all__ = [
    "attention",
    "masked_cross_entropy",
    "linear_masked_cross_entropy",
    "remask",
    "remask_",
    "REMASK_STRATEGIES",
]
