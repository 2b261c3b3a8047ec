"""Tests of the LLaDA model (llada_ext.model) and the tokenizers (llada_ext.tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import llada_config, vary_norm_weights

import llada_ext as lx
from llada_ext.model import KVCache, LLaDAConfig, LLaDAModel
from llada_ext.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------
# plain float64 reference of the LLaDA forward, written from the architecture description
# ------------------------------------------------------------------------------------------
def reference_logits(
    state: dict, cfg: LLaDAConfig, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 logits [B, L, V] from a state dict with the published weight names."""
    sd = {k: v.detach().to("cpu", torch.float64) for k, v in state.items()}
    ids = ids.cpu()
    b, n = ids.shape
    hq, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    keep = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.cpu().bool()
    pos = (keep.long().cumsum(-1) - 1).clamp_min(0).double()
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[..., None] * inv  # [B, L, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # t [B, L, H, hd]; non-interleaved halves
        a, c = t[..., : hd // 2], t[..., hd // 2 :]
        co, si = cos[:, :, None], sin[:, :, None]
        return torch.cat([a * co - c * si, c * co + a * si], -1)

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    p = "model.transformer."
    x = sd[p + "wte.weight"][ids]
    for i in range(cfg.n_layers):
        q_ = f"{p}blocks.{i}."
        h = rms(x, sd[q_ + "attn_norm.weight"])
        q = rope((h @ sd[q_ + "q_proj.weight"].T).view(b, n, hq, hd))
        k = rope((h @ sd[q_ + "k_proj.weight"].T).view(b, n, hkv, hd))
        v = (h @ sd[q_ + "v_proj.weight"].T).view(b, n, hkv, hd)
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        a = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v).reshape(b, n, hq * hd)
        x = x + a @ sd[q_ + "attn_out.weight"].T
        h = rms(x, sd[q_ + "ff_norm.weight"])
        g = h @ sd[q_ + "ff_proj.weight"].T
        x = (
            x
            + (g * torch.sigmoid(g) * (h @ sd[q_ + "up_proj.weight"].T))
            @ sd[q_ + "ff_out.weight"].T
        )
    x = rms(x, sd[p + "ln_f.weight"])
    return x @ sd[p + "ff_out.weight"].T


def small_config(**kw) -> LLaDAConfig:
    sizes = dict(
        d_model=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        mlp_hidden_size=72,
        vocab_size=67,
        max_sequence_length=64,
        rope_theta=1000.0,
        initializer_range=0.2,
    )
    return llada_config(**{**sizes, **kw})


def make_model(backend: str = "torch", seed: int = 0, **kw) -> LLaDAModel:
    torch.manual_seed(seed)
    return vary_norm_weights(LLaDAModel(small_config(**kw), backend=backend).eval())


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def special_ids(c) -> tuple:
    """(vocab, mask, EOS, pad, BOS, EoT) of a config or a tokenizer."""
    return (
        c.vocab_size,
        c.mask_token_id,
        c.eos_token_id,
        c.pad_token_id,
        c.bos_token_id,
        c.eot_token_id,
    )


def test_presets():
    tiny = LLaDAConfig.preset("tiny")
    assert special_ids(tiny) == (260, 258, 257, 257, 256, 259)
    assert tiny.head_dim == tiny.d_model // tiny.n_heads
    assert special_ids(ByteTokenizer()) == special_ids(tiny)
    big = LLaDAConfig.preset("8b")
    assert (
        big.d_model,
        big.n_layers,
        big.n_heads,
        big.n_kv_heads,
        big.head_dim,
        big.mlp_hidden_size,
        big.rope_theta,
        big.rms_norm_eps,
    ) == (4096, 32, 32, 32, 128, 12288, 500000.0, 1e-5)
    assert special_ids(big) == (126464, 126336, 126081, 126081, 126080, 126348)
    with torch.device("meta"):
        n8 = LLaDAModel(big).num_parameters()
        n1 = LLaDAModel(LLaDAConfig.preset("1b")).num_parameters()
    assert 7.9e9 < n8 < 8.1e9
    assert 0.9e9 < n1 < 1.6e9
    with pytest.raises(ValueError, match="preset"):
        LLaDAConfig.preset("70b")


