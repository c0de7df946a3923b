"""End-to-end through the CLI: every parallel layout trains the same loss curve, and a checkpoint resumes
bit-identically on the same layout and within 1e-4 on any other layout."""
import json
import shutil
from pathlib import Path

import pytest

from tests.test_cli import orchestrate

STEPS = 20
COMMON = ["recipe=quickstart", f"train.steps={STEPS}", "checkpoint.persist_every=10", "checkpoint.keep=3",
          "logging.progress=false"]


def run(run_dir: Path, *overrides: str, command: str = "launch") -> dict[int, float]:
    args = [*COMMON, *overrides] if command == "launch" else list(overrides)
    result = orchestrate(command, *args, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def assert_close_curves(actual: dict[int, float], expected: dict[int, float], tolerance: float) -> None:
    assert actual.keys() <= expected.keys() and actual
    worst = max(abs(actual[s] - expected[s]) for s in actual)
    assert worst <= tolerance, (worst, actual, expected)


def eval_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in records if "eval_loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.dp=1", "parallel.cp=2", "parallel.cp_impl=ring"],
    ["parallel.dp=1", "parallel.cp=2", "parallel.cp_impl=ulysses"],
    ["parallel.dp=1", "parallel.tp=2", "parallel.cp=2"],
    ["parallel.dp=2", "parallel.tp=2"],
    ["parallel.dp=1", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    ["parallel.dp=1", "parallel.pp=2", "parallel.cp=2", "parallel.cp_impl=ring"],
], ids=["tp2-sp", "cp2-ring", "cp2-ulysses", "tp2xcp2", "dp2xtp2", "pp2-interleaved", "pp2xcp2-ring"])
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
@pytest.mark.parametrize("layout", [["parallel.dp=1"], ["parallel.dp=1", "parallel.tp=2"],
                                    ["parallel.dp=1", "parallel.pp=2"],
                                    ["parallel.dp=1", "parallel.pp=2", "parallel.tp=2"]],
                         ids=["dp1", "tp2", "pp2", "pp2xtp2"])
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
