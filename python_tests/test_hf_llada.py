"""Drop-in use with the Hugging Face LLaDA model: patch_hf_llada, LLaDAModel.from_hf,
folders saved by that code, and lx.generate / lx.log_likelihood on it.

The Hugging Face modeling code is third-party and lives outside the repository, in
``../shared/reference/hf_llada`` (``LLADA_HF_REFERENCE`` may point elsewhere); it needs
``transformers`` and ``einops``. Without them the module is skipped with the reason.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import llada_ext as lx
from llada_ext import hf as lx_hf

REFERENCE = Path(
    os.environ.get(
        "LLADA_HF_REFERENCE",
        Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "hf_llada",
    )
)


def _import_reference():
    if not (REFERENCE / "modeling_llada.py").is_file():
        pytest.skip(f"the Hugging Face LLaDA code is not at {REFERENCE}", allow_module_level=True)
    for dep in ("transformers", "einops"):
        try:
            importlib.import_module(dep)
        except ImportError:
            pytest.skip(
                f"the Hugging Face LLaDA code needs {dep} (pip install transformers==4.46.3 "
                "einops)",
                allow_module_level=True,
            )
    sys.path.insert(0, str(REFERENCE.parent))
    try:
        return importlib.import_module(REFERENCE.name)
    finally:
        sys.path.remove(str(REFERENCE.parent))


hf_llada = _import_reference()

VOCAB, MASK, EOS = 100, 99, 98


def hf_config(**overrides):
    kw = dict(
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=96,
        vocab_size=VOCAB,
        embedding_size=VOCAB,
        max_sequence_length=128,
        block_type="llama",
        activation_type="silu",
        layer_norm_type="rms",
        rms_norm_eps=1e-5,
        rope=True,
        rope_theta=10000.0,
        rope_full_precision=True,
        weight_tying=False,
        include_bias=False,
        alibi=False,
        flash_attention=False,
        attention_dropout=0.0,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        mask_token_id=MASK,
        eos_token_id=EOS,
        pad_token_id=EOS,
        init_device="cpu",
    )
    kw.update(overrides)
    return hf_llada.LLaDAConfig(**kw)


def make_hf(seed: int = 0, **overrides):
    """A small Hugging Face LLaDA model with random weights (norm weights too, around 1)."""
    torch.manual_seed(seed)
    model = hf_llada.LLaDAModelLM(hf_config(**overrides), init_params=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def ids(b: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB - 3, (b, length), generator=g)
    x[:, length // 2 :: 3] = MASK  # masked positions, as the mask predictor sees them
    return x


def logits_of(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


# --------------------------------------------------------------------------------------------
# LLaDAModel.from_hf
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_from_hf_matches_the_hf_model_and_shares_its_weights(backend):
    hf = make_hf()
    model = lx.LLaDAModel.from_hf(hf, backend=backend)
    assert model.config.n_kv_heads == 2 and model.config.mask_token_id == MASK
    x = ids(2, 37)
    ref = logits_of(hf, x)
    torch.testing.assert_close(logits_of(model, x), ref, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert p is hf_params[name], name  # the very same Parameter objects: no copy
    with torch.no_grad():  # an update through one model is seen by the other
        model.lm_head.weight.mul_(0.5)
    torch.testing.assert_close(logits_of(hf, x), logits_of(model, x), rtol=1e-5, atol=1e-5)


def test_from_hf_keeps_the_mode_and_refuses_other_models():
    hf = make_hf().train()
    assert lx.LLaDAModel.from_hf(hf).training
    with pytest.raises(TypeError, match="Hugging Face LLaDA"):
        lx.LLaDAModel.from_hf(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="Hugging Face LLaDA"):
        lx.patch_hf_llada("model")


@pytest.mark.parametrize(
    "key,value",
    [
        ("weight_tying", True),
        ("block_type", "sequential"),
        ("activation_type", "gelu"),
        ("layer_norm_type", "default"),
        ("include_bias", True),
        ("scale_logits", True),
    ],
)
def test_from_hf_refuses_architectures_it_does_not_implement(key, value):
    cfg = hf_config(**{key: value})
    with pytest.raises(ValueError, match=key):
        lx_hf.config_from_hf(cfg)


def test_config_fallbacks_of_the_hf_format():
    cfg = hf_config(mlp_hidden_size=None, mlp_ratio=3, n_kv_heads=None, multi_query_attention=True)
    ours = lx_hf.config_from_hf(cfg)
    assert ours.mlp_hidden_size == 3 * 64 and ours.n_kv_heads == 1


# --------------------------------------------------------------------------------------------
# patch_hf_llada
# --------------------------------------------------------------------------------------------
def test_patch_routes_attention_through_the_kernel(monkeypatch):
    hf = make_hf()
    x = ids(2, 29)
    before = logits_of(hf, x)
    calls = []
    real = lx.ops.attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(lx.ops, "attention", counting)
    assert lx.patch_hf_llada(hf) is hf
    lx.patch_hf_llada(hf)  # twice is harmless
    after = logits_of(hf, x)
    assert len(calls) == hf.config.n_layers  # one kernel call per block, none twice
    assert calls[0] == (2, 29, 4, 16)  # [B, S, H, D]: the kernel's layout
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    lx.unpatch_hf_llada(hf)
    calls.clear()
    torch.testing.assert_close(logits_of(hf, x), before, rtol=0, atol=0)
    assert not calls


def test_patched_bf16_follows_the_flash_attention_accuracy_rule():
    """err(patched bf16 vs float64) <= 2 * err(unpatched bf16 vs float64) + tiny."""
    x = ids(2, 45, seed=3)
    ref = logits_of(make_hf().double(), x)
    plain = logits_of(make_hf().to(torch.bfloat16), x)
    patched = logits_of(lx.patch_hf_llada(make_hf().to(torch.bfloat16)), x)
    err_plain = (plain.double() - ref).abs().max().item()
    err_patched = (patched.double() - ref).abs().max().item()
    assert err_plain > 0
    assert err_patched <= 2 * err_plain + 1e-6, (err_patched, err_plain)


def test_patched_model_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    hf = lx.patch_hf_llada(make_hf().double())  # float64: outside the kernel's dtypes
    monkeypatch.setattr(lx.ops, "attention", lambda *a, **k: pytest.fail("kernel called"))
    x = ids(1, 11)
    torch.testing.assert_close(logits_of(hf, x), logits_of(make_hf().double(), x))


# --------------------------------------------------------------------------------------------
# generate / log_likelihood on the Hugging Face model
# --------------------------------------------------------------------------------------------
def test_generate_is_the_same_on_hf_patched_and_llada_models():
    prompt = torch.randint(0, VOCAB - 3, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(gen_length=12, steps=6, block_length=6, temperature=0.0)
    hf = make_hf()
    plain = lx.generate(hf, prompt, **kw)
    ours = lx.generate(lx.LLaDAModel.from_hf(hf), prompt, **kw)
    patched = lx.generate(lx.patch_hf_llada(hf), prompt, **kw)
    assert plain.shape == (2, 19)
    assert not (plain == MASK).any()
    assert torch.equal(plain, ours)
    assert torch.equal(plain, patched)
    # and the library's cached path on the converted model
    cached = lx.generate(lx.LLaDAModel.from_hf(hf), prompt, cache="prefix", **kw)
    assert cached.shape == plain.shape


def test_log_likelihood_takes_the_hf_model():
    hf = make_hf()
    prompt, answer = ids(1, 9, seed=7)[0].clamp_max(VOCAB - 4), torch.tensor([5, 17, 42])
    kw = dict(mc_num=8, batch_size=4, cfg_scale=0.5)
    a = lx.log_likelihood(hf, prompt, answer, generator=torch.Generator().manual_seed(0), **kw)
    b = lx.log_likelihood(
        lx.LLaDAModel.from_hf(hf), prompt, answer, generator=torch.Generator().manual_seed(0), **kw
    )
    assert a < 0
    assert abs(a - b) <= 1e-4 * abs(b), (a, b)


# --------------------------------------------------------------------------------------------
# folders in either direction
# --------------------------------------------------------------------------------------------
def test_from_pretrained_loads_a_folder_saved_by_the_hf_code(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path / "hf")
    model = lx.LLaDAModel.from_pretrained(tmp_path / "hf")
    x = ids(2, 21)
    torch.testing.assert_close(logits_of(model, x), logits_of(hf, x), rtol=1e-5, atol=1e-5)
    for name, p in hf.named_parameters():
        assert torch.equal(model.state_dict()[name], p), name


def test_the_hf_code_loads_a_folder_saved_by_llada_model(tmp_path):
    model = lx.LLaDAModel.from_hf(make_hf(seed=4))
    model.save_pretrained(tmp_path / "ours")
    hf = hf_llada.LLaDAModelLM.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.attention_dropout == 0.0 and hf.config.residual_dropout == 0.0
    x = ids(2, 21)
    torch.testing.assert_close(logits_of(hf, x), logits_of(model, x), rtol=1e-5, atol=1e-5)