def test_config_dict_round_trip_and_published_format():
    cfg = small_config()
    d = cfg.to_dict()
    assert d["model_type"] == "llada" and d["architectures"] == ["LLaDAModelLM"]
    for key in (
        "d_model",
        "n_heads",
        "n_kv_heads",
        "n_layers",
        "mlp_hidden_size",
        "vocab_size",
        "embedding_size",
        "max_sequence_length",
        "rope_theta",
        "rms_norm_eps",
        "mask_token_id",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
    ):
        assert key in d
    assert LLaDAConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a published-style dict: unknown keys ignored, absent keys take the LLaDA-8B defaults
    published = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 1,
        "mlp_hidden_size": 96,
        "vocab_size": 200,
        "embedding_size": 208,
        "mask_token_id": 199,
        "eos_token_id": 198,
        "pad_token_id": 198,
        "bos_token_id": 197,
        "n_kv_heads": 4,
        "activation_type": "silu",
        "block_type": "llama",
        "init_std": 0.01,
        "flash_attention": False,
        "model_type": "llada",
    }
    c2 = LLaDAConfig.from_dict(published)
    assert c2.vocab_size == 208  # the weights have embedding_size rows
    assert c2.rms_norm_eps == 1e-5 and c2.rope_theta == 500000.0
    assert c2.initializer_range == 0.01
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig(**{**small_config().__dict__, "n_kv_heads": 4})
    with pytest.raises(ValueError, match="mask_token_id"):
        LLaDAConfig(**{**small_config().__dict__, "mask_token_id": 67})


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------
def test_state_dict_names():
    model = make_model()
    cfg = model.config
    names = set(model.state_dict())
    expected = {
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
    }
    for i in range(cfg.n_layers):
        for part in (
            "attn_norm",
            "q_proj",
            "k_proj",
            "v_proj",
            "attn_out",
            "ff_norm",
            "ff_proj",
            "up_proj",
            "ff_out",
        ):
            expected.add(f"model.transformer.blocks.{i}.{part}.weight")
    assert names == expected
    assert model.lm_head.weight.shape == (cfg.vocab_size, cfg.d_model)
    assert (
        model.lm_head.weight is model.state_dict(keep_vars=True)["model.transformer.ff_out.weight"]
    )
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.backend == "torch" and model.gradient_checkpointing is False
    with pytest.raises(ValueError, match="backend"):
        model.backend = "triton"


def test_initialisation_std():
    torch.manual_seed(1)
    model = LLaDAModel(small_config(d_model=96, n_heads=6, initializer_range=0.03))
    w = model.model.transformer.blocks[0].ff_proj.weight
    assert abs(w.std().item() - 0.03) < 0.003 and abs(w.mean().item()) < 0.003
    assert torch.equal(model.model.transformer.ln_f.weight, torch.ones(96))


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_logits_match_float64_reference(backend):
    model = make_model(backend)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    out = model(ids, attention_mask=mask)
    assert out.logits.shape == (3, 13, cfg.vocab_size) and out.logits.dtype == torch.float32
    hidden = model.forward_hidden(ids, mask)
    assert hidden.shape == (3, 13, cfg.d_model)
    ref = reference_logits(model.state_dict(), cfg, ids, mask)
    err = (out.logits.double() - ref).abs().max().item()
    assert err < 2e-4 * ref.abs().max().item(), err
    ref_nomask = reference_logits(model.state_dict(), cfg, ids)
    err = (model(ids).logits.double() - ref_nomask).abs().max().item()
    assert err < 2e-4 * ref_nomask.abs().max().item(), err


