"""End-to-end runs of the real ``orchestrate`` command in a subprocess (each with an embedded Ray of its own), and
reading what they leave: metrics records, loss curves, recoveries, shared memory still allocated."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# Embedded clusters of the commands run here keep their session files under this folder, so a test can tell
# their processes from those of anything else running on the machine.
RAY_ROOT = tempfile.mkdtemp(prefix="orch-t", dir="/tmp")
ENV = {**os.environ, "WANDB_MODE": "disabled", "ORCHESTRATE_RAY_TMPDIR": RAY_ROOT}

STEPS = 20
COMMON = ["recipe=quickstart", f"train.steps={STEPS}", "checkpoint.persist_every=10", "checkpoint.keep=3",
          "logging.progress=false"]


def orchestrate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrate", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def run(run_dir: Path, *overrides: str, command: str = "launch") -> dict[int, float]:
    """The loss curve of a run that must succeed: quickstart for ``STEPS`` steps plus ``overrides``."""
    args = [*COMMON, *overrides] if command == "launch" else list(overrides)
    result = orchestrate(command, *args, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return curve_of(run_dir)


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
    raise AssertionError(f"the run did not get ready before its nodes were to be lost: {process.poll()}")


def tmpfs_used_bytes(path) -> int:
    """Bytes allocated in a tmpfs, including files without a name that a process still holds."""
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize
