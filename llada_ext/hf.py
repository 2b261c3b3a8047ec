"""Drop-in use with the Hugging Face LLaDA model (``transformers`` with ``trust_remote_code``).

Three ways in, from the lightest to the fullest:

- :func:`patch_hf_llada` swaps the attention of a loaded Hugging Face LLaDA model for
  :func:`llada_ext.attention`, in place, in the style of Liger-Kernel's
  ``apply_liger_kernel_to_llama``. Everything else in the model stays as it is.
- :func:`llada_ext.generate`, :func:`llada_ext.log_likelihood` and the lm-eval adapter accept
  that model (patched or not) directly: any model whose call returns ``.logits``.
- :meth:`llada_ext.LLaDAModel.from_hf` wraps the same parameters (shared, not copied) in this
  library's model, which adds the fast paths: the fused LM-head loss, prefix/dual caching and
  CUDA graphs in the sampler.

::

    from transformers import AutoModel
    import llada_ext as lx

    hf = AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True,
                                   torch_dtype=torch.bfloat16)
    lx.patch_hf_llada(hf)                  # attention through the library kernel
    out = lx.generate(hf, prompt_ids, gen_length=128, steps=128, block_length=32)
    model = lx.LLaDAModel.from_hf(hf)      # same weights, the library's model

The Hugging Face code ignores ``attention_mask`` (every key is attended, positions are
``0..L-1``); the patched model keeps that behaviour, so it computes what it computed before.
:class:`llada_ext.LLaDAModel` honours the mask, so the two agree on unpadded input.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

__all__ = ["config_from_hf", "is_hf_llada", "llada_from_hf", "patch_hf_llada", "unpatch_hf_llada"]

log = logging.getLogger(__name__)

_ORIGINAL = "_llada_ext_original_sdpa"


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The attention blocks of a Hugging Face LLaDA model (``LLaDAModelLM`` or its inner
    ``LLaDAModel``): modules with the reference code's ``_scaled_dot_product_attention``."""
    return [
        m
        for m in model.modules()
        if callable(getattr(m, "_scaled_dot_product_attention", None))
        and hasattr(getattr(m, "config", None), "n_heads")
    ]


def is_hf_llada(model: object) -> bool:
    """True if ``model`` is a Hugging Face LLaDA model (the reference modeling code)."""
    return isinstance(model, nn.Module) and bool(_blocks(model))


def _key_mask(attn_mask: torch.Tensor, b: int, sk: int) -> torch.Tensor | None:
    """A boolean per-key mask [B, Sk] equivalent to ``attn_mask``, or None if it is more than
    a per-key mask (then the original attention runs)."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        return None
    if attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[-1] != sk:
        return None
    return attn_mask.expand(b, 1, 1, sk).reshape(b, sk)


def _lx_sdpa(
    self: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """The reference block's attention on [B, H, S, D] tensors, through lx.attention where the
    kernel covers the call, else through the block's own implementation."""
    from .model import _kernel_attention_supported
    from .ops import attention

    key_mask = None
    usable = (
        not is_causal
        and dropout_p == 0.0
        and q.dtype == k.dtype == v.dtype
        and _kernel_attention_supported(q)
    )
    if usable and attn_mask is not None:
        key_mask = _key_mask(attn_mask, q.shape[0], k.shape[2])
        usable = key_mask is not None
    if not usable:
        return getattr(self, _ORIGINAL)(q, k, v, attn_mask, dropout_p, is_causal)
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
    return out.transpose(1, 2)


def patch_hf_llada(model: nn.Module) -> nn.Module:
    """Run a Hugging Face LLaDA model's attention through :func:`llada_ext.attention`.

    Every attention block of ``model`` gets its ``_scaled_dot_product_attention`` replaced,
    in place. Calls the kernel does not cover (dropout in training mode, a mask that is not
    per key, a dtype/device pair the kernel does not cover) still take the model's own path.
    Patching twice is harmless; :func:`unpatch_hf_llada` restores the original.

    Parameters
    ----------
    model : torch.nn.Module
        A ``LLaDAModelLM`` loaded through ``transformers`` (``trust_remote_code=True``) or the
        reference modeling code, or its inner ``.model``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        ``model`` is not a Hugging Face LLaDA model.
    """
    blocks = _blocks(model) if isinstance(model, nn.Module) else []
    if not blocks:
        raise TypeError(
            "model must be a Hugging Face LLaDA model (LLaDAModelLM from the LLaDA modeling "
            f"code), got {type(model).__name__}"
        )
    for block in blocks:
        if getattr(block, _ORIGINAL, None) is None:
            setattr(block, _ORIGINAL, block._scaled_dot_product_attention)
            block._scaled_dot_product_attention = types.MethodType(_lx_sdpa, block)
    log.info("patched %d attention blocks to use llada_ext.attention", len(blocks))
    return model


def unpatch_hf_llada(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_hf_llada` (a model that was never patched is returned unchanged)."""
    blocks = _blocks(model) if isinstance(model, nn.Module) else []
    if not blocks:
        raise TypeError(f"model must be a Hugging Face LLaDA model, got {type(model).__name__}")
    for block in blocks:
        original = getattr(block, _ORIGINAL, None)
        if original is not None:
            del block._scaled_dot_product_attention  # the instance attribute: class method again
            setattr(block, _ORIGINAL, None)
    return model


def config_from_hf(config: Any) -> Any:
    """An :class:`llada_ext.LLaDAConfig` from a Hugging Face LLaDA config (or its dict).

    Raises
    ------
    ValueError
        The config describes an architecture this library does not implement (named).
    TypeError
        ``config`` is neither a ``PretrainedConfig`` nor a dict.
    """
    from .model import LLaDAConfig

    data = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(data, dict):
        raise TypeError(
            f"config must be a Hugging Face LLaDA config or a dict, got {type(config).__name__}"
        )
    return LLaDAConfig.from_dict(data)


def llada_from_hf(model: nn.Module, *, backend: str = "kernels") -> Any:
    """Implementation of :meth:`llada_ext.LLaDAModel.from_hf` (see there)."""
    from .model import LLaDAModel

    if not is_hf_llada(model):
        raise TypeError(
            f"model must be a Hugging Face LLaDA model (LLaDAModelLM), got {type(model).__name__}"
        )
    if not hasattr(model, "config") or not hasattr(getattr(model, "model", None), "transformer"):
        raise TypeError("model must be the LLaDAModelLM wrapper (with .config and .model)")
    config = config_from_hf(model.config)
    with torch.device("meta"):
        out = LLaDAModel(config, backend=backend)
    state = model.state_dict(keep_vars=True)
    want = out.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(
            f"the Hugging Face model's weights do not fit its config: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, t in want.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(
                f"weight {name} has shape {tuple(state[name].shape)}, the config implies "
                f"{tuple(t.shape)}"
            )
    # assign=True with the Parameter objects themselves: both models hold the same tensors
    out.load_state_dict(state, strict=True, assign=True)
    return out.train(model.training)
