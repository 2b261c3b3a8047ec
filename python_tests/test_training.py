"""Tests of the training pipeline: data, checkpoints, resume, interrupts, and a real learning
check of the tiny model on the built-in demo corpus."""

from __future__ import annotations

import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors

import llada_ext  # noqa: F401  (loads the kernels)
from llada_ext import demo
from llada_ext.model import LLaDAConfig, LLaDAModel
from llada_ext.tokenizer import ByteTokenizer
from llada_ext.training import checkpoint as ckpt_mod
from llada_ext.training.checkpoint import (
    CheckpointManager,
    atomic_save,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from llada_ext.training.data import (
    DataError,
    DataStream,
    SequenceDataset,
    build_pretrain_dataset,
    build_sft_dataset,
    load_hf_records,
    pack_documents,
    read_records,
    records_to_pairs,
    records_to_texts,
)
from llada_ext.training.trainer import TrainConfig, Trainer, param_groups

TOK = ByteTokenizer()


# one torch thread per test (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def micro_config() -> LLaDAConfig:
    # The tiny preset's byte vocabulary with a narrower network: fast enough for many runs.
    cfg = LLaDAConfig.preset("tiny")
    cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden_size = 32, 2, 2, 1, 48
    return cfg


def random_dataset(n: int = 23, L: int = 13, seed: int = 0, sft: bool = False) -> SequenceDataset:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 256, (n, L), generator=g)
    plen = torch.randint(1, L - 2, (n,), generator=g) if sft else None
    return SequenceDataset(toks, plen)


def make_trainer(out, *, backend="kernels", steps=6, sft=False, **kw) -> Trainer:
    torch.manual_seed(0)
    model = LLaDAModel(micro_config(), backend=backend)
    cfg = dict(
        objective="sft" if sft else "pretrain",
        steps=steps,
        micro_batch_size=3,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=2,
        decay_frac=0.5,
        random_length_prob=0.3,
        seed=7,
    )
    cfg.update(kw)
    return Trainer(model, random_dataset(sft=sft), run_config(out, **cfg), device="cpu")


def run_config(out, **kw) -> TrainConfig:
    """A run into ``out`` without periodic checkpoints or a progress bar, unless ``kw`` asks."""
    return TrainConfig(**{"out_dir": str(out), "save_every": 0, "progress": False, **kw})


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_pack_documents_separates_with_eos_and_pads_the_tail() -> None:
    rows = pack_documents([[1, 2, 3], [4], [5, 6, 7, 8, 9]], seq_len=4, eos_id=99, bos_id=50)
    flat = [50, 1, 2, 3, 99, 50, 4, 99, 50, 5, 6, 7, 8, 9, 99]
    assert rows.shape == (4, 4)
    assert rows.reshape(-1).tolist() == flat + [99]
    with pytest.raises(DataError):
        pack_documents([], seq_len=4, eos_id=0)


def test_read_records_text_jsonl_and_folders(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.json").write_text('[{"text": "three"}]')
    texts = list(records_to_texts(read_records([tmp_path])))
    assert texts == ["hello world", "one", "two", "three"]
    ds = build_pretrain_dataset(texts, TOK, seq_len=7)
    flat = ds.tokens.reshape(-1).tolist()
    want = []
    for t in texts:
        want += list(t.encode()) + [TOK.eos_token_id]
    assert flat[: len(want)] == want
    assert set(flat[len(want) :]) <= {TOK.eos_token_id}


def test_data_errors_are_plain(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        list(read_records([tmp_path / "missing.jsonl"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(read_records([bad]))
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="'text'"):
        list(records_to_texts(read_records([other])))
    with pytest.raises(DataError, match="prompt"):
        list(records_to_pairs(read_records([other]), TOK))


def test_hf_datasets_missing_gives_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="datasets"):
        list(load_hf_records("some/dataset"))


def test_sft_layout_prompt_response_and_messages() -> None:
    recs = [
        {"prompt": "ab", "response": "xyz"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "p" * 40, "response": "r"},  # prompt too long: dropped
    ]
    ds, dropped = build_sft_dataset(
        records_to_pairs(recs, TOK), seq_len=32, eos_id=TOK.eos_token_id
    )
    assert dropped == 1 and len(ds) == 2
    row0 = ds.tokens[0].tolist()
    assert row0 == list(b"abxyz") + [TOK.eos_token_id] * 27
    assert ds.prompt_lengths[0] == 2
    prompt1 = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ds.prompt_lengths[1] == len(prompt1)
    row1 = ds.tokens[1].tolist()
    assert row1[: len(prompt1)] == prompt1
    assert row1[len(prompt1) : len(prompt1) + 3] == list(b"yo") + [TOK.eot_token_id]
    assert set(row1[len(prompt1) + 3 :]) == {TOK.eos_token_id}


def test_data_stream_is_deterministic_sharded_and_resumable() -> None:
    ds = random_dataset(n=10)
    a, b = DataStream(ds, seed=3), DataStream(ds, seed=3)
    assert a.indices(0, 25) == b.indices(0, 25)
    assert sorted(a.indices(0, 10)) == list(range(10))  # an epoch is a permutation
    assert a.indices(0, 10) != a.indices(10, 10)  # a new order each epoch
    assert DataStream(ds, seed=4).indices(0, 10) != a.indices(0, 10)
    # One step over 2 ranks x 2 micro-batches of 3 = the 12 positions of one process.
    single = a.step_batches(micro_batch=12, grad_accum=1)[0]
    parts = [
        bt
        for r in range(2)
        for bt in a.step_batches(micro_batch=3, grad_accum=2, rank=r, world_size=2)
    ]
    keys = sorted(k for bt in parts for k in bt.keys)
    assert keys == single.keys
    by_key = {k: row for bt in parts for k, row in zip(bt.keys, bt.input_ids)}
    for k, row in zip(single.keys, single.input_ids):
        assert torch.equal(by_key[k], row)
    a.advance(12)
    state = a.state_dict()
    c = DataStream(ds, seed=0)
    c.load_state_dict(state)
    assert (
        c.step_batches(micro_batch=4, grad_accum=1)[0].keys
        == a.step_batches(micro_batch=4, grad_accum=1)[0].keys
    )
    with pytest.raises(DataError):
        DataStream(random_dataset(n=11), seed=3).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"x": torch.arange(3)}, path)

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_atomic_save_fsyncs_and_replaces(tmp_path, monkeypatch) -> None:
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt_mod.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(
        ckpt_mod.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))
    )
    atomic_save({"a": 1}, tmp_path / "f.pt")
    assert calls[:2] == ["fsync", "replace"]


