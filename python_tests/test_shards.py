"""Prepared token shards (``llada-ext prepare``): the same batches as the in-memory path, the
keyed data order, the checks of the format, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import llada_ext
from llada_ext.cli import main
from llada_ext.tokenizer import ByteTokenizer
from llada_ext.training.data import (
    DataError,
    DataStream,
    build_pretrain_dataset,
    build_sft_dataset,
    read_records,
    records_to_pairs,
    records_to_texts,
)
from llada_ext.training.losses import keyed_generator
from llada_ext.training.order import keyed_permutation
from llada_ext.training.prepare import prepare_shards
from llada_ext.training.shards import (
    HEADER_BYTES,
    MANIFEST_NAME,
    ShardDataset,
    check_tokenizer,
    choose_dtype,
    load_manifest,
)

TOK = ByteTokenizer()
DEMO = Path(llada_ext.__file__).parent / "data" / "demo_train.jsonl"


# one torch thread per test (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    """Documents of very different lengths in JSONL and text files (one empty, skipped)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "bird", "fox", "owl", "é", "naïve", "日本"]
    lines = []
    for i in range(60):
        n = int(rng.integers(0, 40))
        lines.append(json.dumps({"text": " ".join(rng.choice(words, n)) + f" #{i}"}))
    lines.insert(7, json.dumps({"text": ""}))
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "b.txt").write_text("a whole file is one document.\n" * 9)
    (folder / "c.md").write_text("# short\n")
    return [folder]


def stream_batches(
    ds, *, steps: int, seed: int = 3, micro: int = 4, accum: int = 2, world: int = 2
):
    """Every rank's micro-batches of ``steps`` optimizer steps, as plain lists."""
    stream = DataStream(ds, seed=seed)
    out = []
    for _ in range(steps):
        for rank in range(world):
            for b in stream.step_batches(
                micro_batch=micro, grad_accum=accum, rank=rank, world_size=world
            ):
                pl = None if b.prompt_lengths is None else b.prompt_lengths.tolist()
                out.append((b.input_ids.tolist(), pl, b.keys))
        stream.advance(micro * accum * world)
    return out


# --------------------------------------------------------------------------------------------
# the order
# --------------------------------------------------------------------------------------------
def test_keyed_permutation_is_a_keyed_bijection() -> None:
    for n in [*range(1, 70), 257, 1000, 4099]:
        perm = keyed_permutation(np.arange(n), n, 5, 1, 0)
        assert sorted(perm.tolist()) == list(range(n)), n
    a = keyed_permutation(np.arange(50), 50, 5, 1, 0)
    assert not np.array_equal(a, keyed_permutation(np.arange(50), 50, 5, 1, 1))
    assert not np.array_equal(a, keyed_permutation(np.arange(50), 50, 6, 1, 0))
    # one position at a time gives the same entries, for a range far too large to hold
    n = 10**12
    some = keyed_permutation(np.array([0, 7, 10**12 - 1]), n, 1, 2)
    assert [int(keyed_permutation([p], n, 1, 2)[0]) for p in (0, 7, 10**12 - 1)] == some.tolist()
    assert ((some >= 0) & (some < n)).all()
    with pytest.raises(ValueError):
        keyed_permutation([3], 3, 0)


def test_stream_state_records_the_order_and_old_states_keep_theirs() -> None:
    ds = build_pretrain_dataset(["abcdefghij" * 5], TOK, seq_len=4)  # 13 rows
    n = len(ds)
    stream = DataStream(ds, seed=9)
    assert stream.state_dict()["order_version"] == 2
    assert sorted(stream.indices(0, n)) == list(range(n))
    assert stream.indices(0, n) != stream.indices(n, n)  # a new order each epoch
    # A state written before the keyed order existed resumes with the per-epoch randperm.
    old = DataStream(ds, seed=0)
    old.load_state_dict({"position": n + 2, "seed": 9, "num_sequences": n})
    want = torch.randperm(n, generator=keyed_generator(9, 0x6F72646572, 1)).tolist()
    assert old.indices(n, n) == want
    assert DataStream(ds, seed=9, shuffle=False).indices(n - 1, 3) == [n - 1, 0, 1]


