"""End-to-end through the CLI: every parallel layout trains the same loss curve, and a checkpoint resumes
bit-identically on the same layout and within 1e-4 on any other layout."""
import json
import shutil
from pathlib import Path

import pytest

from orchestrate.models.llama.hf_import import read_hf_llama
from tests.support.runs import STEPS, assert_close_curves, orchestrate, records_of, run


def eval_loss(run_dir: Path) -> float:
    return next(r["eval_loss"] for r in records_of(run_dir) if "eval_loss" in r)


# Through the CLI here: one layout per mechanism (the pp x tp and FSDP2 tests below add theirs). The numerics of
# every composition and schedule (tp x cp, dp x tp, pp x cp, Ulysses, interleaved and zero-bubble pipelines) are
# checked against a single process in test_tensor_parallel, test_context_parallel, test_pipeline and
# test_pipeline_compose, and dp x tp across network namespaces in test_emulated_cluster.
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.dp=1", "parallel.cp=2", "parallel.cp_impl=ring"],
], ids=["tp2-sp", "cp2-ring"])
def test_layouts_train_the_same_loss_curve(reference, tmp_path, layout):
    _, expected = reference
    assert_close_curves(run(tmp_path / "run", *layout), expected, 1e-4)


@pytest.mark.slow
def test_pp2_tp2_trains_evaluates_and_resumes_elsewhere(reference, tmp_path):
    """3-D layout pp x tp with sequence parallelism: the loss curve and the held-out loss of the dp=2 run, and
    its checkpoint continues the same curve on a single worker."""
    ref_dir, expected = reference
    run_dir = tmp_path / "pp2xtp2"
    curve = run(run_dir, "parallel.dp=1", "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                "train.eval_batches=2")
    assert_close_curves(curve, expected, 1e-4)
    assert abs(eval_loss(run_dir) - eval_loss(ref_dir)) <= 1e-4
    resumed = run(tmp_path / "resumed", f"ckpt={run_dir / 'checkpoints' / 'step-000000000010'}", "parallel.dp=1",
                  command="resume")
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close_curves(resumed, expected, 1e-4)


@pytest.mark.slow
def test_resume_same_layout_is_bit_identical(reference, tmp_path):
    run_dir, expected = reference
    checkpoint = run_dir / "checkpoints" / "step-000000000010"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000000000020"
    resumed = run(tmp_path / "resumed", f"ckpt={checkpoint}", command="resume")
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert resumed == {s: expected[s] for s in resumed}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp=1", "parallel.tp=2"], ["parallel.dp=1", "parallel.pp=2"],
                                    ["parallel.dp=1", "parallel.pp=2", "parallel.tp=2"]],
                         ids=["tp2", "pp2", "pp2xtp2"])  # to dp=1 alone: test_pp2_tp2_trains_evaluates_and_resumes_elsewhere
def test_resume_on_another_layout_continues_the_curve(reference, tmp_path, layout):
    run_dir, expected = reference
    resumed = run(tmp_path / "resumed", f"ckpt={run_dir / 'checkpoints' / 'step-000000000010'}", *layout,
                  command="resume")
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close_curves(resumed, expected, 1e-4)


@pytest.mark.slow
def test_bad_checkpoints_exit_2_naming_the_problem(reference, tmp_path):
    run_dir, _ = reference
    source = run_dir / "checkpoints" / "step-000000000010"
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    fragment = sorted(truncated.glob("*.safetensors"))[0]
    fragment.write_bytes(fragment.read_bytes()[:-100])
    result = orchestrate("resume", f"ckpt={truncated}", f"run.dir={tmp_path / 'r1'}")
    assert result.returncode == 2 and fragment.name in result.stderr, result.stderr
    newer = tmp_path / "newer"
    shutil.copytree(source, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    result = orchestrate("resume", f"ckpt={newer}")
    assert result.returncode == 2 and "newer than the supported version" in result.stderr
    result = orchestrate("resume", f"ckpt={source}", "model.n_layers=2")
    assert result.returncode == 2 and "is in the checkpoint but not in the model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fsdp2_trains_recovers_resumes_and_exports(reference, tmp_path):
    """FSDP2 (parameters, gradients and optimizer state sharded over dp) through the CLI: a rank killed at step 14
    recovers from memory (FSDP shards have no replica) and the run keeps the dp=2 curve; its checkpoint resumes on
    FSDP2 with the very losses of the run (so both the resume and the recovery were exact) and on tp=2 with the
    curve; it exports to Hugging Face. (A DDP checkpoint loads on FSDP2 through the same path as an FSDP2 one.)"""
    _, expected = reference
    fsdp = ["parallel.dp=2", "parallel.dp_shard=true"]
    run_dir = tmp_path / "fsdp"
    curve = run(run_dir, *fsdp, "fault.kill_rank=1", "fault.at_step=14")
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert_close_curves(curve, expected, 1e-4)
    events = records_of(run_dir)
    [recovery] = [e["recovery"] for e in events if "recovery" in e]
    assert recovery["restarted_ranks"] == [1] and recovery["source"] == "keeper"
    at_10 = f"ckpt={run_dir / 'checkpoints' / 'step-000000000010'}"
    resumed = run(tmp_path / "resumed", at_10, *fsdp, command="resume")
    assert resumed == {s: curve[s] for s in range(11, STEPS + 1)}
    assert_close_curves(run(tmp_path / "to-tp", at_10, "parallel.dp=1", "parallel.tp=2", "parallel.dp_shard=false",
                            command="resume"),
                        expected, 1e-4)
    exported = orchestrate("export", f"ckpt={run_dir / 'checkpoints'}", f"out={tmp_path / 'hf'}")
    assert exported.returncode == 0, exported.stderr
    assert read_hf_llama(tmp_path / "hf").hp.n_layers == 4