def test_checkpoint_manager_keeps_last_k(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path / "c", keep_last=2)
    for s in (1, 2, 3, 10):
        mgr.save(s, {"v": torch.tensor(s)})
    assert [s for s, _ in mgr.list()] == [3, 10]
    ck = load_checkpoint(mgr.latest())
    assert ck["step"] == 10 and ck["v"].item() == 10
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"random": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a llada_ext"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------
def test_param_groups_no_decay_on_norms_and_embeddings() -> None:
    model = LLaDAModel(micro_config(), backend="torch")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "model.transformer.wte.weight" in nd
    assert all("norm" in n or "ln_f" in n or "wte" in n for n in nd)
    assert "model.transformer.ff_out.weight" in d and no_decay["weight_decay"] == 0.0
    assert len(d) + len(nd) == len(list(model.parameters()))


@pytest.mark.parametrize(("backend", "sft"), [("kernels", False), ("torch", True)])
def test_resume_is_bit_for_bit(tmp_path, backend, sft) -> None:
    straight = make_trainer(tmp_path / "a", backend=backend, sft=sft)
    ra = straight.train()
    assert ra.step == 6 and len(ra.losses) == 6 and all(np.isfinite(ra.losses))

    half = make_trainer(tmp_path / "b", backend=backend, sft=sft)
    half.config.steps = 3  # stop half way (the schedule still targets 6 steps)
    half.train()
    resumed = make_trainer(tmp_path / "b", backend=backend, sft=sft)
    assert resumed.resume("auto")
    assert resumed.step == 3
    rb = resumed.train()
    assert rb.losses == ra.losses[3:]
    pb = params_of(resumed.model)
    assert_same_tensors(pb, params_of(straight.model))
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # The saved model folder loads with from_pretrained and holds the trained weights.
    loaded = LLaDAModel.from_pretrained(tmp_path / "b", backend="torch")
    assert_same_tensors(params_of(loaded), pb)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_keyboard_interrupt_saves_and_resume_matches(tmp_path, monkeypatch) -> None:
    straight = make_trainer(tmp_path / "a", backend="torch")
    ra = straight.train()

    t = make_trainer(tmp_path / "b", backend="torch", keep_last=5)
    real_step = t._train_step

    def step_then_interrupt():
        if t.step == 4:  # Ctrl-C in the middle of step 5, after some gradients exist
            loss = t.wrapped(*_dummy_batch(t))
            loss.backward()
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(t, "_train_step", step_then_interrupt)
    rb = t.train()
    assert rb.interrupted and rb.step == 4
    assert rb.checkpoint is not None and rb.checkpoint.name == "step-00000004.pt"
    resumed = make_trainer(tmp_path / "b", backend="torch", keep_last=5)
    assert resumed.resume(tmp_path / "b")
    rc = resumed.train()
    assert rc.losses == ra.losses[4:]
    assert_same_tensors(params_of(resumed.model), params_of(straight.model))


def _dummy_batch(t: Trainer):
    ids = t.dataset.tokens[:2]
    w = torch.full(ids.shape, 0.01)
    return ids, ids, w


