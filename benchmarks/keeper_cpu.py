"""Where the CPU goes while a run trains, per kind of process: the CPU milliseconds per training step that the
ranks, the keepers, Ray's own processes and the controller use, for the keeper-overhead configurations of
``benchmarks/recovery.py --part overhead``. A diagnostic for the step-time ratios there: on 2 cores every
millisecond a keeper or Ray spends is taken from the ranks.

Each configuration is one ``orchestrate launch`` of ``--steps`` steps; CPU time of every process on this machine
is read from /proc at two moments in the middle of the run (after ``--warmup`` steps, ``--window`` seconds
apart) and divided by the steps the run made in between. A second table gives, over the steps logged in that
window, the median of each phase of the step (``forward_backward_s``, ``update_s``, ``snapshot_s`` in
metrics.jsonl, as the rank with the loss saw them) and of the step time. A third gives the part of the ranks'
CPU spent in the kernel (system time) and the minor page faults they took; a fourth the CPU of each rank's
training thread, how often it was preempted (involuntary context switches), and the machine's context switches.

    python -m benchmarks.keeper_cpu [--recipe quickstart] [--steps 400] [--warmup 30] [--window 20]
    python -m benchmarks.keeper_cpu --model 1gib --steps 60 --warmup 8 --window 30

``--model 1gib`` trains the model of ``benchmarks/checkpoint.py`` instead of the recipe's (its default overrides:
a training state of 1.04 GiB, one worker using every core).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = {  # name -> overrides
    "no checkpointing": ("checkpoint.every=0", "checkpoint.persist_every=0"),
    "keepers, snapshot every step, disk every 10 steps": ("checkpoint.keepers=true", "checkpoint.every=1",
                                                          "checkpoint.persist_every=10"),
    "keepers, snapshot every step, no disk": ("checkpoint.keepers=true", "checkpoint.every=1",
                                              "checkpoint.persist_every=0"),
    "in-process snapshot every step (keepers off), no disk": ("checkpoint.keepers=false", "checkpoint.every=1",
                                                             "checkpoint.persist_every=0"),
}
TICKS = os.sysconf("SC_CLK_TCK")
PHASES = ("forward_backward_s", "update_s", "snapshot_s", "step_time")


def kind_of(cmdline: str) -> str:
    if "TrainWorker" in cmdline:
        return "ranks"
    if "SnapshotKeeper" in cmdline:
        return "keepers"
    if "orchestrate launch" in cmdline or "-m orchestrate" in cmdline:
        return "controller"
    if any(name in cmdline for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                                        "ray::IDLE", "default_worker", "monitor.py")):
        return "ray"
    return "other"


def cpu_seconds() -> dict[int, tuple[str, float, float, int]]:
    """pid -> (kind, user + system CPU seconds, system CPU seconds, minor page faults) of every process."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(pid)] = (kind_of(cmdline), (int(fields[11]) + int(fields[12])) / TICKS, int(fields[12]) / TICKS,
                           int(fields[7]))
    return found


def rank_threads(rank_pids) -> dict[tuple[int, int], tuple[float, int]]:
    """(pid, tid) -> (CPU seconds, involuntary context switches: times it was preempted) of the ranks' threads."""
    found = {}
    for pid in rank_pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            preempted = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            found[(pid, int(tid))] = ((int(fields[11]) + int(fields[12])) / TICKS, preempted)
    return found


def context_switches() -> int:
    """Context switches on the machine since boot."""
    return int(Path("/proc/stat").read_text().split("\nctxt ")[1].split()[0])


def step_lines(metrics: Path) -> list[str]:
    """The step records logged so far, complete lines only (the run may be writing the last one)."""
    try:
        return [line for line in metrics.read_text().split("\n")[:-1] if '"step_time"' in line]
    except OSError:
        return []


def steps_logged(metrics: Path) -> int:
    return len(step_lines(metrics))


def phase_medians(lines: list[str], first: int, last: int) -> dict[str, float]:
    """Median seconds of each phase and of the whole step over the records of steps first+1 .. last."""
    window = [record for record in map(json.loads, lines) if first < record["step"] <= last]
    return {key: statistics.median(record[key] for record in window) for key in PHASES}


