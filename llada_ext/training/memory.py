"""Expected per-GPU memory of a training run, from the architecture alone (meta device).

What ``llada-ext train --dry-run`` prints. The model is built on the meta device, so the
estimate of an 8B model costs nothing; every number follows from the parameter shapes and the
run's sizes:

- Parameters, gradients and AdamW state are float32 (the optimizer steps float32 master
  weights; FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` only
  changes the dtype of the unsharded copies used for compute). FSDP2 splits each parameter
  along its first dimension into ``world_size`` chunks of ``ceil(rows / world_size)`` rows;
  the numbers are those of rank 0, which holds the largest chunks. Without FSDP each GPU holds
  everything (DDP replicates).
- FSDP buffers: the unsharded compute copies (bfloat16) of the root unit (embedding, final
  norm, LM head; it stays unsharded through forward and backward) and of two blocks (the one
  running and the prefetched one), plus their unsharded gradients before the reduce-scatter.
- Activations, per micro-batch of ``micro_batch_size * seq_len`` tokens, are the tensors
  autograd keeps for the backward pass, per token and block: the RMSNorm inputs in float32
  and their normalised outputs, q, k, v, the attention output and its float32 log-sum-exp
  (the fused attention keeps no [L, L] matrix), and the four [mlp_hidden] SwiGLU tensors.
  The fused LM-head loss never materialises the [tokens, vocab] logits. With activation
  checkpointing each block keeps only its input, and one block's activations exist again
  while it is recomputed. Short-lived workspace of the backward pass is not included; leave
  10-20% headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import LLaDAConfig, LLaDAModel
from .errors import check_positive_ints

__all__ = ["MemoryEstimate", "activation_bytes_per_token", "estimate_training_memory"]

GiB = 1024**3


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of one training process (see the module docstring for the model).

    Attributes
    ----------
    num_parameters : int
        Parameters of the whole model.
    local_parameters : int
        Parameters held by one GPU (rank 0's FSDP2 shards, or all of them without FSDP).
    world_size, micro_batch_size, seq_len : int
        The sizes the estimate is for.
    fsdp, bf16 : bool
        FSDP2 sharding; bfloat16 compute.
    parameters, gradients, optimizer : int
        Bytes of the float32 parameters, gradients and AdamW moments (2 per parameter).
    buffers : int
        Bytes of FSDP's unsharded compute copies and gradients (0 without FSDP).
    activations, activations_checkpointed : int
        Bytes of activations kept for backward, without and with activation checkpointing.
    """

    num_parameters: int
    local_parameters: int
    world_size: int
    micro_batch_size: int
    seq_len: int
    fsdp: bool
    bf16: bool
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    activations_checkpointed: int

    def total(self, checkpointing: bool = False) -> int:
        """Bytes per GPU, with or without activation checkpointing."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.parameters + self.gradients + self.optimizer + self.buffers + acts

    def report(self) -> str:
        """The table ``--dry-run`` prints (GiB per GPU)."""
        shard = ", sharded" if self.fsdp else ""
        rows = [
            (f"parameters (fp32{shard})", self.parameters),
            (f"gradients (fp32{shard})", self.gradients),
            (f"AdamW state (2 x fp32{shard})", self.optimizer),
        ]
        if self.fsdp:
            rows.append(("FSDP unsharded copies (root + 2 blocks)", self.buffers))
        tokens = f"{self.micro_batch_size} x {self.seq_len} tokens"
        rows += [
            (f"activations ({tokens})", self.activations),
            ("activations with --gradient-checkpointing", self.activations_checkpointed),
            ("total", self.total(False)),
            ("total with --gradient-checkpointing", self.total(True)),
        ]
        return "\n".join(f"  {name:<44}{value / GiB:10.2f} GiB" for name, value in rows)


def _shard_rows(shape: torch.Size, world_size: int) -> int:
    """Elements of rank 0's FSDP2 shard of a parameter (dim 0 split in ceil-sized chunks)."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world_size) * rest


def activation_bytes_per_token(config: LLaDAConfig, *, bf16: bool) -> tuple[int, int, int]:
    """Bytes per token that autograd keeps for the backward pass.

    Parameters
    ----------
    config : LLaDAConfig
        The architecture.
    bf16 : bool
        bfloat16 compute (else float32).

    Returns
    -------
    tuple of int
        ``(block, checkpointed_block, outside)``: one block without activation checkpointing,
        one block with it (its input only), and everything outside the blocks (final norm,
        RoPE tables, the fused loss's per-token values).
    """
    b = 2 if bf16 else 4
    d, mlp, heads = config.d_model, config.mlp_hidden_size, config.n_heads
    kv = config.n_kv_heads * config.head_dim
    norm = 4 * d + b * d + b * d  # float32 input, normalised input, output (the next input)
    attention = b * (d + 2 * kv) + b * d + 4 * heads  # q, k, v, output, float32 lse
    swiglu = 4 * b * mlp  # gate, silu(gate), up, their product
    block = 2 * norm + attention + swiglu
    rope = 2 * 4 * config.head_dim  # float32 cos and sin, shared by the blocks
    outside = norm + rope + 16  # + targets, weights, log-sum-exp of the loss
    return block, b * d, outside


def estimate_training_memory(
    config: LLaDAConfig,
    *,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    fsdp: bool = True,
    bf16: bool = True,
) -> MemoryEstimate:
    """Per-GPU memory of training ``config`` with AdamW, without allocating the model.

    Parameters
    ----------
    config : LLaDAConfig
        The architecture (built on the meta device).
    world_size : int
        Number of GPUs.
    micro_batch_size, seq_len : int
        Sequences per forward/backward per GPU and their length.
    fsdp : bool
        FSDP2 sharding over ``world_size`` (needs ``world_size > 1`` to shard anything).
    bf16 : bool
        bfloat16 compute (FSDP2 mixed precision or autocast); False: float32 activations.

    Returns
    -------
    MemoryEstimate
    """
    check_positive_ints(world_size=world_size, micro_batch_size=micro_batch_size, seq_len=seq_len)
    with torch.device("meta"):
        model = LLaDAModel(config, backend="torch")
    shapes = [p.shape for p in model.parameters()]
    total = sum(math.prod(s) for s in shapes)
    shards = fsdp and world_size > 1
    local = sum(_shard_rows(s, world_size) for s in shapes) if shards else total
    buffers = 0
    if shards:
        block = sum(p.numel() for p in model.model.transformer.blocks[0].parameters())
        root = total - config.n_layers * block
        compute = 2 if bf16 else 4
        buffers = 2 * compute * (root + 2 * block)  # parameters and their gradients
    block, kept, outside = activation_bytes_per_token(config, bf16=bf16)
    tokens = micro_batch_size * seq_len
    activations = tokens * (config.n_layers * block + outside)
    # checkpointed: each block keeps its input; one block is recomputed at a time in backward
    checkpointed = tokens * (config.n_layers * kept + outside + block)
    return MemoryEstimate(
        num_parameters=total,
        local_parameters=local,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        fsdp=shards,
        bf16=bf16,
        parameters=4 * local,
        gradients=4 * local,
        optimizer=8 * local,
        buffers=buffers,
        activations=activations,
        activations_checkpointed=checkpointed,
    )
