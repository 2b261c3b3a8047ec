"""A minimal LLaDA mask predictor (non-causal Llama-style transformer) and its checkpoint I/O.

The module tree mirrors the published LLaDA-8B checkpoints so their safetensors load as is::

    model.transformer.wte.weight                      [V, d]      token embedding
    model.transformer.blocks.{i}.attn_norm.weight     [d]         RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight  [H*D, d]    (k, v: Hkv*D rows, GQA)
    model.transformer.blocks.{i}.attn_out.weight      [d, H*D]
    model.transformer.blocks.{i}.ff_norm.weight       [d]         RMSNorm before the MLP
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight [F, d]  SwiGLU: silu(ff_proj) * up_proj
    model.transformer.blocks.{i}.ff_out.weight        [d, F]
    model.transformer.ln_f.weight                     [d]
    model.transformer.ff_out.weight                   [V, d]      untied LM head

Numerics follow the reference implementation: RMSNorm and RoPE (non-interleaved, rotate_half)
run in float32 whatever the model dtype, no biases anywhere, attention is non-causal.

Attention goes through :func:`llada_ext.attention` (``backend="kernels"``) or
:func:`torch.nn.functional.scaled_dot_product_attention` (``backend="torch"``). An optional
key/value cache (:class:`KVCache`) lets the sampler run a forward over a slice of the sequence
against cached keys and values of the rest (block caching, see ``llada_ext.sampling``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LLaDAConfig, config_token_id
from .model_files import (
    DEFAULT_MAX_SHARD_BYTES,
    checked_weight_files,
    read_folder_config,
    read_weights,
    write_model_folder,
)

__all__ = ["KVCache", "LLaDAConfig", "LLaDAModel", "ModelOutput", "config_token_id"]

log = logging.getLogger(__name__)

BACKENDS = ("kernels", "torch")


def warn_if_too_long(model: nn.Module, length: int, what: str) -> None:
    """Log a warning when ``length`` tokens exceed the model's ``max_sequence_length``."""
    limit = getattr(getattr(model, "config", None), "max_sequence_length", None)
    if isinstance(limit, int) and length > limit:
        log.warning(
            "%s is %d tokens, beyond the model's max_sequence_length of %d: it was never "
            "trained on sequences this long, so expect poor results",
            what,
            length,
            limit,
        )


def model_device(model: nn.Module) -> torch.device:
    """Where a model runs: its ``.device`` (Hugging Face style), else its first parameter's."""
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


@dataclass
class ModelOutput:
    """Output of :meth:`LLaDAModel.forward`: ``logits`` [B, L, V] in the model dtype."""

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None