def test_kernels_backend_equals_torch_backend():
    model = make_model("kernels")
    ids = torch.randint(0, 60, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, :5] = False
    a = model(ids, attention_mask=mask).logits
    model.backend = "torch"
    b = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model = model.to(torch.bfloat16)
    b16 = model(ids, attention_mask=mask).logits
    model.backend = "kernels"
    k16 = model(ids, attention_mask=mask).logits
    assert k16.dtype == torch.bfloat16
    ref = reference_logits(model.state_dict(), model.config, ids, mask)
    # the kernel in bf16 is no worse than plain torch in bf16 (flash-attention's criterion)
    err_k = (k16.double() - ref).abs().max().item()
    err_t = (b16.double() - ref).abs().max().item()
    assert err_k <= 2 * err_t + 1e-3, (err_k, err_t)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_left_padded_row_equals_unpadded(backend):
    model = make_model(backend)
    tokens = torch.randint(0, 60, (1, 9))
    alone = model(tokens).logits
    for pad in (1, 6):
        padded = torch.cat([torch.full((1, pad), model.config.pad_token_id), tokens], 1)
        mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 9)], 1).long()
        out = model(padded, attention_mask=mask).logits[:, pad:]
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    # batch: the padded row and a full row together
    other = torch.randint(0, 60, (1, 12))
    batch = torch.cat([torch.cat([torch.full((1, 3), 65), tokens], 1), other])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0:1, 3:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2], model(other).logits, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_bool_mask():
    model = make_model()
    big = torch.randint(0, 60, (2, 22))
    ids = big[:, ::2]
    assert not ids.is_contiguous()
    mask = torch.ones(2, 22, dtype=torch.bool)[:, ::2]
    torch.testing.assert_close(model(ids, mask).logits, model(ids.contiguous()).logits)


def test_forward_validation():
    model = make_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, 5, (7,)))
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, 5, (2, 3)), attention_mask=torch.ones(2, 4))


def test_gradient_checkpointing_same_gradients():
    model = make_model().train()
    ids = torch.randint(0, 60, (2, 11))

    def grads():
        model.zero_grad()
        model(ids).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in ckpt)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_kv_cache_slice_pass_equals_full_pass(backend):
    """A slice pass against a cache built from the same sequence is the full pass."""
    model = make_model(backend)
    ids = torch.randint(0, 60, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model.forward_hidden(ids, mask)
        for start, end in ((6, 15), (6, 10), (0, 4)):  # prefix-style, dual-style, head
            kv = KVCache()
            built = model.forward_hidden(ids, mask, kv_cache=kv)
            torch.testing.assert_close(built, full)
            assert kv.seq_len == 15 and len(kv.k) == model.config.n_layers
            part = model.forward_hidden(ids[:, start:end], mask, kv_cache=kv, cache_start=start)
            torch.testing.assert_close(part, full[:, start:end], rtol=1e-5, atol=1e-5)
        # the cache is stale by design: changing the slice changes only the slice's keys
        kv = KVCache()
        model.forward_hidden(ids, mask, kv_cache=kv)
        changed = ids.clone()
        changed[:, 8:10] = 66
        part = model.forward_hidden(changed[:, 6:10], mask, kv_cache=kv, cache_start=6)
        exact = model.forward_hidden(changed, mask)[:, 6:10]
        assert (part - exact).abs().max() > 1e-4  # layer >= 2 sees stale keys elsewhere
    with pytest.raises(ValueError, match="kv_cache"):
        model.forward_hidden(ids[:, :3], cache_start=0)
    with pytest.raises(ValueError, match="outside"):
        model.forward_hidden(ids[:, :4], mask, kv_cache=kv, cache_start=13)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_cuda_bf16_matches_reference():
    model = make_model("kernels").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 60, (2, 19), device="cuda")
    mask = torch.ones(2, 19, dtype=torch.long, device="cuda")
    mask[0, :4] = 0
    out = model(ids, attention_mask=mask).logits
    model.backend = "torch"
    plain = model(ids, attention_mask=mask).logits
    ref = reference_logits(model.state_dict(), model.config, ids, mask)
    err_k = (out.double().cpu() - ref).abs().max().item()
    err_t = (plain.double().cpu() - ref).abs().max().item()
    assert err_k <= 2 * err_t + 1e-3, (err_k, err_t)


