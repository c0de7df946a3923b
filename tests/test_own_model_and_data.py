"""Your own model and data, through the real CLI: ``prepare-data`` trains a BPE tokenizer and writes token shards,
a run trains on them (the vocabulary follows the tokenizer; wandb's offline log holds the same losses and the
config), ``export`` writes a Hugging Face folder with the tokenizer, and the ``continue`` recipe starts from that
folder on a tensor-parallel layout with the exported model's own loss on the first batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrate.data import ResumableSampler, WindowedTokens, load_tokens
from orchestrate.models.llama import cross_entropy_loss
from tests.support.runs import ENV, losses, orchestrate, ray_processes_of_ours

transformers = pytest.importorskip("transformers")
VOCAB = 400


def write_inputs(folder: Path) -> list[str]:
    """Three formats of real text (the standard library's own modules): .txt, .jsonl and .parquet."""
    import sysconfig

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:45]
    texts = [p.read_text(errors="replace") for p in sources]
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(texts[:15]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[15:30]))
    pq.write_table(pa.table({"text": texts[30:]}), folder / "c.parquet")
    return [str(folder / name) for name in ("a.txt", "b.jsonl", "c.parquet")]


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the offline run's .wandb transaction log, read back by wandb's own reader."""
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    shown = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline)],
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert shown.returncode == 0, shown.stderr
    return [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]


def first_batch_loss(hf_folder: Path, tokens_folder: Path, global_batch: int, seq_len: int) -> float:
    """The loss transformers' own Llama gives on the first global batch of the run's sample stream."""
    data = WindowedTokens(load_tokens("path", str(tokens_folder), 0), seq_len, 0.02)
    ids = ResumableSampler(data.n_train, global_batch, 0, 1, seed=0).next_window_ids()
    inputs, targets = data.batch(ids)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        return cross_entropy_loss(model(inputs).logits, targets).item()


@pytest.mark.slow
def test_prepare_train_export_and_continue_from_the_export(tmp_path):
    tokens = tmp_path / "tokens"
    prepared = orchestrate("prepare-data", "--train-tokenizer", str(VOCAB), "--out", str(tokens),
                           *write_inputs(tmp_path / "inputs"))
    assert prepared.returncode == 0, prepared.stderr
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["vocab_size"] == VOCAB and manifest["val_tokens"] > 0

    run_dir = tmp_path / "run"
    trained = orchestrate("launch", "recipe=quickstart", "data.source=path", f"data.path={tokens}", "train.steps=6",
                          "checkpoint.persist_every=6", "logging.wandb.enabled=true", f"run.dir={run_dir}",
                          env={**ENV, "WANDB_MODE": "offline"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    assert f"vocab_size: {VOCAB}" in config and f"tokenizer_hash: {manifest['tokenizer_hash']}" in config
    records = wandb_records(run_dir)
    logged = {r["history"]["item"]["_step"]: r["history"]["item"]["loss"] for r in records
              if r["type"] == "history" and "loss" in r["history"]["item"]}
    assert logged == dict(enumerate(losses(run_dir), start=1))
    [run_record] = [r["run"] for r in records if r["type"] == "run"]
    logged_config = run_record["config"]["update"]
    assert logged_config["train"]["steps"] == 6 and logged_config["model"]["vocab_size"] == VOCAB

    hf = tmp_path / "hf"
    exported = orchestrate("export", f"ckpt={run_dir / 'checkpoints'}", f"out={hf}")
    assert exported.returncode == 0, exported.stderr
    assert (hf / "tokenizer.json").read_bytes() == (tokens / "tokenizer.json").read_bytes()
    conflict = orchestrate("config", "recipe=continue", f"model.init_from={hf}", f"data.path={tokens}",
                           "model.dim=64")
    assert conflict.returncode == 2
    assert conflict.stderr.strip() == (f"orchestrate: error: model.dim=64: conflicts with model.init_from={hf}, "
                                       f"whose config.json gives 128")

    continued_dir = tmp_path / "continued"
    continued = orchestrate("launch", "recipe=continue", f"model.init_from={hf}", f"data.path={tokens}",
                            "parallel.dp=1", "parallel.tp=2", "train.steps=2", "train.eval_batches=0",
                            "train.eval_every=0", f"run.dir={continued_dir}")
    assert continued.returncode == 0, continued.stderr[-3000:]
    expected = first_batch_loss(hf, tokens, global_batch=8, seq_len=128)
    assert abs(losses(continued_dir)[0] - expected) < 1e-4, (losses(continued_dir), expected)
    assert losses(continued_dir)[0] < losses(run_dir)[0]  # it starts from the trained weights


def test_bad_data_is_one_line_exit_2_before_ray_or_a_run_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    for path, problem in ((tmp_path / "missing", "no such file or folder"),
                          (empty, "every file is empty (0 bytes)")):
        result = orchestrate("launch", "recipe=quickstart", "data.source=path", f"data.path={path}",
                             f"run.dir={tmp_path / 'run'}", timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip() == f"orchestrate: error: data.path={path}: {problem}"
        assert not (tmp_path / "run").exists() and not ray_processes_of_ours()


def test_resume_refuses_tokens_of_another_tokenizer(reference, tmp_path):
    """The reference run trained on bytes; shards made with a trained tokenizer are refused, naming both."""
    run_dir, _ = reference
    (tmp_path / "in.txt").write_text("some text for a tokenizer " * 400)
    prepared = orchestrate("prepare-data", "--train-tokenizer", "300", "--out", str(tmp_path / "tokens"),
                           str(tmp_path / "in.txt"))
    assert prepared.returncode == 0, prepared.stderr
    tokenizer_hash = json.loads((tmp_path / "tokens" / "manifest.json").read_text())["tokenizer_hash"]
    result = orchestrate("resume", f"ckpt={run_dir / 'checkpoints'}", "data.source=path",
                         f"data.path={tmp_path / 'tokens'}", f"run.dir={tmp_path / 'resumed'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"tokenized with tokenizer {tokenizer_hash[:12]}, but the checkpoint was trained on tokens of bytes" \
        in result.stderr
    assert not (tmp_path / "resumed").exists()


def test_config_and_recipes_dir_through_the_cli(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\nrun:\n  name: mine\ntrain:\n  steps: 7\nparallel:\n  dp: 1\n")
    shown = orchestrate("config", "--recipes-dir", str(tmp_path), "recipe=mine", "train.seq_len=64")
    assert shown.returncode == 0, shown.stderr
    assert "name: mine" in shown.stdout and "steps: 7" in shown.stdout and "seq_len: 64" in shown.stdout
    unknown = orchestrate("config", "recipe=mine")  # without --recipes-dir the recipe does not exist
    assert unknown.returncode == 2 and "recipe=mine: unknown recipe" in unknown.stderr
    assert os.listdir(tmp_path) == ["recipe"]  # config runs nothing and writes nothing