# --------------------------------------------------------------------------------------------
# same batches as the in-memory path
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("add_bos", [False, True])
def test_pretrain_shards_give_the_same_batches(tmp_path, corpus, add_bos) -> None:
    out = tmp_path / "prepared"
    # tiny shards: rows run across shard boundaries
    m = prepare_shards(read_records(corpus), out, add_bos=add_bos, shard_tokens=97, chunk_size=5)
    assert len(m["shards"]) > 5 and m["dtype"] == "uint16" and m["seq_len"] is None
    texts = list(records_to_texts(read_records(corpus)))
    assert m["num_documents"] == len(texts)
    for seq_len in (7, 64):
        mem = build_pretrain_dataset(texts, TOK, seq_len=seq_len, add_bos=add_bos)
        shards = ShardDataset(out, seq_len=seq_len, objective="pretrain")
        assert len(shards) == len(mem) and shards.seq_len == seq_len and not shards.is_sft
        ids, pl = shards.rows(range(len(shards)))
        assert pl is None and torch.equal(ids, mem.tokens)
        # several epochs, two ranks, accumulation: the same sequences in the same order
        steps = 2 * len(mem) // 16 + 3
        assert stream_batches(shards, steps=steps) == stream_batches(mem, steps=steps)


@pytest.mark.parametrize("chat_template", [False, True])
def test_sft_shards_give_the_same_batches_on_the_demo_corpus(tmp_path, chat_template) -> None:
    out = tmp_path / "sft"
    m = prepare_shards(
        read_records([DEMO]), out, objective="sft", chat_template=chat_template, shard_tokens=20_000
    )
    assert m["num_documents"] == 6000 and len(m["shards"]) > 1
    # 36: with the chat template about half of the prompts (32-37 tokens) are dropped
    for seq_len in (36, 48):
        pairs = records_to_pairs(read_records([DEMO]), TOK, chat_template=chat_template)
        mem, dropped = build_sft_dataset(pairs, seq_len=seq_len, eos_id=TOK.eos_token_id)
        shards = ShardDataset(out, seq_len=seq_len, objective="sft")
        assert shards.dropped == dropped and len(shards) == len(mem) and shards.is_sft
        assert (dropped > 0) == (chat_template and seq_len == 36)
        ids, pl = shards.rows([0, 1, len(mem) - 1])
        assert torch.equal(ids, mem.tokens[[0, 1, len(mem) - 1]])
        assert torch.equal(pl, mem.prompt_lengths[[0, 1, len(mem) - 1]])
        assert stream_batches(shards, steps=8, micro=8) == stream_batches(mem, steps=8, micro=8)


def test_output_does_not_depend_on_the_worker_count(tmp_path, corpus) -> None:
    folders = []
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        prepare_shards(
            read_records(corpus), folder, shard_tokens=300, workers=workers, chunk_size=3
        )
        folders.append(folder)
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(p.name for p in folders[1].iterdir())
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_resumed_position_on_shards_continues_the_same_batches(tmp_path, corpus) -> None:
    out = tmp_path / "p"
    prepare_shards(read_records(corpus), out)
    texts = list(records_to_texts(read_records(corpus)))
    mem = build_pretrain_dataset(texts, TOK, seq_len=16)
    a = DataStream(ShardDataset(out, seq_len=16), seed=1)
    a.advance(37)
    state = a.state_dict()
    for ds in (ShardDataset(out, seq_len=16, verify=False), mem):  # reopened, or in memory
        b = DataStream(ds, seed=123)
        b.load_state_dict(state)
        for _ in range(3):
            x = a.step_batches(micro_batch=5, grad_accum=1)[0]
            y = b.step_batches(micro_batch=5, grad_accum=1)[0]
            assert torch.equal(x.input_ids, y.input_ids) and x.keys == y.keys
            a.advance(5)
            b.advance(5)
        a.position = state["position"]
    with pytest.raises(DataError, match="sequences"):
        DataStream(ShardDataset(out, seq_len=8), seed=1).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _prepared(tmp_path, corpus) -> Path:
    out = tmp_path / "p"
    prepare_shards(read_records(corpus), out, shard_tokens=400)
    return out


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupted_shards_are_named(tmp_path, corpus) -> None:
    out = _prepared(tmp_path, corpus)
    shard = out / "shard-00001.bin"
    original = shard.read_bytes()

    def check(match: str, verify: bool = False) -> None:
        with pytest.raises(DataError, match=match) as e:
            ShardDataset(out, seq_len=8, verify=verify)
        assert "shard-00001.bin" in str(e.value)
        shard.write_bytes(original)

    _patch(shard, 0, b"NOTASHRD")
    check("bad magic")
    _patch(shard, 8, (7).to_bytes(4, "little"))
    check("version 7")
    _patch(shard, 12, (9).to_bytes(4, "little"))
    check("corrupted header")
    shard.write_bytes(original[:-3])
    check("truncated")
    shard.write_bytes(original[:10])
    check("truncated")
    shard.write_bytes(original + b"\0" * 8)
    check("corrupted")
    n_tok = int.from_bytes(original[24:32], "little")
    index_at = (HEADER_BYTES + 2 * n_tok + 7) & ~7
    _patch(shard, index_at + 8, (10**6).to_bytes(8, "little"))  # a document past the end
    check("corrupted document index")
    _patch(shard, HEADER_BYTES + 4, b"\xff")  # one token changed: only the checksum sees it
    ShardDataset(out, seq_len=8, verify=False)
    check("SHA-256", verify=True)
    shard.unlink()
    check("not found")


