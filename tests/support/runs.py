"""End-to-end runs of the real ``orchestrate`` command in a subprocess (each with an embedded Ray of its own), and
reading what they leave: metrics records, loss curves, recoveries, shared memory still allocated."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

# Embedded clusters of the commands run here keep their session files under this folder, so a test can tell
# their processes from those of anything else running on the machine.
RAY_ROOT = tempfile.mkdtemp(prefix="orch-t", dir="/tmp")
ENV = {**os.environ, "WANDB_MODE": "disabled", "ORCHESTRATE_RAY_TMPDIR": RAY_ROOT}

STEPS = 20
COMMON = ["recipe=quickstart", f"train.steps={STEPS}", "checkpoint.persist_every=10", "checkpoint.keep=3",
          "logging.progress=false"]


def orchestrate(*args: str, timeout: float = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The command's result; one that runs longer than ``timeout`` fails the test with where it waited."""
    command = [sys.executable, "-m", "orchestrate", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"not finished after {timeout:.0f}s: {stacks_of_hung_run(process)}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def print_stacks(process: subprocess.Popen) -> None:
    """A run's controller (``process``) and the worker and keeper actors on this machine print every thread's
    stack to their output (SIGUSR1, which they hand to faulthandler) and go on."""
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith(("ray::TrainWorker", "ray::SnapshotKeeper")):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGUSR1)
    time.sleep(3)  # the actors' logs reach the controller's output
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGUSR1)
    time.sleep(1)


def stacks_of_hung_run(process: subprocess.Popen) -> str:
    """Where a run that does not finish waits (``print_stacks``), then the run is killed. Returns the
    controller's innermost frames of its own code, then the tail of the run's output."""
    print_stacks(process)
    process.kill()
    stdout, stderr = process.communicate()
    own = "\n".join(line for line in stderr.splitlines() if "pid=" not in line)  # not the actors' lines
    main_thread = own.rpartition("(most recent call first):")[2].split("\n\n")[0].splitlines()  # listed last
    ours = [line.strip().replace("File ", "") for line in main_thread if line.strip() and "site-packages" not in line]
    frames = " < ".join(ours[:4])
    return f"the controller waits in {frames or '?'}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-12000:]}"


def run(run_dir: Path, *overrides: str, command: str = "launch") -> dict[int, float]:
    """The loss curve of a run that must succeed: quickstart for ``STEPS`` steps plus ``overrides``."""
    args = [*COMMON, *overrides] if command == "launch" else list(overrides)
    result = orchestrate(command, *args, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:] + stacks_of_failed_run(run_dir)
    return curve_of(run_dir)


def stacks_of_failed_run(run_dir: Path) -> str:
    """The stacks every rank's threads had when the run failed (the controller writes them after a rank's error)."""
    files = sorted((run_dir / "stacks").glob("rank-*.txt"))
    return "".join(f"\n--- {path.name}\n{path.read_text()[-6000:]}" for path in files)


def ray_processes_of_ours() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any(RAY_ROOT in part for part in (p.info["cmdline"] or []))}


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records_of(run_dir) if "loss" in r]


def curve_of(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records_of(run_dir) if r.get("loss") is not None}


def recoveries_of(run_dir: Path) -> list[dict]:
    return [r["recovery"] for r in records_of(run_dir) if "recovery" in r]


def assert_close_curves(actual: dict[int, float], expected: dict[int, float], tolerance: float) -> None:
    assert actual.keys() <= expected.keys() and actual
    worst = max(abs(actual[s] - expected[s]) for s in actual)
    assert worst <= tolerance, (worst, actual, expected)


def wait_for_records(run_dir: Path, ready, process, timeout_s: float = 120) -> None:
    """Until ``ready(records)`` holds for the run's metrics so far."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if ready([json.loads(line) for line in lines[:-1]]):  # the last line may be partial
            return
        time.sleep(0.1)
    hung = stacks_of_hung_run(process) if process.poll() is None else process.returncode
    raise AssertionError(f"the run did not get ready before its nodes were to be lost: {hung}")


def tmpfs_used_bytes(path) -> int:
    """Bytes allocated in a tmpfs, including files without a name that a process still holds."""
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize
