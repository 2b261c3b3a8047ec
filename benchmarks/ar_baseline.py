"""Autoregressive baseline for the decoding benchmarks: a causal Llama-style model with the
same dimensions and the same layers as the LLaDA model, decoded with a static KV cache.

The model reuses ``llada_ext.model``'s RMSNorm and RoPE (float32 norm and rotation, same
SwiGLU MLP, no biases), so the only difference to the diffusion model is the causal mask and
the cache. Decoding is gpt-fast style: one prefill over the prompt, then a fixed-shape
one-token step (the cache is preallocated for prompt + answer and masked by position) that
``torch.compile(mode="reduce-overhead")`` turns into a CUDA graph. When ``transformers`` is
installed, ``LlamaForCausalLM.generate`` with a static cache is measured too, as the baseline
most users run.

Weights are random: at a fixed number of tokens per step the throughput does not depend on
their values (no early stop: exactly ``gen_length`` tokens are decoded).

Usage::

    python benchmarks/ar_baseline.py --model 8b --prompt 512 --gen 256 --batch 1
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import time_fn  # noqa: E402

from llada_ext.model import (  # noqa: E402
    LLaDABlock,
    LLaDAConfig,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
)

RANDOM_WEIGHTS_NOTE = (
    "random weights: decoding speed does not depend on weight values at a "
    "fixed number of tokens per step (no early stop)"
)


class KVCacheStatic(nn.Module):
    """Preallocated keys/values [B, Hkv, max_len, D] written at integer positions."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # index_copy_ along the sequence axis: the shape of the cache never changes, so the
        # decode step stays graph-capturable
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class CausalBlock(LLaDABlock):
    """LLaDA's block (pre-norm GQA attention + SwiGLU MLP, the very same layers) with a
    causal, cached attention in place of the non-causal one."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__(cfg)
        self.cache: Optional[KVCacheStatic] = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        assert self.cache is not None, "call ARModel.setup_cache first"
        k, v = self.cache.update(input_pos, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )
        x = x + self.attn_out(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class ARModel(nn.Module):
    """Causal twin of :class:`llada_ext.LLaDAModel` (same sizes, same layers)."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.max_len = 0

    def setup_cache(self, batch: int, max_len: int) -> None:
        """(Re)allocate the static caches and the causal mask table for ``max_len`` tokens."""
        p = self.lm_head.weight
        for blk in self.blocks:
            blk.cache = None  # free the old cache before allocating the new one
        for blk in self.blocks:
            blk.cache = KVCacheStatic(
                batch, self.config.n_kv_heads, max_len, self.config.head_dim, p.dtype, p.device
            )
        # a buffer, so the compiled step treats it as a static input (no copy per replay)
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril()
        self.register_buffer("causal", causal, persistent=False)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for tokens ``idx`` [B, T] at positions ``input_pos`` [T]."""
        b, t = idx.shape
        mask = self.causal[None, None, input_pos]  # [1, 1, T, max_len]
        cos, sin = rope_cos_sin(
            input_pos[None].expand(b, t), self.config.head_dim, self.config.rope_theta
        )
        x = self.wte(idx)
        for blk in self.blocks:
            x = blk(x, cos, sin, input_pos, mask)
        return self.lm_head(self.ln_f(x))


def build_ar_model(
    cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> ARModel:
    """Random-weight causal model, allocated directly in ``dtype`` on ``device``."""
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = ARModel(cfg)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.initializer_range)
    return model.eval().requires_grad_(False)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def weight_bytes_per_step(model: nn.Module, vocab: int, d_model: int) -> int:
    """Bytes of weights one decoding step reads: every parameter except the embedding table
    (of which a step reads only the rows of its tokens)."""
    p = next(model.parameters())
    n = sum(t.numel() for t in model.parameters()) - vocab * d_model
    return n * p.element_size()


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------


def _prefill(model: ARModel, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    return model(idx, input_pos)[:, -1].argmax(-1, keepdim=True)


def _decode_one(model: ARModel, cur: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    return model(cur, input_pos)[:, -1].argmax(-1, keepdim=True)


class ARDecoder:
    """Greedy decoding with the static cache; ``compile=True`` graph-captures the step."""

    def __init__(self, model: ARModel, compile: bool) -> None:
        self.model = model
        self.compiled = compile
        self.decode_one = _decode_one
        self.prefill = _prefill
        if compile:
            # every (batch, prompt + answer) of a grid is a new shape and a recompile; the
            # default limit (8) would silently fall back to eager after that many
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            # the prefill runs once per answer and stays eager; the step runs gen_length times
            self.decode_one = torch.compile(_decode_one, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, gen_length: int) -> tuple[torch.Tensor, float]:
        """Decode ``gen_length`` tokens after ``prompt`` [B, P].

        Returns
        -------
        (Tensor, float)
            int64 [B, P + gen_length] and the seconds the prefill took (device-synced).
        """
        b, plen = prompt.shape
        total = plen + gen_length
        if self.model.max_len != total or self.model.blocks[0].cache.k.shape[0] != b:
            self.model.setup_cache(b, total)
        dev = prompt.device
        t0 = time.perf_counter()
        cur = self.prefill(self.model, prompt, torch.arange(plen, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t0
        out = [cur.clone()]
        input_pos = torch.tensor([plen], device=dev, dtype=torch.int64)
        for _ in range(gen_length - 1):
            if self.compiled and dev.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            nxt = self.decode_one(self.model, cur, input_pos)
            # the graph's output buffer is reused by the next replay: keep copies (gpt-fast)
            out.append(nxt.clone())
            cur = nxt.clone()
            input_pos += 1
        return torch.cat([prompt] + out, dim=1), prefill_s


def hf_baseline(
    cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype
) -> tuple[Optional[Any], str]:
    """``LlamaForCausalLM`` with the same dimensions, or (None, reason) without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        return None, f"transformers not importable ({type(e).__name__})"
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    return model.eval().requires_grad_(False), "ok"


