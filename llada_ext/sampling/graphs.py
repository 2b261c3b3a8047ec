"""CUDA-graph replay of the sampler's steps.

A sampling step is a fixed-shape function of a few device tensors (the canvas ``x``, the
per-row transfer count, the key/value cache): model forward, LM head on the block, CFG
combination and :func:`llada_ext.remask_`, none of which waits on the host. :class:`SamplerGraphs`
records each such *unit* once as a CUDA graph and replays it afterwards, so a step costs one
graph launch instead of hundreds of kernel launches.

Units (keys) used by :func:`llada_ext.generate`:

- ``("step", nb)`` (no cache): full forward, LM head on block ``nb``, selection;
- ``("full",)`` (prefix/dual cache): full forward filling the key/value cache; shared by every
  block, its outputs (final hidden states and the cache) live at fixed addresses that the
  other units read;
- ``("head", nb)``: LM head on block ``nb`` of those hidden states, selection;
- ``("slice", nb)``: forward of the block (dual) or of the block and everything after it
  (prefix) against the cache, LM head, selection.

A unit is recorded the first time it runs: it runs eagerly once on a side stream (which is the
real step, and warms up lazily initialised libraries), then it is captured without being
executed. The graphs, their memory pool and the static input tensors are kept for later
:func:`~llada_ext.generate` calls with the same shapes and settings; pass the same
:class:`SamplerGraphs` object to reuse them (``cuda_graphs=True`` makes a fresh one per call).

When the selection draws random numbers (``temperature > 0`` or random remasking) the Philox
seed of a captured kernel would be frozen, so those units stop after the logits and the
selection runs eagerly after the replay, with a fresh seed every step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["SamplerGraphs"]


class SamplerGraphs:
    """Recorded sampler steps, reusable across calls of the same shapes.

    Parameters
    ----------
    capture : bool
        True (default): record CUDA graphs (needs a CUDA model). False: run every unit
        eagerly through the same static buffers (any device; for debugging and tests of the
        buffer logic).

    Examples
    --------
    >>> graphs = SamplerGraphs()
    >>> for batch in batches:                      # doctest: +SKIP
    ...     out = lx.generate(model, batch, gen_length=256, steps=256, block_length=32,
    ...                       cuda_graphs=graphs)
    """

    def __init__(self, capture: bool = True) -> None:
        self.capture = bool(capture)
        self.key: Hashable | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.graphs: dict[Hashable, tuple[Any, Any]] = {}
        self.state: dict[str, Any] = {}
        self.pool: Any = None

    @property
    def freezes_randomness(self) -> bool:
        """True when a recorded unit would replay the same random draws (it is a graph)."""
        return self.capture

    def release(self) -> None:
        """Drop the graphs, their outputs and the static buffers."""
        self.graphs.clear()
        self.static.clear()
        self.state.clear()
        self.key = None
        self.pool = None

    def prepare(
        self,
        key: Hashable,
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device,
    ) -> None:
        """Make the static buffers for ``key`` (a description of shapes and settings).

        Keeps everything recorded when ``key`` equals the previous one.
        """
        if key == self.key:
            return
        self.release()
        if self.capture and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {device}")
        for name, (shape, dtype) in shapes.items():
            self.static[name] = torch.zeros(shape, dtype=dtype, device=device)
        self.key = key

    def run(self, unit: Hashable, fn: Callable[[], Any], *, persistent: bool = False) -> Any:
        """Run ``fn`` (a unit of a step), recording it on first use.

        Parameters
        ----------
        unit : hashable
            The unit's key.
        fn : callable
            Reads and writes only the static buffers and outputs of earlier units.
        persistent : bool
            The outputs are read by other units: after recording, replay once so the graph's
            own outputs (fixed addresses) hold the values, and return those.

        Returns
        -------
        The unit's outputs (the graph's static outputs after the first call).
        """
        if not self.capture:
            return fn()
        entry = self.graphs.get(unit)
        if entry is not None:
            graph, out = entry
            graph.replay()
            return out
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = fn()
        current.wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.graphs[unit] = (graph, out)
        if persistent:
            graph.replay()
            return out
        return result
