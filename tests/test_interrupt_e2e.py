"""Ctrl-C and SIGTERM through the CLI: the first saves the newest snapshot as a universal checkpoint and says how
to resume (exit 130 / 143); the resumed run computes the steps after it exactly as the interrupted run did; a
second Ctrl-C stops at once. SIGUSR1 before the interrupt prints where each process is (faulthandler) and changes
nothing."""
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.runs import ENV, orchestrate, print_stacks, ray_processes_of_ours, records_of

# a constant learning rate: train.steps does not change the losses, so a resume may stop earlier
RUN = ["recipe=quickstart", "optim.schedule=constant", "logging.progress=false", "checkpoint.persist_every=0"]


def step_losses(run_dir):
    records = records_of(run_dir)
    return {r["step"]: r["loss"] for r in records if "step_time" in r}


def start(run_dir, *overrides):
    return subprocess.Popen([sys.executable, "-m", "orchestrate", "launch", *RUN, "train.steps=100000", *overrides,
                             f"run.dir={run_dir}"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(process, run_dir, step, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "metrics.jsonl").exists() or max(step_losses(run_dir), default=0) < step:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``losses_through(step)``: step -> loss of the run that never stops, through at least ``step`` (checkpoint
    settings and, at a constant lr, train.steps do not change the losses, so one run serves both interrupted runs
    unless a fast host let one of them go further before its signal)."""
    runs = []

    def losses_through(step):
        if not runs or max(runs[-1]) < step:
            run_dir = tmp_path_factory.mktemp("clean")
            clean = orchestrate("launch", *RUN, f"train.steps={max(step + 20, 60)}", f"run.dir={run_dir}")
            assert clean.returncode == 0, clean.stderr[-2000:]
            runs.append(step_losses(run_dir))
        return runs[-1]

    return losses_through


@pytest.mark.slow
@pytest.mark.parametrize("keepers, sig", [("true", signal.SIGINT), ("false", signal.SIGTERM)])
def test_an_interrupt_saves_the_newest_snapshot_and_the_resume_goes_on_identically(tmp_path, uninterrupted, keepers,
                                                                                   sig):
    run_dir = tmp_path / "interrupted"
    process = start(run_dir, f"checkpoint.keepers={keepers}")
    wait_for_step(process, run_dir, 6)
    print_stacks(process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr[-2000:]
    dumps = [line for line in stderr.splitlines() if "(most recent call first)" in line]
    actors = {"TrainWorker"} | ({"SnapshotKeeper"} if keepers == "true" else set())
    assert {actor for actor in actors for line in dumps if f"({actor} pid=" in line} == actors, stderr[-4000:]
    assert any("pid=" not in line for line in dumps) and "orchestrator/controller.py" in stderr
    saved = re.search(r"step (\d+) saved in (\S+)\nresume with: orchestrate resume ckpt=(\S+)", stderr)
    assert saved and saved.group(2) == saved.group(3) == str(run_dir / "checkpoints"), stderr[-2000:]
    step = int(saved.group(1))
    before = step_losses(run_dir)
    assert 6 <= step <= max(before)
    assert not ray_processes_of_ours()

    resumed_dir = tmp_path / "resumed"
    result = orchestrate("resume", f"ckpt={saved.group(3)}", f"train.steps={step + 3}", f"run.dir={resumed_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    # before the interrupt and after the resume, every step as in the run that never stopped, bit for bit
    reference = uninterrupted(max(*before, step + 3))
    assert before == {s: reference[s] for s in before}
    assert step_losses(resumed_dir) == {s: reference[s] for s in range(step + 1, step + 4)}


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    process = start(tmp_path / "run", "checkpoint.keepers=true")
    wait_for_step(process, tmp_path / "run", 2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "stopped without saving" in stderr, stderr[-2000:]
    assert time.monotonic() - started < 30
    assert not ray_processes_of_ours()