@dataclass
class KVCache:
    """Per-layer keys and values of one full sequence, for block-wise cached decoding.

    ``k[i]`` / ``v[i]`` are layer ``i``'s post-RoPE keys / values, [B, L, Hkv, D]. A forward
    with ``kv_cache=cache`` and no ``cache_start`` fills them; a forward with
    ``cache_start=s`` over a slice of length W overwrites positions ``[s, s + W)`` with fresh
    keys and values and lets the slice attend to the whole cached sequence.
    """

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (int64 [B'])."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference does), scaled in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables [B, T, 1, D] for integer positions [B, T] (non-interleaved)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] in float32 and return it in x's dtype."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def _kernel_attention_supported(t: torch.Tensor) -> bool:
    # the dtypes lx.attention documents and the head dims the CUDA kernels are built for (a multiple
    # of 8, at most 256); anything else takes the torch path instead of failing
    if t.device.type == "cpu":
        return t.dtype in (torch.float32, torch.bfloat16)
    if t.device.type == "cuda":
        head_dim = t.shape[-1]
        if not (t.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0):
            return False
        if head_dim > 256:
            return False
        from ._cuda import cuda_status, warn_torch_fallback

        if not cuda_status().usable:  # e.g. a driver older than the kernels' runtime
            warn_torch_fallback()
            return False
        return True
    return False


def _torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Non-causal SDPA on [B, S, H, D] tensors with the lx.attention conventions."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask = None
    has_key = None
    if key_mask is not None:
        # SDPA returns NaN for a query with no visible key, lx.attention returns 0: open such
        # rows up and zero their output afterwards (no host sync)
        has_key = key_mask.any(dim=-1)  # [B]
        attn_mask = (key_mask | ~has_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=attn_mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    out = out.transpose(1, 2)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


def _sequence_length(t: int, kv_cache: KVCache | None, cache_start: int | None) -> int:
    """Length of the sequence a forward over ``t`` tokens sees: ``t``, or in a slice pass the
    cached sequence's; ValueError when the cache arguments do not fit together."""
    if cache_start is not None and kv_cache is None:
        raise ValueError("cache_start requires kv_cache")
    if kv_cache is not None and cache_start is None and kv_cache.k:
        raise ValueError("a full pass needs an empty kv_cache")
    if cache_start is None:
        return t
    total = kv_cache.seq_len
    if total == 0:
        raise ValueError("kv_cache is empty; run a full pass with it first")
    if not 0 <= cache_start <= total - t:
        raise ValueError(
            f"slice [{cache_start}, {cache_start + t}) is outside the "
            f"cached sequence of length {total}"
        )
    return total


class LLaDABlock(nn.Module):
    """One pre-norm transformer block: non-causal GQA attention + SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        backend: str,
        cache: tuple[KVCache, int, int | None] | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kv, layer, start = cache
            if start is None:  # full pass: remember this layer's keys and values
                kv.k.append(k)
                kv.v.append(v)
            else:  # slice pass: refresh the slice in the cache, attend to everything cached
                kv.k[layer][:, start : start + t] = k
                kv.v[layer][:, start : start + t] = v
                k, v = kv.k[layer], kv.v[layer]
        if backend == "kernels" and _kernel_attention_supported(q):
            from llada_ext.ops import attention

            out = attention(q, k, v, key_mask)
        else:
            out = _torch_attention(q, k, v, key_mask)
        x = x + self.attn_out(out.reshape(b, t, self.n_heads * self.head_dim))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class LLaDAModel(nn.Module):
    """LLaDA mask predictor with Hugging Face-style calling conventions.

    Parameters
    ----------
    config : LLaDAConfig
        Architecture.
    backend : {"kernels", "torch"}
        Attention implementation: the library kernel :func:`llada_ext.attention` or PyTorch
        SDPA. Settable after construction. With ``"kernels"``, dtype/device pairs the kernel
        does not cover (e.g. float64, CUDA float32, CUDA head dims that are not a multiple of 8
        or exceed 256) use SDPA.

    Notes
    -----
    Initialisation (training from scratch): every linear and embedding weight is drawn from
    ``normal(0, config.initializer_range)``, RMSNorm weights are 1. Models built by
    :meth:`from_pretrained` skip initialisation entirely (meta device + ``assign=True``).
    """

    def __init__(self, config: LLaDAConfig, backend: str = "kernels") -> None:
        super().__init__()
        if not isinstance(config, LLaDAConfig):
            raise TypeError(f"config must be an LLaDAConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self.gradient_checkpointing = False
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
            }
        )
        if self.model.transformer.wte.weight.device.type != "meta":
            self.reset_parameters()

    # -- attributes ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @property
    def lm_head(self) -> nn.Linear:
        """The untied output projection (``model.transformer.ff_out``), weight [V, d]."""
        return self.model.transformer.ff_out

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise weights: normal(0, initializer_range); RMSNorm weights to 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # -- forward ------------------------------------------------------------------------------
    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        cache_start: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after ``ln_f``), the input of the LM head.

        Parameters
        ----------
        input_ids : torch.Tensor
            int64 [B, T].
        attention_mask : torch.Tensor, optional
            [B, L] with 1 for real tokens and 0 for padding (any dtype). Padded keys are never
            attended and RoPE positions are ``cumsum(mask) - 1``. ``L == T`` except in a slice
            pass (below), where it covers the whole cached sequence.
        kv_cache : KVCache, optional
            Without ``cache_start``: a full pass whose per-layer keys/values are stored in
            ``kv_cache`` (which must be empty). With ``cache_start=s``: ``input_ids`` is the
            slice ``[s, s + T)`` of the cached sequence; its fresh keys/values replace that
            slice in the cache and its queries attend to the whole cached sequence.
        cache_start : int, optional
            Start of the slice in the cached sequence (requires ``kv_cache``).

        Returns
        -------
        torch.Tensor
            [B, T, d_model] in the model dtype.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int64 tensor [B, T]")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        b, t = input_ids.shape
        total = _sequence_length(t, kv_cache, cache_start)
        start = 0 if cache_start is None else cache_start

        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, total):
                raise ValueError(
                    f"attention_mask must have shape {(b, total)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask.to(input_ids.device) != 0
            positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start : start + t]
        else:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        x = self.model.transformer.wte(input_ids)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.model.transformer.blocks):
            cache = None if kv_cache is None else (kv_cache, i, cache_start)
            if ckpt and cache is None:
                x = checkpoint(block, x, cos, sin, key_mask, self.backend, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask, self.backend, cache)
        return self.model.transformer.ln_f(x)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ModelOutput:
        """Logits for every position.

        Parameters
        ----------
        input_ids : torch.Tensor
            int64 [B, L].
        attention_mask : torch.Tensor, optional
            [B, L], 1 = real token, 0 = padding.

        Returns
        -------
        ModelOutput
            ``logits`` [B, L, V] in the model dtype; ``hidden_states`` is None.
        """
        return ModelOutput(logits=self.lm_head(self.forward_hidden(input_ids, attention_mask)))

    # -- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "kernels",
    ) -> LLaDAModel:
        """Load a model saved in the published LLaDA layout.

        The module tree is built on the meta device (no allocation, no initialisation), the
        safetensors are read tensor by tensor straight onto ``device`` and the parameters
        become those tensors (``load_state_dict(assign=True)``), so peak memory is one copy of
        the weights.

        Parameters
        ----------
        folder : str or PathLike
            Folder with ``config.json`` and either ``model.safetensors`` or
            ``model.safetensors.index.json`` + the shards it names.
        device : str or torch.device, optional
            Where to load the weights (default CPU).
        dtype : torch.dtype, optional
            Floating dtype of the parameters; default the checkpoint's (the embedding's
            dtype if the checkpoint mixes dtypes).
        backend : {"kernels", "torch"}
            Attention backend of the returned model.

        Returns
        -------
        LLaDAModel
            In eval mode.

        Raises
        ------
        FileNotFoundError
            Missing folder, config.json or weight files.
        ValueError
            Malformed config/index, missing or unexpected weights, or wrong shapes.
        """
        folder = Path(folder)
        config = read_folder_config(folder)
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device("cpu" if device is None else device)
        # Everything the folder declares is checked before a module is built or a byte of
        # tensor data is read: shard names, headers, and config.json against the headers.
        files = checked_weight_files(folder, config)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        model.load_state_dict(read_weights(files, device, dtype), strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_hf(cls, model: nn.Module, *, backend: str = "kernels") -> LLaDAModel:
        """Wrap a Hugging Face LLaDA model's parameters in this model, without copying them.

        Parameters
        ----------
        model : torch.nn.Module
            ``LLaDAModelLM`` from the LLaDA modeling code (``transformers`` with
            ``trust_remote_code=True``), patched by :func:`llada_ext.patch_hf_llada` or not.
        backend : {"kernels", "torch"}
            Attention backend of the returned model.

        Returns
        -------
        LLaDAModel
            Holding the very ``nn.Parameter`` objects of ``model`` (an update through either
            model is seen by both), in ``model``'s train/eval mode. Its logits equal the
            Hugging Face model's on unpadded input; unlike that code it honours
            ``attention_mask``.

        Raises
        ------
        TypeError
            ``model`` is not a Hugging Face LLaDA model.
        ValueError
            Its config describes an architecture this model does not implement, or its
            weights do not fit the config.
        """
        from .hf import llada_from_hf

        return llada_from_hf(model, backend=backend)

    def save_pretrained(
        self, folder: str | os.PathLike, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    ) -> None:
        """Write ``config.json`` and the weights in the published layout, atomically.

        Everything is first written to a temporary folder next to ``folder``. A new
        ``folder`` is then created by one rename; into an existing folder each file is moved
        with an atomic ``os.replace`` and weight files of an earlier save that the new one
        does not use are removed (other files, e.g. ``tokenizer.json``, are kept).

        Parameters
        ----------
        folder : str or PathLike
            Destination.
        max_shard_size : int
            Largest shard in bytes (default 5 GiB). Above it the weights are split into
            ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``;
            a single tensor larger than the limit gets a shard of its own.
        """
        if not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be a positive int, got {max_shard_size!r}")
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if any(t.device.type == "meta" for t in state.values()):
            raise ValueError("cannot save a model whose weights are still on the meta device")
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        write_model_folder(folder, state, config, max_shard_size)
