"""Tests of llada_ext.eval_harness: the lm-evaluation-harness adapter, driven by hand-made
requests (no lm_eval needed), and, when lm_eval is installed, its registered model class."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import llada_ext as lx
from llada_ext.eval_harness import LLaDAEvalAdapter
from llada_ext.model import LLaDAConfig, LLaDAModel
from llada_ext.sampling import generate
from llada_ext.tokenizer import ByteTokenizer


@dataclass
class Req:
    """Stands in for lm_eval's Instance: only ``.args`` is read."""

    args: tuple


class CharTokenizer:
    """One id per character: 0-26 the characters below, 27 BOS '^', 28 EOS '$', 29 EoT '|',
    30 MASK '#' (bijective, so any id sequence round-trips through text)."""

    chars = "abcdefghijklmnopqrstuvwxyz "
    specials = {27: "^", 28: "$", 29: "|", 30: "#"}
    bos_token_id, eos_token_id, pad_token_id, eot_token_id, mask_token_id = 27, 28, 28, 29, 30
    vocab_size = 31

    def __init__(self) -> None:
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._ids.update({c: i for i, c in self.specials.items()})

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.chars):
                out.append(self.chars[i])
            elif not skip_special_tokens:
                out.append(self.specials[i])
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        ids = [self.bos_token_id]
        for m in messages:
            ids += self.encode(m["content"]) + [self.eot_token_id]
        return ids + (self.encode("a ") if add_generation_prompt else [])


TOK = CharTokenizer()


def char_model(seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    cfg = LLaDAConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=40,
        vocab_size=TOK.vocab_size,
        max_sequence_length=64,
        rope_theta=10000.0,
        mask_token_id=TOK.mask_token_id,
        eos_token_id=TOK.eos_token_id,
        bos_token_id=TOK.bos_token_id,
        pad_token_id=TOK.pad_token_id,
        eot_token_id=TOK.eot_token_id,
        initializer_range=0.3,
    )
    return LLaDAModel(cfg).eval()


@pytest.fixture(scope="module")
def model() -> LLaDAModel:
    return char_model()


def adapter(model, **kw) -> LLaDAEvalAdapter:
    base = dict(mc_num=8, batch_size=4, gen_length=8, steps=4, block_length=4, seed=7)
    base.update(kw)
    return LLaDAEvalAdapter(model, TOK, **base)


@torch.no_grad()
def ref_suffix_greedy(model, prefix: list[int], n: int) -> list[int]:
    """The public eval script's greedy check: n steps over the whole (masked) suffix, each
    step keeping only the single most confident argmax prediction."""
    mask = model.config.mask_token_id
    seq = torch.full((1, len(prefix) + n), mask)
    seq[0, : len(prefix)] = torch.tensor(prefix)
    for _ in range(n):
        where = (seq[0] == mask).nonzero()[:, 0]
        logits = model(seq).logits[0, where].double()
        x0 = logits.argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
        best = int(conf.argmax())
        seq[0, where[best]] = x0[best]
    return seq[0, len(prefix) :].tolist()


def ref_generate_until(model, context, until, gen_length, steps, block_length) -> str:
    ids = TOK.encode(context) or [TOK.bos_token_id]
    out = generate(
        model,
        torch.tensor([ids]),
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
    )[0, len(ids) :].tolist()
    for i, t in enumerate(out):
        if t in (TOK.eos_token_id, TOK.eot_token_id):
            out = out[:i]
            break
    text = TOK.decode(out)
    for s in until:
        text = text.split(s)[0]
    return text