@torch.no_grad()
def hf_generate(model: Any, prompt: torch.Tensor, gen_length: int) -> torch.Tensor:
    """Greedy ``generate`` with a static cache and exactly ``gen_length`` new tokens."""
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=gen_length,
        min_new_tokens=gen_length,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )


# ---------------------------------------------------------------------------------------
# stand-alone measurement
# ---------------------------------------------------------------------------------------


def time_generate(fn: Any, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory bytes) of ``fn()`` after one warm-up call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = time_fn(fn, device, warmup=1, reps=repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return sec, float(peak)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="KV-cached autoregressive decoding baseline")
    ap.add_argument("--model", default="tiny", choices=["tiny", "1b", "8b"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager decode step")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LLaDAConfig.preset(args.model)
    print(RANDOM_WEIGHTS_NOTE)
    model = build_ar_model(cfg, device, dtype)
    compile_ = device.type == "cuda" and not args.no_compile
    dec = ARDecoder(model, compile=compile_)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    sec, peak = time_generate(lambda: dec.generate(prompt, args.gen), device, args.repeats)
    res = {
        "method": "ar-static-kv" + ("-compiled" if compile_ else "-eager"),
        "model": args.model,
        "batch": args.batch,
        "prompt": args.prompt,
        "gen": args.gen,
        "tokens_per_s": args.batch * args.gen / sec,
        "ms_per_token_step": 1e3 * sec / args.gen,
        "peak_mem_bytes": peak,
    }
    print(json.dumps(res, indent=2))
    if args.hf:
        del dec, model
        gc.collect()
        hf, why = hf_baseline(cfg, device, dtype)
        if hf is None:
            print(f"transformers baseline skipped: {why}")
        else:
            sec, peak = time_generate(
                lambda: hf_generate(hf, prompt, args.gen), device, args.repeats
            )
            print(
                json.dumps(
                    {
                        "method": "hf-llama-static-cache",
                        "tokens_per_s": args.batch * args.gen / sec,
                    },
                    indent=2,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
