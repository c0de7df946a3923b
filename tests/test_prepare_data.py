"""Tokenizers, ``orchestrate prepare-data`` and reading its folders: pure unit and CLI-module tests (no Ray)."""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrate.config import DataConfig
from orchestrate.data import WindowedTokens, eval_window_ids, inspect_data, load_tokens, write_token_file
from orchestrate.token_shards import MANIFEST_FILE, TokenManifest, ShardedTokens, read_manifest, token_dtype_for
from orchestrate.prepare_data import ShardWriter, add_command, held_out_count, prepare, run_command
from orchestrate.tokenizer import (END_OF_TEXT, ByteTokenizer, DataError, JsonTokenizer, load_tokenizer,
                                    train_bpe_tokenizer)

REPO = Path(__file__).resolve().parents[1]


SYLLABLES = ["ka", "lo", "mi", "ré", "tu", "sh", "ün", "ex", "po", "zz", "ar", "qi", "on", "el", "st", "ing"]


def sample_text(i: int) -> str:
    """Varied enough for a few hundred BPE merges; with accents, indentation and blank lines."""
    rng = random.Random(i)
    words = lambda n: " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))  # noqa
    return "".join(f"def {words(1)}_{i}({words(2).replace(' ', ', ')}):\n    # {words(8)}\n\n" for _ in range(4))