# --------------------------------------------------------------------------------------------
# loglikelihood
# --------------------------------------------------------------------------------------------
def test_encode_pair_moves_trailing_whitespace():
    tok = ByteTokenizer()
    byte_model = LLaDAModel(LLaDAConfig.preset("tiny"))
    ad = LLaDAEvalAdapter(byte_model, tok)
    enc = tok.encode
    assert ad._encode_pair("Q: 2+2= ", "4") == (enc("Q: 2+2="), enc(" 4"))
    assert ad._encode_pair("para\n\n", "Next") == (enc("para"), enc("\n\nNext"))
    assert ad._encode_pair("hello", " world") == (enc("hello"), enc(" world"))
    assert ad._encode_pair("", "héllo") == ([], enc("héllo"))
    assert ad._encode_pair("   ", "x") == ([], enc("   x"))
    assert ad._encode_pair("abc", "") == (enc("abc"), [])
    ad_bos = LLaDAEvalAdapter(byte_model, tok, add_bos=True)
    assert ad_bos._encode_pair("ab ", "c") == ([256] + enc("ab"), enc(" c"))


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_loglikelihood_equals_log_likelihood_of_encoded_pair(model, cfg):
    ad = adapter(model, cfg_scale=cfg, check_greedy=False)
    pairs = [("ab ", "cd"), ("hello", " world"), ("", "sea"), ("abc", "")]
    got = ad.loglikelihood([Req(p) for p in pairs])
    encoded = [
        (TOK.encode("ab"), TOK.encode(" cd")),
        (TOK.encode("hello"), TOK.encode(" world")),
        ([TOK.bos_token_id], TOK.encode("sea")),  # an empty context becomes BOS
    ]
    for (ll, greedy), (ctx, cont) in zip(got, encoded):
        expected = lx.log_likelihood(
            model,
            torch.tensor(ctx),
            torch.tensor(cont),
            mc_num=8,
            batch_size=4,
            cfg_scale=cfg,
            generator=torch.Generator().manual_seed(7),
        )
        assert isinstance(ll, float) and isinstance(greedy, bool)
        assert ll == expected and greedy is False
    assert got[3] == (0.0, True)  # empty continuation: log 1
    # every request is scored with a freshly seeded generator: order does not matter
    assert ad.loglikelihood([Req(p) for p in reversed(pairs)]) == got[::-1]


def test_is_greedy(model):
    ad = adapter(model, check_greedy=True)
    n_true = n_false = 0
    for context, n in (("abc", 2), ("hello wor", 4), ("s", 5), ("the sea is", 4)):
        ctx = TOK.encode(context)
        target = ref_suffix_greedy(model, ctx, n)
        assert TOK.mask_token_id not in target  # (an untrained model may predict it)
        greedy_text = TOK.decode(target, skip_special_tokens=False)
        other = target[:-1] + [(target[-1] + 1) % 27]
        other_text = TOK.decode(other, skip_special_tokens=False)
        (_, g1), (_, g2) = ad.loglikelihood(
            [Req((context, greedy_text)), Req((context, other_text))]
        )
        assert g1 is True and g2 is False, (context, target)
        n_true += g1
        n_false += not g2
    assert n_true == 4 and n_false == 4
    # check_greedy off: always False
    ctx = TOK.encode("abc")
    text = TOK.decode(ref_suffix_greedy(model, ctx, 2), skip_special_tokens=False)
    assert adapter(model, check_greedy=False).loglikelihood([Req(("abc", text))])[0][1] is False