def measure(recipe: str, steps: int, warmup: int, window_s: float, overrides: tuple[str, ...]) -> dict[str, float]:
    """CPU milliseconds per step by kind of process, the step time, and the median seconds of the step's phases
    (``PHASES``), in the middle of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        run = subprocess.Popen([sys.executable, "-m", "orchestrate", "launch", f"recipe={recipe}",
                                f"train.steps={steps}", f"run.dir={tmp}/run", "logging.progress=false", *overrides],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while steps_logged(metrics) < warmup:
                if run.poll() is not None:
                    raise RuntimeError(f"the run ended before step {warmup}: raise --steps")
                time.sleep(0.2)
            before, first, start = cpu_seconds(), steps_logged(metrics), time.monotonic()
            ranks = [pid for pid, (kind, *_) in before.items() if kind == "ranks"]
            threads_before, switches_before = rank_threads(ranks), context_switches()
            time.sleep(window_s)
            after, lines, end = cpu_seconds(), step_lines(metrics), time.monotonic()
            threads_after, switches_after = rank_threads(ranks), context_switches()
        finally:
            run.terminate()
            run.wait()
    last = len(lines)
    if run.returncode not in (0, -15) and last - first <= 0:
        raise RuntimeError("no steps in the window")
    per_kind: dict[str, float] = {}
    rank_system_s = rank_faults = 0
    for pid, (kind, cpu, system, faults) in after.items():
        if pid in before and before[pid][0] == kind:
            per_kind[kind] = per_kind.get(kind, 0.0) + cpu - before[pid][1]
            if kind == "ranks":
                rank_system_s += system - before[pid][2]
                rank_faults += faults - before[pid][3]
    made = last - first
    training = training_threads(threads_before, threads_after)
    return {"step_ms": (end - start) / made * 1e3, **{k: v / made * 1e3 for k, v in per_kind.items()},
            "ranks_system_ms": rank_system_s / made * 1e3, "ranks_faults": rank_faults / made,
            "training_ms": sum(cpu for cpu, _ in training) / made * 1e3,
            "training_preempted": sum(preempted for _, preempted in training) / made,
            "switches": (switches_after - switches_before) / made, **phase_medians(lines, first, last)}


def training_threads(before: dict, after: dict) -> list[tuple[float, int]]:
    """(CPU seconds, times preempted) between the two readings of each rank's busiest thread (the one that
    trains: forward, backward, the optimizer and the snapshot run on it)."""
    busiest: dict[int, tuple[float, int]] = {}
    for (pid, tid), (cpu, preempted) in after.items():
        if (pid, tid) in before:
            delta = (cpu - before[(pid, tid)][0], preempted - before[(pid, tid)][1])
            if delta[0] > busiest.get(pid, (-1.0, 0))[0]:
                busiest[pid] = delta
    return list(busiest.values())


def model_overrides(model: str, steps: int) -> tuple[str, ...]:
    """The recipe's own model (``recipe``), or the 1 GiB model and layout of benchmarks/checkpoint.py."""
    if model == "recipe":
        return ()
    from benchmarks.checkpoint import add_run_arguments, shared_overrides

    defaults = argparse.ArgumentParser()
    add_run_arguments(defaults, repeats=1, steps=steps)
    return tuple(o for o in shared_overrides(defaults.parse_args([])) if not o.startswith("train.steps="))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--model", choices=["recipe", "1gib"], default="recipe",
                        help="1gib: the model of benchmarks/checkpoint.py (training state 1.04 GiB, one worker)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    kinds = ("ranks", "keepers", "ray", "controller", "other")
    model = model_overrides(args.model, args.steps)
    print(f"CPU ms per step by process, recipe {args.recipe}"
          f"{' with the 1 GiB model of benchmarks/checkpoint.py' if model else ''}, {args.window:g} s in the middle of "
          f"{args.steps}-step runs\n")
    print("| configuration | wall ms per step | " + " | ".join(kinds) + " | all |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    rows = {}
    for name, overrides in CONFIGURATIONS.items():
        row = rows[name] = measure(args.recipe, args.steps, args.warmup, args.window, model + overrides)
        total = sum(row.get(k, 0.0) for k in kinds)
        print(f"| {name} | {row['step_ms']:.1f} | " + " | ".join(f"{row.get(k, 0.0):.1f}" for k in kinds) +
              f" | {total:.1f} |", flush=True)
    print("\nMedian ms per step over the same windows: the phases on the rank with the loss, step_time on the "
          "slowest rank\n")
    print("| configuration | " + " | ".join(PHASES) + " |")
    print("|---|" + "---|" * len(PHASES))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[key] * 1e3:.1f}" for key in PHASES) + " |")
    print("\nThe ranks in the kernel over the same windows, per step\n")
    print("| configuration | ranks' system CPU (ms) | ranks' minor page faults |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ranks_system_ms']:.1f} | {row['ranks_faults']:.0f} |")
    print("\nThe ranks' training threads (each rank's busiest) and the whole machine over the same windows, per step\n")
    print("| configuration | training threads' CPU (ms) | times they were preempted | context switches on the machine |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['training_ms']:.1f} | {row['training_preempted']:.1f} | {row['switches']:.0f} |")


if __name__ == "__main__":
    main()