# the documents of the corpus folder, in the order prepare-data reads them
DOCUMENTS = [sample_text(i) for i in range(9)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """a.txt, b.md, c.jsonl (3 records), d.parquet (2 rows), sub/e.py, sub/f.txt, and files prepare-data skips."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    (root / "a.txt").write_text(DOCUMENTS[0])
    (root / "b.md").write_text(DOCUMENTS[1])
    records = [{"text": t, "id": n} for n, t in enumerate(DOCUMENTS[2:5])]
    (root / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]))
    pq.write_table(pa.table({"id": [5, 6], "text": DOCUMENTS[5:7]}), root / "d.parquet")
    (root / "sub" / "e.py").write_text(DOCUMENTS[7])
    (root / "sub" / "f.txt").write_text(DOCUMENTS[8])
    (root / "sub" / "empty.txt").write_text("")  # not a document
    (root / "notes.csv").write_text("not,an,input\n")
    return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> JsonTokenizer:
    return train_bpe_tokenizer(iter(DOCUMENTS), 400, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def prepared(corpus, bpe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "tokens"
    prepare([str(corpus)], str(out), tokenizer_spec=str(bpe.path), val_fraction=0.25, shard_tokens=300)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and all(part in message for part in parts), message


# ---- tokenizers -------------------------------------------------------------------------------------------

def test_bpe_training_is_deterministic_and_round_trips(bpe, tmp_path):
    again = train_bpe_tokenizer(iter(DOCUMENTS), 400, tmp_path / "again.json")
    assert again.hash == bpe.hash == sha256(bpe.path)
    assert bpe.vocab_size == 400 and bpe.end_of_document_id is not None
    ids = bpe.encode(DOCUMENTS[3])
    assert len(ids) < len(DOCUMENTS[3].encode()) / 2  # merges learned
    assert bpe.decode(ids) == DOCUMENTS[3]
    assert [list(i) for i in bpe.encode_batch(DOCUMENTS[:2])] == [list(bpe.encode(t)) for t in DOCUMENTS[:2]]
    with pytest.raises(DataError, match="vocab_size=100"):
        train_bpe_tokenizer(iter(DOCUMENTS), 100, tmp_path / "small.json")


def test_load_tokenizer_specs_and_errors(bpe, tmp_path):
    byte = load_tokenizer("bytes")
    assert isinstance(byte, ByteTokenizer) and (byte.vocab_size, byte.hash) == (256, "bytes")
    assert load_tokenizer(str(bpe.path)).hash == bpe.hash
    assert load_tokenizer(str(bpe.path.parent)).hash == bpe.hash  # a folder holding tokenizer.json
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "garbage.json").write_bytes(b"\xff\x00")
    for bad in ["missing.json", "bad.json", "garbage.json", "."]:
        with pytest.raises(DataError) as excinfo:
            load_tokenizer(str(tmp_path / bad))
        assert_one_line_error(excinfo, f"data.tokenizer={tmp_path / bad}", "valid: bytes or a path")


# ---- prepare-data -----------------------------------------------------------------------------------------

def test_manifest_describes_the_shards(prepared, bpe):
    manifest = json.loads((prepared / MANIFEST_FILE).read_text())
    assert manifest["format"] == "orchestrate-tokens/1" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer_hash"] == sha256(prepared / "tokenizer.json") == bpe.hash
    assert manifest["vocab_size"] == 400 and manifest["documents"] == len(DOCUMENTS)
    assert len(manifest["train"]) > 1 and [s["file"] for s in manifest["val"]] == ["val-00000.bin"]
    for split in ("train", "val"):
        for shard in manifest[split]:
            assert shard["tokens"] == (prepared / shard["file"]).stat().st_size // 2 and shard["tokens"] <= 300
        assert manifest[f"{split}_tokens"] == sum(s["tokens"] for s in manifest[split])
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["tokenizer.json", MANIFEST_FILE] + [s["file"] for s in manifest["train"] + manifest["val"]])
    assert not list(prepared.parent.glob(".tokens.tmp-*"))


def test_shards_decode_to_the_documents_in_order(prepared, bpe):
    manifest = read_manifest(prepared)
    n_val = held_out_count(len(DOCUMENTS), 0.25)
    assert n_val == 2

    def split_text(shards) -> list[str]:
        ids = np.concatenate([np.fromfile(prepared / s.file, dtype="<u2") for s in shards])
        return bpe.decode(ids).split(END_OF_TEXT)

    assert split_text(manifest.train) == DOCUMENTS[:-n_val] + [""]  # each document ends with <|endoftext|>
    assert split_text(manifest.val) == DOCUMENTS[-n_val:] + [""]


def test_single_document_holds_out_its_token_tail(tmp_path):
    (tmp_path / "one.txt").write_text("x" * 1000)
    prepare([str(tmp_path / "one.txt")], str(tmp_path / "out"), tokenizer_spec="bytes", val_fraction=0.1)
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.train_tokens, manifest.val_tokens, manifest.tokenizer_hash) == (900, 100, "bytes")
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the byte tokenizer has no file


def test_prepared_folder_is_memory_mapped_with_its_val_split(prepared):
    manifest = read_manifest(prepared)
    tokens = load_tokens("path", str(prepared), max_bytes=0)
    assert isinstance(tokens, ShardedTokens) and len(tokens) == manifest.train_tokens
    assert all(isinstance(s, np.memmap) for s in tokens.shards + tokens.held_out.shards)
    train = np.concatenate([np.fromfile(prepared / s.file, dtype="<u2") for s in manifest.train])
    val = np.fromfile(prepared / "val-00000.bin", dtype="<u2")
    data = WindowedTokens(tokens, seq_len=16, val_fraction=0.9)  # the folder's split wins over val_fraction
    assert data.n_train == (len(train) - 1) // 16 and data.n_windows - data.n_train == (len(val) - 1) // 16
    crossing = 300 // 16  # the window that spans the first shard boundary
    assert np.array_equal(data.window(crossing), train[crossing * 16: crossing * 16 + 17])
    eval_ids = np.concatenate(eval_window_ids(data, 2, global_batch=4, dp_rank=0, dp_size=1))
    assert eval_ids.min() >= data.n_train
    inputs, targets = data.batch(eval_ids[:1])
    assert inputs[0].tolist() == val[:16].tolist() and targets[0].tolist() == val[1:17].tolist()


def test_token_dtype_and_a_uint32_folder(tmp_path):
    assert [token_dtype_for(v) for v in (256, 65536, 65537, 128256)] == ["uint16", "uint16", "uint32", "uint32"]
    ids = np.array([0, 65535, 65536, 128255, 7, 99_999], dtype=np.uint32)
    train, val = ShardWriter(tmp_path, "train", 4, "uint32"), ShardWriter(tmp_path, "val", 4, "uint32")
    train.write(ids)
    val.write(ids[:3])
    train.close(), val.close()
    assert [(s.file, s.tokens) for s in train.shards] == [("train-00000.bin", 4), ("train-00001.bin", 2)]
    assert (tmp_path / "train-00000.bin").stat().st_size == 16
    manifest = TokenManifest("f" * 64, 128256, "uint32", tuple(train.shards), tuple(val.shards), 2, ("x",))
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest.to_json()))
    assert read_manifest(tmp_path) == manifest
    tokens = load_tokens("path", str(tmp_path), 0)
    assert tokens[0:6].tolist() == ids.tolist() and tokens.held_out[0:3].tolist() == ids[:3].tolist()


def test_load_tokens_uses_a_json_tokenizer_for_text(bpe, tmp_path):
    (tmp_path / "a.txt").write_text(DOCUMENTS[0])
    (tmp_path / "b.txt").write_text(DOCUMENTS[1])
    tokens = load_tokens("path", str(tmp_path), 100_000, tokenizer=str(bpe.path))
    assert tokens.dtype == np.uint16 and bpe.decode(tokens) == DOCUMENTS[0] + "\n\n" + DOCUMENTS[1]


@pytest.mark.parametrize("case", ["out_not_empty", "missing_input", "jsonl_no_field", "jsonl_not_json",
                                  "parquet_no_column", "no_documents", "val_fraction", "train_vocab",
                                  "bad_tokenizer"])
def test_prepare_errors_are_one_line_and_leave_nothing(case, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "ok.txt").write_text("some text")
    options = {"tokenizer_spec": "bytes"}
    expected = [str(inputs)]
    if case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = [f"--out={out}"]
    elif case == "missing_input":
        inputs = tmp_path / "nope"
        expected = [f"input {inputs}"]
    elif case == "jsonl_no_field":
        (inputs / "r.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        expected = [f"{inputs / 'r.jsonl'}:2", "'text'"]
    elif case == "jsonl_not_json":
        (inputs / "r.jsonl").write_text('{"text": "a"}\n\n[oops\n')
        expected = [f"{inputs / 'r.jsonl'}:3", "JSON"]
    elif case == "parquet_no_column":
        pq.write_table(pa.table({"body": ["x"], "id": [1]}), inputs / "t.parquet")
        expected = [str(inputs / "t.parquet"), "'text'", "body, id"]
    elif case == "no_documents":
        (inputs / "ok.txt").write_text("")
        expected = ["no documents"]
    elif case == "val_fraction":
        options["val_fraction"] = 1.0
        expected = ["--val-fraction=1.0", "0 <= F < 1"]
    elif case == "train_vocab":
        options = {"train_vocab": 100}
        expected = ["--train-tokenizer=100", "257"]
    elif case == "bad_tokenizer":
        options = {"tokenizer_spec": str(tmp_path / "nope.json")}
        expected = [f"--tokenizer={tmp_path / 'nope.json'}"]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as excinfo:
        prepare([str(inputs)], str(out), **options)
    assert_one_line_error(excinfo, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DIR, no temp folder


def test_failure_while_writing_removes_the_temp_folder(tmp_path, monkeypatch):
    import orchestrate.prepare_data as prepare_data

    (tmp_path / "a.txt").write_text("text")

    def interrupted(*args, **kwargs):
        assert list(tmp_path.glob(".out.tmp-*"))  # the temp folder exists while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_splits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), tokenizer_spec="bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_an_empty_out_folder_is_replaced(tmp_path):
    (tmp_path / "a.txt").write_text("text one")
    (tmp_path / "out").mkdir()
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), tokenizer_spec="bytes")
    assert read_manifest(tmp_path / "out").train_tokens > 0


def test_run_command_through_the_subparser(corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="orchestrate")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare-data", "--tokenizer", "bytes", "--out", str(tmp_path / "o"),
                              "--shard-tokens", "1000", str(corpus / "a.txt"), str(corpus / "c.jsonl")])
    assert run_command(args) == 0
    assert read_manifest(tmp_path / "o").inputs == (str(corpus / "a.txt"), str(corpus / "c.jsonl"))
    assert f"4 documents in 2 shards: {tmp_path / 'o'}" in capsys.readouterr().out
    args.out = str(tmp_path / "o")
    assert run_command(args) == 2
    assert capsys.readouterr().err.startswith(f"orchestrate: error: --out={tmp_path / 'o'}: exists")


def run_module(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrate.prepare_data", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_module_cli_trains_a_tokenizer_and_fails_cleanly(corpus, tmp_path):
    done = run_module("--train-tokenizer", "300", "--out", str(tmp_path / "o"), str(corpus))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "from 9 documents" in done.stdout
    assert len(done.stderr.splitlines()) <= 5  # not a terminal: a few plain progress lines
    info = inspect_data(DataConfig(source="path", path=str(tmp_path / "o")))
    assert info.vocab_size == 300 and info.tokenizer == str(tmp_path / "o" / "tokenizer.json")
    failed = run_module("--tokenizer", "bytes", "--out", str(tmp_path / "p"), str(tmp_path / "missing"))
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.splitlines() == [f"orchestrate: error: input {tmp_path / 'missing'}: no such file or "
                                          f"folder; valid: files or folders of .txt, .md, .py, .jsonl, .parquet "
                                          f"files"]
    assert not (tmp_path / "p").exists()


# ---- inspect_data -----------------------------------------------------------------------------------------

def test_inspect_data_sources(prepared, bpe, tmp_path):
    info = inspect_data(DataConfig())
    assert (info.vocab_size, info.tokenizer_hash, info.tokenizer) == (256, "bytes", "bytes")
    assert "stdlib" in info.description
    assert inspect_data(DataConfig(tokenizer=str(bpe.path))).vocab_size == 400
    write_token_file(np.arange(10), tmp_path / "t.u16")
    assert inspect_data(DataConfig(source="path", path=str(tmp_path / "t.u16"))).vocab_size == 256
    info = inspect_data(DataConfig(source="path", path=str(prepared)))
    assert (info.vocab_size, info.tokenizer_hash) == (400, bpe.hash)
    assert info.tokenizer == str(prepared / "tokenizer.json")
    info = inspect_data(DataConfig(source="path", path=str(prepared), tokenizer=str(bpe.path)))
    assert info.tokenizer == str(bpe.path)


def test_inspect_data_refuses_another_tokenizer_for_a_prepared_folder(prepared, bpe, tmp_path):
    other = train_bpe_tokenizer(iter(DOCUMENTS), 300, tmp_path / "other.json")
    with pytest.raises(DataError) as excinfo:
        inspect_data(DataConfig(source="path", path=str(prepared), tokenizer=str(other.path)))
    assert_one_line_error(excinfo, f"data.path={prepared}", bpe.hash[:12], other.hash[:12])


def _break_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    change(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def make_bad_path(case: str, root: Path, prepared: Path) -> tuple[Path, str]:
    """A data.path that inspect_data must refuse, and a part of the message that names the problem."""
    path = root / case
    if case == "missing":
        return path, "no such file or folder"
    if case == "broken_symlink":
        path.symlink_to(root / "nowhere")
        return path, "broken symbolic link"
    if case == "fifo":
        os.mkfifo(path)
        return path, "not a regular file"
    if case == "empty_folder":
        path.mkdir()
        return path, "no files"
    if case == "empty_files":
        (path / "sub").mkdir(parents=True)
        (path / "a.txt").write_text("")
        (path / "sub" / "b.txt").write_text("")
        return path, "every file is empty"
    if case == "odd_token_file":
        path = root / "odd.u16"
        path.write_bytes(b"\x01\x00\x02")
        return path, "3 bytes"
    path.mkdir()
    for file in prepared.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    if case == "missing_shard":
        (path / "train-00001.bin").unlink()
        return path, "lists train-00001.bin, which is missing"
    if case == "short_shard":
        (path / "val-00000.bin").write_bytes(b"\x00\x00")
        return path, "val-00000.bin has 2 bytes"
    if case == "manifest_not_json":
        (path / MANIFEST_FILE).write_text("{oops")
        return path, "manifest.json is malformed"
    if case == "manifest_wrong_format":
        _break_manifest(path, lambda m: m.update(format="other/2"))
        return path, "format 'other/2'"
    if case == "manifest_missing_key":
        _break_manifest(path, lambda m: m.pop("train"))
        return path, "'train' is missing"
    if case == "manifest_escaping_shard":
        _break_manifest(path, lambda m: m["train"][0].update(file="../secret.bin"))
        return path, "not a plain file name"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "broken_symlink", "fifo", "empty_folder", "empty_files",
                                  "odd_token_file", "missing_shard", "short_shard", "manifest_not_json",
                                  "manifest_wrong_format", "manifest_missing_key", "manifest_escaping_shard"])
def test_inspect_data_errors_name_the_path(case, prepared, tmp_path):
    path, problem = make_bad_path(case, tmp_path, prepared)
    with pytest.raises(DataError) as excinfo:
        inspect_data(DataConfig(source="path", path=str(path)))
    assert_one_line_error(excinfo, f"data.path={path}", problem)


def test_inspect_data_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not stop reads (FIFOs and broken links cover it)")
        with pytest.raises(DataError) as excinfo:
            inspect_data(DataConfig(source="path", path=str(path)))
        assert_one_line_error(excinfo, f"data.path={path}", "cannot read")
    finally:
        path.chmod(0o644)


def test_inspect_data_config_errors():
    with pytest.raises(DataError, match="data.path=None"):
        inspect_data(DataConfig(source="path"))
    with pytest.raises(DataError, match="data.source=web: valid: stdlib, path"):
        inspect_data(DataConfig(source="web"))
