"""Settings and result of a training run (:class:`TrainConfig`, :class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .losses import EPS

__all__ = ["TrainConfig", "TrainResult"]


@dataclass
class TrainConfig:
    """Settings of a training run (all saved in the checkpoint and ``train_config.json``).

    Attributes
    ----------
    objective : {"pretrain", "sft"}
        Alg. 1 (all tokens maskable, 1% random-length batches) or Alg. 2 (prompt kept).
    out_dir : str
        Output folder.
    steps : int
        Total optimizer steps of the run (a resumed run continues up to this number).
    micro_batch_size : int
        Sequences per forward/backward per process.
    grad_accum : int
        Micro-batches accumulated per optimizer step (derived from ``global_batch`` when that
        is set).
    global_batch : int or None
        Sequences per optimizer step over all processes. None: ``micro_batch_size *
        grad_accum * world_size``. Either way the trainer records it, and a resumed run keeps
        the checkpoint's value at any world size by recomputing ``grad_accum``.
    lr : float
        Peak learning rate.
    min_lr_ratio : float
        Final learning rate as a fraction of ``lr``.
    warmup_steps : int
        Linear warmup steps.
    decay_frac : float
        Fraction of ``steps`` at the end spent decaying the learning rate.
    decay_shape : {"linear", "cosine", "sqrt"}
        Shape of the decay.
    weight_decay : float
        AdamW weight decay of matrices (not of norms and embeddings).
    beta1, beta2, adam_eps : float
        AdamW coefficients.
    grad_clip : float
        Clip the global gradient norm to this value (0 disables).
    seed : int
        Seed of the data order, the masks and the model initialisation.
    mask_eps : float
        Smallest masking probability ``eps`` of the forward process.
    random_length_prob : float
        Probability that a pre-training batch is cut to a random length (1% in the paper).
    precision : {"auto", "fp32", "bf16"}
        "auto": bfloat16 autocast on CUDA, float32 on the CPU.
    gradient_checkpointing : bool
        Recompute block activations in the backward pass (less memory, ~30% more compute).
    fsdp : bool
        Shard with FSDP2 (under torchrun) instead of replicating with DDP.
    save_every : int
        Write a checkpoint every this many steps (0: only at the end / on interrupt).
    keep_last : int
        Checkpoints to keep.
    progress : bool
        Show the progress bar (rank 0 only).
    shuffle : bool
        Shuffle the data order each epoch.
    """

    objective: str = "pretrain"
    out_dir: str = "runs/llada"
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch: int | None = None
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_frac: float = 0.2
    decay_shape: str = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    mask_eps: float = EPS
    random_length_prob: float = 0.01
    precision: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    save_every: int = 500
    keep_last: int = 3
    progress: bool = True
    shuffle: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        if self.objective not in ("pretrain", "sft"):
            raise ValueError(f"objective must be 'pretrain' or 'sft', got {self.objective!r}")
        for name in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        gb = self.global_batch
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int) or gb < 1):
            raise ValueError(f"global_batch must be a positive int or None, got {gb!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_shape not in ("linear", "cosine", "sqrt"):
            raise ValueError(
                f"decay_shape must be linear, cosine or sqrt, got {self.decay_shape!r}"
            )
        if not 0.0 < self.mask_eps < 1.0:
            raise ValueError(f"mask_eps must be in (0, 1), got {self.mask_eps}")
        if not 0.0 <= self.random_length_prob <= 1.0:
            raise ValueError(f"random_length_prob must be in [0, 1], got {self.random_length_prob}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict` output (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did.

    Attributes
    ----------
    step : int
        Optimizer steps done in total (including those before a resume).
    losses : list of float
        Loss of every step run in this call, averaged over ranks.
    interrupted : bool
        True when stopped by Ctrl-C / SIGTERM (a checkpoint was written).
    checkpoint : Path or None
        The last checkpoint written (rank 0).
    tokens_per_second : float
        Training throughput of this call over all ranks (tokens of the input batches).
    """

    step: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    tokens_per_second: float = 0.0
