"""The order of training sequences: a keyed permutation of ``range(n)`` evaluated one position
at a time, and :class:`DataStream`, the resumable, rank-sharded stream built on it.

The data order needs "the sequence at position p of epoch e" for a handful of positions per
step. Drawing a full ``randperm(n)`` per epoch costs ``8 n`` bytes and ``O(n)`` time on every
rank; for token shards of billions of tokens that is gigabytes. Here position ``i`` of the
permutation is computed directly: a balanced Feistel network over the smallest power-of-four
domain holding ``n`` (a bijection on that domain), with cycle-walking to stay inside
``[0, n)`` (a bijection on ``[0, n)`` as well, since every cycle through a point below ``n``
comes back to one). The domain is smaller than ``4 n``, so a position needs fewer than four
network evaluations on average. Round functions are splitmix64 hashes of the round key and
the half-block, so the permutation depends only on ``(n, keys)``: the same on every rank,
machine and run, with O(1) memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .losses import keyed_generator

__all__ = ["Batch", "DataStream", "SequenceSource", "keyed_permutation"]

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _splitmix64_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (arithmetic wraps modulo 2**64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _round_keys(keys: tuple[int, ...]) -> list[np.uint64]:
    h = 0x6B657965645F7065  # "keyed_pe"
    for k in keys:
        h = _splitmix64_int(h ^ (int(k) & _MASK64))
    out = []
    for r in range(_ROUNDS):
        h = _splitmix64_int(h ^ r)
        out.append(np.uint64(h))
    return out


def _feistel(x: np.ndarray, half_bits: int, round_keys: list[np.uint64]) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in round_keys:
        left, right = right, left ^ (_splitmix64(right ^ k) & mask)
    return (left << shift) | right


def keyed_permutation(positions: np.ndarray | list[int], n: int, *keys: int) -> np.ndarray:
    """Entries ``perm[positions]`` of a pseudo-random permutation ``perm`` of ``range(n)``.

    Parameters
    ----------
    positions : array-like of int
        Positions in ``[0, n)``.
    n : int
        Size of the permuted range (>= 1).
    *keys : int
        Non-negative integers selecting the permutation, e.g. ``(seed, stream, epoch)``.

    Returns
    -------
    numpy.ndarray
        int64, same shape as ``positions``: distinct positions map to distinct values.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(pos)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    rk = _round_keys(keys)
    x = pos.astype(np.uint64).ravel()
    x = _feistel(x, half_bits, rk)
    outside = x >= np.uint64(n)
    while outside.any():  # cycle-walking: expected < 4 passes, each over fewer elements
        x[outside] = _feistel(x[outside], half_bits, rk)
        outside = x >= np.uint64(n)
    return x.astype(np.int64).reshape(pos.shape)


class SequenceSource(Protocol):
    """What :class:`DataStream` and the trainer read from a dataset."""

    def __len__(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    @property
    def is_sft(self) -> bool: ...

    def rows(self, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]: ...


@dataclass
class Batch:
    """One micro-batch of one rank.

    Attributes
    ----------
    input_ids : Tensor
        int64 ``[b, L]`` clean tokens.
    prompt_lengths : Tensor or None
        int64 ``[b]`` for SFT.
    keys : list of int
        Global stream position of each row (the key of its mask noise).
    """

    input_ids: Tensor
    prompt_lengths: Tensor | None
    keys: list[int]


class DataStream:
    """Deterministic, resumable, rank-sharded order over a :class:`SequenceDataset` (or any
    :class:`SequenceSource`, e.g. memory-mapped token shards).

    Position ``p`` of the stream is sequence ``perm_e[p % N]`` with ``e = p // N`` and
    ``perm_e`` a permutation keyed by ``(seed, e)``, computed per position without holding an
    array of ``N`` entries (``order_version`` 2; version 1, a ``torch.randperm`` per epoch, is
    what checkpoints written before version 2 existed resume with). One optimizer step consumes
    ``world_size * grad_accum * micro_batch`` consecutive positions; micro-batch ``m`` of rank
    ``r`` takes the ``micro_batch`` positions starting at ``(m * world_size + r) * micro_batch``.
    The sequences of a step and their noise keys are therefore the same for any split of the
    global batch over ranks and accumulation steps.

    Parameters
    ----------
    dataset : SequenceSource
        The sequences.
    seed : int
        Order seed.
    shuffle : bool
        If False, every epoch visits the sequences in stored order.
    order_version : int
        2 (default): keyed per-position permutation; 1: the per-epoch ``torch.randperm``.
    """

    ORDER_VERSION = 2

    def __init__(
        self,
        dataset: SequenceSource,
        *,
        seed: int,
        shuffle: bool = True,
        order_version: int = ORDER_VERSION,
    ) -> None:
        if order_version not in (1, 2):
            raise DataError(f"unknown data order version {order_version}")
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.order_version = int(order_version)
        self.position = 0
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def _order(self, epoch: int) -> Tensor:
        """The whole permutation of ``epoch`` (order_version 1 only)."""
        if self._perm_epoch != epoch:
            g = keyed_generator(self.seed, 0x6F72646572, epoch)  # "order"
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at stream positions ``start .. start + count - 1``."""
        n = len(self.dataset)
        pos = np.arange(start, start + count, dtype=np.int64)
        if not self.shuffle:
            return (pos % n).tolist()
        if self.order_version == 1:
            return [int(self._order(int(p) // n)[int(p) % n]) for p in pos]
        out = np.empty_like(pos)
        epochs = pos // n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = keyed_permutation(pos[sel] % n, n, self.seed, 0x6F72646572, int(e))
        return out.tolist()

    def step_batches(
        self, *, micro_batch: int, grad_accum: int, rank: int = 0, world_size: int = 1
    ) -> list[Batch]:
        """The micro-batches of this rank for the next optimizer step (does not advance).

        Parameters
        ----------
        micro_batch : int
            Sequences per micro-batch per rank.
        grad_accum : int
            Micro-batches per optimizer step.
        rank, world_size : int
            This process's rank and the number of processes.

        Returns
        -------
        list of Batch
            ``grad_accum`` micro-batches.
        """
        out = []
        for m in range(grad_accum):
            start = self.position + (m * world_size + rank) * micro_batch
            ids, pl = self.dataset.rows(self.indices(start, micro_batch))
            out.append(Batch(ids, pl, list(range(start, start + micro_batch))))
        return out

    def advance(self, count: int) -> None:
        """Move the stream forward by ``count`` positions."""
        self.position += int(count)

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the data so far."""
        return self.position / len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        """The stream's state (for checkpoints)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "num_sequences": len(self.dataset),
            "order_version": self.order_version,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a state from :meth:`state_dict` (the data must be the same)."""
        if int(state["num_sequences"]) != len(self.dataset):
            raise DataError(
                f"the checkpoint was trained on {state['num_sequences']} sequences but the data "
                f"now has {len(self.dataset)}: resume with the same data and sequence length"
            )
        version = int(state.get("order_version", 1))  # absent: written before version 2
        if version not in (1, 2):
            raise DataError(f"the checkpoint's data order version {version} is unknown")
        self.seed = int(state["seed"])
        self.position = int(state["position"])
        self.order_version = version
        self._perm_epoch = -1