def test_sigint_stops_after_the_current_step(tmp_path, monkeypatch, caplog) -> None:
    t = make_trainer(tmp_path / "s", backend="torch", steps=10)
    real_step = t._train_step

    def step_with_signal():
        out = real_step()
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers
        return out

    monkeypatch.setattr(t, "_train_step", step_with_signal)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    r = t.train()
    assert r.interrupted and r.step == 2
    assert load_checkpoint(r.checkpoint)["step"] == 2
    # the library logs (llada_ext.training.trainer), it does not print
    assert any(
        rec.name == "llada_ext.training.trainer" and "--resume" in rec.getMessage()
        for rec in caplog.records
    )
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored


def test_gradient_accumulation_matches_one_big_batch(tmp_path) -> None:
    a = make_trainer(tmp_path / "a", backend="torch", steps=2, micro_batch_size=6, grad_accum=1)
    b = make_trainer(tmp_path / "b", backend="torch", steps=2, micro_batch_size=2, grad_accum=3)
    ra, rb = a.train(), b.train()
    np.testing.assert_allclose(ra.losses, rb.losses, rtol=1e-5)
    assert_same_tensors(params_of(b.model), params_of(a.model), rtol=1e-4, atol=1e-6)


def test_keep_last_and_bad_settings(tmp_path) -> None:
    t = make_trainer(tmp_path / "k", backend="torch", steps=4, save_every=1, keep_last=2)
    t.train()
    names = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir())
    assert names == [
        "step-00000003.pt",
        "step-00000003.pt.sha256",
        "step-00000004.pt",
        "step-00000004.pt.sha256",
    ]
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_trainer(tmp_path / "x", micro_batch_size=0)
    with pytest.raises(ValueError, match="prompt lengths"):
        make_trainer(tmp_path / "x", objective="sft")
    with pytest.raises(FileNotFoundError):
        make_trainer(tmp_path / "y").resume(tmp_path / "nothing-here")


# --------------------------------------------------------------------------------------------
# demo corpus and a real learning check
# --------------------------------------------------------------------------------------------
def test_shipped_demo_corpus_matches_its_generator() -> None:
    train, test = demo.make_demo_corpus()
    assert demo.load_demo_corpus("train") == train
    assert demo.load_demo_corpus("test") == test
    assert not {(r["task"], r["prompt"]) for r in train} & {(r["task"], r["prompt"]) for r in test}
    for r in train[:50]:
        s = r["prompt"].split(": ")[1].split(" =")[0]
        assert r["response"] == demo.DEMO_TASKS[r["task"]](s)


def test_tiny_model_learns_the_demo_corpus(tmp_path) -> None:
    ds = demo.build_demo_dataset()
    assert ds.seq_len == demo.DEMO_SEQ_LEN
    torch.manual_seed(0)
    model = LLaDAModel(LLaDAConfig.preset("tiny"), backend="kernels")
    cfg = run_config(
        tmp_path,
        objective="sft",
        steps=60,
        micro_batch_size=16,
        lr=2e-3,
        warmup_steps=10,
        decay_frac=0.0,
        weight_decay=0.0,
        seed=1,
    )
    r = Trainer(model, ds, cfg, device="cpu").train()
    first, last = np.mean(r.losses[:5]), np.mean(r.losses[-5:])
    assert np.isfinite(r.losses).all()
    assert last < 0.8 * first, (first, last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_training_steps(tmp_path) -> None:
    torch.manual_seed(0)
    model = LLaDAModel(micro_config(), backend="kernels")
    cfg = run_config(
        tmp_path, objective="sft", steps=3, micro_batch_size=4, lr=3e-3, warmup_steps=1
    )
    t = Trainer(model, random_dataset(sft=True), cfg, device="cuda")
    assert t.use_autocast  # "auto" precision means bf16 autocast on CUDA
    r = t.train()
    assert np.isfinite(r.losses).all() and r.step == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    loaded = LLaDAModel.from_pretrained(tmp_path, backend="torch")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].cpu())


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path) -> None:
    first = make_trainer(tmp_path / "r", backend="torch", steps=4)
    first.train()
    longer = make_trainer(tmp_path / "r", backend="torch", steps=10)
    assert longer.resume("auto") and longer.step == 4
    from llada_ext.training.schedule import wsd_factor

    want = 3e-3 * wsd_factor(4, total_steps=10, warmup_steps=2, decay_steps=5, min_ratio=0.1)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(want)
    r = longer.train()
    assert r.step == 10 and len(r.losses) == 6


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, capsys) -> None:
    """When stderr is not a terminal the bar redraws at most every 30 s, each redraw its own
    line: a log file gets a handful of short lines, not one line per step."""
    t = make_trainer(tmp_path / "p", backend="torch", steps=40, progress=True)
    t.train()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train:")]
    assert 1 <= len(lines) <= 4, lines
    assert "\r" not in err and max(len(ln) for ln in lines) < 200