# ------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------
def test_byte_tokenizer():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    text = "héllo, wörld ✓\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.mask_token_id]) == text
    assert tok.decode([tok.mask_token_id], skip_special_tokens=False) == "<|mask|>"
    chat = tok.apply_chat_template([{"role": "user", "content": " hi "}])
    assert chat[0] == tok.bos_token_id and tok.eot_token_id in chat
    assert tok.decode(chat) == "<user>\nhi<assistant>\n"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)[
            -1
        ]
        == tok.eot_token_id
    )
    with pytest.raises(TypeError):
        tok.apply_chat_template("hi")
    with pytest.raises(ValueError):
        tok.decode([300])


def test_hf_tokenizer_wrapper(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    specials = [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|mdm_mask|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
    ]
    vocab = {
        w: i for i, w in enumerate(["[UNK]", "hello", "world", "user", "assistant", "\n\n", "hi"])
    }
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tk.add_special_tokens(specials)
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
    assert tok.mask_token_id == tk.token_to_id("<|mdm_mask|>")
    assert tok.bos_token_id == tk.token_to_id("<|startoftext|>")
    assert tok.pad_token_id == tok.eos_token_id == tk.token_to_id("<|endoftext|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_token_id
    assert ids[1] == tk.token_to_id("<|start_header_id|>")
    assert tk.token_to_id("<|eot_id|>") in ids
    assert ids[-2:] == [tk.token_to_id("<|end_header_id|>"), 5]  # ... assistant hdr + \n\n
    # config.json special ids take precedence
    (tmp_path / "config.json").write_text(json.dumps({"mask_token_id": 3, "eos_token_id": 4}))
    tok = load_tokenizer(tmp_path)
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == (3, 4, 4)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")
    assert isinstance(load_tokenizer(tmp_path.parent), ByteTokenizer)


def test_top_level_exports():
    assert lx.LLaDAModel is LLaDAModel and lx.LLaDAConfig is LLaDAConfig
    assert callable(lx.generate) and callable(lx.log_likelihood)


def test_kernel_attention_only_for_head_dims_the_cuda_kernels_cover(monkeypatch):
    """A CUDA model whose head dim the CUDA kernels lack takes the torch path, not an error."""
    from types import SimpleNamespace

    from llada_ext import _cuda
    from llada_ext.model import _kernel_attention_supported

    # as on a machine where the kernels can run (cuda_status decides that part)
    monkeypatch.setattr(_cuda, "cuda_status", lambda: _cuda.CudaStatus(True, ""))

    def fake(device, dtype, head_dim):
        return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 2, 2, head_dim))

    for head_dim in (8, 64, 128, 256):
        assert _kernel_attention_supported(fake("cuda", torch.bfloat16, head_dim))
    for head_dim in (4, 12, 264, 512):
        assert not _kernel_attention_supported(fake("cuda", torch.bfloat16, head_dim))
        assert _kernel_attention_supported(fake("cpu", torch.float32, head_dim))
    assert not _kernel_attention_supported(fake("cuda", torch.float32, 64))


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_cuda_model_with_head_dim_outside_the_kernels_runs():
    torch.manual_seed(0)
    cfg = llada_config(  # head_dim 12: not a multiple of 8
        d_model=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=64,
        vocab_size=50,
        max_sequence_length=64,
        eot_token_id=None,
    )
    model = LLaDAModel(cfg, backend="kernels").to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 47, (2, 9), device="cuda")
    with torch.no_grad():
        got = model(ids).logits
        model.backend = "torch"
        want = model(ids).logits
    assert torch.equal(got, want)