def test_loglikelihood_rolling(model):
    ad = adapter(model)
    texts = ["hello world", "abc", ""]
    got = ad.loglikelihood_rolling([Req((t,)) for t in texts])
    for t, ll in zip(texts[:2], got):
        expected = lx.log_likelihood(
            model, [], TOK.encode(t), mc_num=8, batch_size=4,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
        assert ll == expected
    assert got[2] == 0.0
    ad_bos = adapter(model, add_bos=True)
    expected = lx.log_likelihood(
        model, [TOK.bos_token_id], TOK.encode("abc"), mc_num=8, batch_size=4,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert ad_bos.loglikelihood_rolling([Req(("abc",))]) == [expected]


# --------------------------------------------------------------------------------------------
# generate_until
# --------------------------------------------------------------------------------------------
def test_gen_settings(model):
    ad = adapter(model, gen_length=16, steps=8, block_length=4)  # 2 steps per block
    assert ad.gen_settings({}) == (16, 8, 4)
    assert ad.gen_settings(None) == (16, 8, 4)
    assert ad.gen_settings({"max_gen_toks": 5}) == (8, 4, 4)
    assert ad.gen_settings({"max_gen_toks": 16}) == (16, 8, 4)
    assert ad.gen_settings({"max_gen_toks": 17}) == (20, 10, 4)
    assert ad.gen_settings({"max_gen_toks": 1}) == (4, 2, 4)
    fixed = adapter(model, gen_length=16, steps=8, block_length=4, respect_max_gen_toks=False)
    assert fixed.gen_settings({"max_gen_toks": 5}) == (16, 8, 4)
    with pytest.raises(ValueError, match="max_gen_toks"):
        ad.gen_settings({"max_gen_toks": 0})


def test_generate_until_single_requests_match_generate(model):
    ad = adapter(model)
    for context, kwargs, settings in (
        ("abc", {}, (8, 4, 4)),
        ("hello", {"until": []}, (8, 4, 4)),
        ("", {"max_gen_toks": 3}, (4, 2, 4)),
        ("the sea", {"max_gen_toks": 12, "until": "zzz"}, (12, 6, 4)),
    ):
        got = ad.generate_until([Req((context, kwargs))])
        assert got == [ref_generate_until(model, context, [], *settings)], context


def test_generate_until_batching_matches_one_at_a_time(model):
    contexts = ["a", "hello wor", "abc", "the sea is blue", "qrs", "", "mno pq"]
    kwargs = [{}, {"max_gen_toks": 4}, {}, {}, {"max_gen_toks": 4}, {}, {"max_gen_toks": 12}]
    reqs = [Req((c, k)) for c, k in zip(contexts, kwargs)]
    one = adapter(model, generate_batch_size=1).generate_until(reqs)
    for bs in (2, 3, 8):
        assert adapter(model, generate_batch_size=bs).generate_until(reqs) == one, bs
    settings = {None: (8, 4, 4), 4: (4, 2, 4), 12: (12, 6, 4)}
    expected = [
        ref_generate_until(model, c, [], *settings[k.get("max_gen_toks")])
        for c, k in zip(contexts, kwargs)
    ]
    assert one == expected
    assert sum(len(s) for s in one) > 0  # not all empty: the comparison has teeth


def test_generate_until_cuts_at_stop_strings(model):
    ad = adapter(model, gen_length=16, steps=8, block_length=8)
    context = "hello"
    full = ad.generate_until([Req((context, {}))])[0]
    assert len(full) >= 4, full
    early, late = full[1:2], full[3:]
    cut = min(full.find(early), full.find(late))
    got = ad.generate_until(
        [
            Req((context, {"until": [late, early]})),
            Req((context, {"until": late})),
            Req((context, {"until": ["", "zzzz"]})),  # empty / absent stops change nothing
        ]
    )
    assert got == [full[:cut], full[: full.find(late)], full]
    assert got[0] == ref_generate_until(model, context, [late, early], 16, 8, 8)


def test_postprocess_cuts_at_eos_and_eot(model):
    ad = adapter(model)
    enc = TOK.encode
    eos, eot, bos = TOK.eos_token_id, TOK.eot_token_id, TOK.bos_token_id
    assert ad._postprocess(enc("ab") + [eos] + enc("cd"), []) == "ab"
    assert ad._postprocess(enc("ab") + [eot] + enc("cd") + [eos], []) == "ab"
    assert ad._postprocess([bos] + enc("ab cd"), ["c"]) == "ab "  # BOS dropped in decoding
    assert ad._postprocess(enc("aab"), ["b", "a"]) == ""
    assert ad._postprocess(enc("abc"), []) == "abc"


def test_generate_until_chat_template(model):
    ad = adapter(model, chat=True)
    got = ad.generate_until([Req(("abc", {"until": []}))])
    prompt = TOK.apply_chat_template([{"role": "user", "content": "abc"}])
    out = generate(model, torch.tensor([prompt]), gen_length=8, steps=4, block_length=4)
    answer = out[0, len(prompt) :].tolist()
    stops = [i for i, t in enumerate(answer) if t in (TOK.eos_token_id, TOK.eot_token_id)]
    assert got == [TOK.decode(answer[: stops[0]] if stops else answer)]


def test_validation(model):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        adapter(model, mc_num=6, batch_size=4)
    with pytest.raises(ValueError, match="block_length"):
        adapter(model, gen_length=10, steps=5, block_length=4)
    with pytest.raises(ValueError, match="steps"):
        adapter(model, gen_length=8, steps=3, block_length=4)
    with pytest.raises(ValueError, match="generate_batch_size"):
        adapter(model, generate_batch_size=0)


# --------------------------------------------------------------------------------------------
# lm_eval integration
# --------------------------------------------------------------------------------------------
def test_import_without_lm_eval(monkeypatch):
    """A copy of the module loaded while lm_eval cannot be imported: the plain adapter is
    there, the harness class gives a clear ImportError."""
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lm_eval...` fail
    spec = importlib.util.find_spec("llada_ext.eval_harness")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.lm_eval_available() is False
    assert hasattr(mod, "LLaDAEvalAdapter")
    assert "LLaDAHarnessLM" not in mod.__all__
    with pytest.raises(ImportError, match="pip install lm_eval"):
        mod.LLaDAHarnessLM  # noqa: B018
    with pytest.raises(ImportError, match="pip install lm_eval"):
        mod.register()
    with pytest.raises(AttributeError):
        mod.does_not_exist  # noqa: B018


def test_registered_with_lm_eval(tmp_path):
    pytest.importorskip("lm_eval.api.model")
    import lm_eval.api.registry as registry
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    import llada_ext.eval_harness as eh

    assert eh.lm_eval_available()
    cls = eh.LLaDAHarnessLM
    assert issubclass(cls, LM)
    assert registry.get_model("llada_ext") is cls
    assert eh.register() is cls  # idempotent
    assert "hf" in registry.model_registry  # the harness's own models are still known

    torch.manual_seed(0)
    cfg = LLaDAConfig.preset("tiny")
    cfg.d_model, cfg.n_layers, cfg.mlp_hidden_size = 32, 1, 48
    LLaDAModel(cfg).save_pretrained(tmp_path / "ckpt")
    lm = cls.create_from_arg_string(
        f"pretrained={tmp_path / 'ckpt'},dtype=float32,mc_num=8,"
        "check_greedy=False,gen_length=4,steps=2,block_length=4,seed=3,progress=False",
        {"batch_size": 4, "device": "cpu"},
    )
    assert isinstance(lm.tokenizer, ByteTokenizer)
    ad = lm.adapter
    assert (ad.mc_num, ad.batch_size, ad.check_greedy, ad.gen_length, ad.seed) == (
        8, 4, False, 4, 3,
    )  # fmt: skip
    req = Instance("loglikelihood", {}, ("Q: hi ", "yes"), 0)
    ll = lm.loglikelihood([req])
    expected = lx.log_likelihood(
        lm.model, ByteTokenizer().encode("Q: hi"), ByteTokenizer().encode(" yes"),
        mc_num=8, batch_size=4, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert ll == [(expected, False)]
    gen = lm.generate_until([Instance("generate_until", {}, ("Q: hi", {"until": ["\n"]}), 0)])
    assert isinstance(gen[0], str)
    # string arguments (older harness versions pass them unconverted)
    lm2 = cls(str(tmp_path / "ckpt"), mc_num="32", batch_size="auto", check_greedy="false")
    assert (lm2.adapter.mc_num, lm2.adapter.batch_size, lm2.adapter.check_greedy) == (32, 16, False)


def test_module_runs_the_harness_command_line():
    pytest.importorskip("lm_eval.api.model")
    res = subprocess.run(
        [sys.executable, "-m", "llada_ext.eval_harness", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()