def test_bad_folders_and_manifests(tmp_path, corpus) -> None:
    with pytest.raises(DataError, match="no manifest.json"):
        ShardDataset(corpus[0], seq_len=8)
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "missing")
    out = _prepared(tmp_path, corpus)
    manifest = (out / MANIFEST_NAME).read_text()
    for text, match in [
        ("{not json", "not readable JSON"),
        (json.dumps({"format": "other"}), "not a llada-ext-token-shards manifest"),
        (manifest.replace('"shard-00000.bin"', '"../x.bin"'), "bad shard entry"),
        (manifest.replace('"version": 1', '"version": 9'), "version 9"),
    ]:
        (out / MANIFEST_NAME).write_text(text)
        with pytest.raises(DataError, match=match) as e:
            ShardDataset(out, seq_len=8)
        assert MANIFEST_NAME in str(e.value)
    (out / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(DataError, match="holds pretrain data"):
        ShardDataset(out, seq_len=8, objective="sft")
    (out / "checksums.sha256").unlink()
    with pytest.raises(DataError, match="checksums.sha256"):
        ShardDataset(out, seq_len=8)
    assert len(ShardDataset(out, seq_len=8, verify=False)) > 0


def _word_tokenizer(folder: Path, n: int, specials: dict[str, int] | None = None) -> Path:
    """A ``tokenizers`` word-level tokenizer: "w<i>" is id i (i < n), plus ``specials``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({**{f"w{i}": i for i in range(n)}, **(specials or {})}, "w0"))
    tok.pre_tokenizer = Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_token_dtype_and_tokenizer_files(tmp_path) -> None:
    assert choose_dtype(260) == "uint16" and choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32" and choose_dtype(260, "uint32") == "uint32"
    with pytest.raises(DataError, match="uint16 holds ids below 65536"):
        choose_dtype(126464, "uint16")
    tok_dir = _word_tokenizer(tmp_path / "tok", 70000)  # more ids than uint16 holds
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "w1 w69999 w65536"}) + "\n")
    with pytest.raises(DataError, match="uint16"):
        prepare_shards(
            read_records([data]), tmp_path / "o", tokenizer_folder=tok_dir, dtype="uint16"
        )
    assert not (tmp_path / "o").exists()
    m = prepare_shards(read_records([data]), tmp_path / "o", tokenizer_folder=tok_dir)
    assert m["dtype"] == "uint32" and m["tokenizer"]["files"] == ["tokenizer.json"]
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (
        tok_dir / "tokenizer.json"
    ).read_bytes()
    assert "tokenizer.json" in (tmp_path / "o" / "checksums.sha256").read_text()
    ids, _ = ShardDataset(tmp_path / "o", seq_len=4).rows([0])
    assert ids[0, :3].tolist() == [1, 69999, 65536]
    check_tokenizer(m, llada_ext.tokenizer.load_tokenizer(tok_dir), tok_dir)
    with pytest.raises(DataError, match="not the one the data was prepared with"):
        check_tokenizer(m, TOK, None)


def test_failed_prepare_leaves_nothing_and_names_the_record(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(9)]
    lines[5] = json.dumps({"body": "no text field"})
    data.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(DataError, match="record 5 has no 'text' field"):
            prepare_shards(read_records([data]), tmp_path / "o", workers=workers, chunk_size=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no documents"):
        prepare_shards(read_records([empty]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_prepare_help_and_refusals(tmp_path, corpus, capsys) -> None:
    assert main(["--help"]) == 0
    assert "prepare" in capsys.readouterr().out
    assert main(["prepare", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--overwrite", "--dtype", "--workers", "--sft", "--shard-tokens"):
        assert opt in text
    assert main(["train", "--help"]) == 0
    assert "llada-ext prepare" in " ".join(capsys.readouterr().out.split())
    out = str(tmp_path / "p")
    base = ["prepare", "--data", str(corpus[0]), "--out", out, "--no-progress", "--workers", "1"]
    assert main(base) == 0
    assert "train with: llada-ext train --data" in capsys.readouterr().out
    before = Path(out, "shard-00000.bin").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for argv, match in [
        (base, "already exists; pass --overwrite"),
        ([*base[:-5], "--out", str(other), "--overwrite"], "not a prepared data folder"),
        ([*base, "--sft", "--add-bos"], "--add-bos"),
        ([*base, "--chat-template"], "--sft"),
        ([*base, "--dtype", "uint16", "--tokenizer", str(tmp_path / "no")], "--tokenizer"),
        (["train", "--data", str(corpus[0]), "--data-format", "shards"], "no manifest.json"),
        (["sft", "--data", out], "holds pretrain data"),
        (["train", "--data", out, "--add-bos"], "--add-bos is applied when preparing"),
        (["train", "--data", out, str(corpus[0])], "one --data FOLDER"),
    ]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and match in err, (argv, err)
    assert (other / "keep.txt").read_text() == "mine"
    assert Path(out, "shard-00000.bin").read_bytes() == before
    assert main([*base, "--overwrite", "--shard-tokens", "100"]) == 0
    assert len(load_manifest(out)["shards"]) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_train_and_sft_on_prepared_folders(tmp_path, corpus, capsys) -> None:
    pt, sft = str(tmp_path / "pt"), str(tmp_path / "sft")
    assert main(["prepare", "--data", str(corpus[0]), "--out", pt, "--no-progress"]) == 0
    common = [
        "--preset", "tiny", "--batch-size", "2", "--no-progress", "--device", "cpu",
        "--warmup-steps", "1", "--save-every", "0",
    ]  # fmt: skip
    run = str(tmp_path / "run")
    train = ["train", "--data", pt, "--out", run, "--seq-len", "32", *common]
    assert main([*train, "--steps", "2"]) == 0
    assert "pretrain:" in capsys.readouterr().out
    assert main([*train, "--steps", "3", "--resume"]) == 0
    metrics = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # SFT on the demo corpus prepared with the chat template (prompts of 32-37 tokens)
    argv = ["prepare", "--sft", "--chat-template", "--data", str(DEMO), "--out", sft]
    assert main([*argv, "--no-progress", "--workers", "2"]) == 0
    capsys.readouterr()
    tune = ["sft", "--data", sft, "--out", str(tmp_path / "s"), "--steps", "1", *common]
    assert main([*tune, "--seq-len", "32"]) == 1
    assert "no usable SFT examples" in capsys.readouterr().err
    assert main([*tune, "--seq-len", "36"]) == 0
    out = capsys.readouterr().out
    assert "examples dropped" in out and "sft:" in out
    # a truncated shard is one plain line, and nothing is removed
    shard = Path(pt, "shard-00000.bin")
    shard.write_bytes(shard.read_bytes()[:-1])
    assert main([*train[:4], str(tmp_path / "r2"), *train[5:], "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "truncated" in err and "shard-00000.bin" in err
    assert shard.is_file() and Path(pt, MANIFEST_NAME).is_file()


def test_prepared_folder_carries_its_tokenizer_into_the_run(tmp_path, capsys) -> None:
    specials = {
        "<|startoftext|>": 256,
        "<|endoftext|>": 257,
        "<|mdm_mask|>": 258,
        "<|eot_id|>": 259,
    }
    tok = _word_tokenizer(tmp_path / "tok", 256, specials)  # the tiny preset's ids
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w7"}) + "\n" for i in range(40)))
    folder = str(tmp_path / "prepared")
    argv = ["prepare", "--data", str(data), "--out", folder, "--tokenizer", str(tok)]
    assert main([*argv, "--no-progress"]) == 0
    ids, _ = ShardDataset(folder, seq_len=8).rows([0])
    assert ids[0].tolist() == [0, 1, 7, 257, 1, 2, 7, 257]
    run = tmp_path / "run"
    train = ["train", "--data", folder, "--preset", "tiny", "--steps", "1", "--seq-len", "16"]
    train += ["--no-progress", "--device", "cpu", "--batch-size", "2"]
    assert main([*train, "--out", str(run)]) == 0
    assert (run / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    assert main([*train, "--out", str(tmp_path / "r2"), "--tokenizer", str(tok)]) == 0
    other = _word_tokenizer(tmp_path / "other", 256, {**specials, "extra": 260})
    capsys.readouterr()
    assert main([*train, "--out", str(tmp_path / "r3"), "--tokenizer", str(other)]) == 1
    assert "not the one the data was prepared with" in capsys.readouterr().err
