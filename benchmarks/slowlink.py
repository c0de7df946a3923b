"""Low-communication sync over slow links, for real: 4 Ray nodes, each in its own network namespace
(``orchestrate cluster up``), every link rate-limited with tc (token bucket, both directions).

Headline metric: **wall-clock seconds of training until the eval loss reaches a target**, the target being DDP's
eval loss after ``--target-steps`` steps on unshaped links. Every method trains the ``diloco_small`` recipe
(Llama dim 128, 4 layers; 4 replicas, global batch 16 x 128 tokens) with the same seed, data and eval
(``train.eval_every``: mean held-out loss of the replicas every few steps), a constant learning rate after
warm-up (so that where a run stops does not change its schedule), keepers and snapshots off (the same for
all; nothing here is about checkpoints). The clock starts when the first step starts (worker start-up is left
out, equal for all) and stops at the first eval at or below the target; a method that does not get there within
``--budget-steps`` says so. A run is stopped once it reached the target (SIGTERM; nothing to save).

Also reported: tokens/s (mean step, syncs included), bytes rank 0 sent per step, and each method's mean step time
on the shaped link over its own on the unshaped link (Streaming DiLoCo's overlapped sync: goal <= 1.10x).
``--tabulate DIR`` prints the table again from the runs a previous invocation left in DIR.

    python -m benchmarks.slowlink [--links none,1gbit,100mbit,10mbit] [--methods ...] [--target-steps 60]

Needs root (network namespaces); the cluster is made at the start and removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

METHODS = {
    "ddp": ["sync.name=ddp"],
    "diloco": ["sync.name=diloco", "sync.diloco.sync_every=50"],
    "diloco_h10": ["sync.name=diloco", "sync.diloco.sync_every=10"],
    "streaming_diloco": ["sync.name=streaming_diloco", "sync.streaming_diloco.sync_every=50"],
    "noloco": ["sync.name=noloco", "sync.noloco.sync_every=50"],
    "onebit_adam": ["sync.name=onebit_adam"],
}
LABELS = {"ddp": "DDP", "diloco": "DiLoCo H=50", "diloco_h10": "DiLoCo H=10",
          "streaming_diloco": "Streaming DiLoCo H=50 (4-bit)", "noloco": "NoLoCo H=50",
          "onebit_adam": "1-bit Adam"}
GOALS = {("diloco", "100mbit"): 5.0, ("streaming_diloco", "100mbit"): 5.0,
         ("diloco", "10mbit"): 20.0, ("streaming_diloco", "10mbit"): 20.0}
EVAL_EVERY = 5


@dataclass
class Outcome:
    method: str
    link: str
    seconds_to_target: Optional[float]
    step_at_target: Optional[int]
    mean_step_s: float  # sync steps included (a median would hide them)
    tokens_per_s: float
    bytes_per_step: float
    evals: list = field(default_factory=list)


def launch(address: str, method: str, steps: int, run_dir: Path, target: Optional[float]) -> list[dict]:
    """One run; returns its metrics records. Stopped early once an eval reaches ``target``."""
    command = [sys.executable, "-m", "orchestrate", "launch", "recipe=diloco_small", f"train.steps={steps}",
               f"cluster.address={address}", "cluster.cpus_per_worker=1", "checkpoint.keepers=false",
               "checkpoint.every=0", "checkpoint.persist_every=0", "train.eval_batches=2",
               f"train.eval_every={EVAL_EVERY}", "logging.progress=false", "logging.log_every=1000",
               "optim.schedule=constant", *METHODS[method], f"run.dir={run_dir}"]
    if method == "onebit_adam":
        command.append(f"sync.onebit_adam.freeze_step={max(1, steps // 10)}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    while process.poll() is None:
        if target is not None and any(r.get("eval_loss", float("inf")) <= target for r in records_of(metrics)):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.5)
    _, stderr = process.communicate(timeout=600)
    if process.returncode not in (0, 128 + signal.SIGTERM):
        raise RuntimeError(f"{method} failed ({process.returncode}): {stderr.strip().splitlines()[-1:]}")
    return records_of(metrics)


def records_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]] + _complete(lines[-1:])


def _complete(lines: list[str]) -> list[dict]:
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:  # being written
        return []


def outcome_of(method: str, link: str, records: list[dict], target: float) -> Outcome:
    steps = [r for r in records if "step_time" in r]
    clock_start = steps[0]["time"] - steps[0]["step_time"]
    reached = next((r for r in steps if r.get("eval_loss") is not None and r["eval_loss"] <= target), None)
    mean_step = statistics.mean(r["step_time"] for r in steps)
    return Outcome(method, link, reached["time"] - clock_start if reached else None,
                   reached["step"] if reached else None, mean_step,
                   steps[0]["tokens"] / mean_step, steps[-1]["comm_bytes"] / len(steps),
                   [(r["step"], r["eval_loss"]) for r in steps if r.get("eval_loss") is not None])


def table(outcomes: list[Outcome], unshaped: dict[str, Outcome]) -> str:
    ddp = {o.link: o for o in outcomes if o.method == "ddp"}
    rows = ["| link | method | s to target | step at target | DDP's s / this | goal | mean step s "
            "(x unshaped) | tokens/s | MB sent per step |", "|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        base = ddp.get(o.link)
        speedup = (base.seconds_to_target / o.seconds_to_target
                   if base and base.seconds_to_target and o.seconds_to_target else None)
        goal = GOALS.get((o.method, o.link))
        goal_text = f">= {goal:g}x: {'met' if speedup and speedup >= goal else 'MISSED'}" if goal else ""
        if o.method == "streaming_diloco" and o.link != "none":
            ratio = o.mean_step_s / unshaped[o.method].mean_step_s
            goal_text += f"{'; ' if goal_text else ''}step <= 1.10x: {'met' if ratio <= 1.10 else 'MISSED'}"
        slowdown = o.mean_step_s / unshaped[o.method].mean_step_s if o.method in unshaped else 1.0
        rows.append(f"| {o.link} | {LABELS[o.method]} | "
                    f"{f'{o.seconds_to_target:.1f}' if o.seconds_to_target else 'not reached'} | "
                    f"{o.step_at_target or '-'} | {f'{speedup:.1f}x' if speedup else '-'} | {goal_text} | "
                    f"{o.mean_step_s:.3f} ({slowdown:.2f}x) | {o.tokens_per_s:,.0f} | "
                    f"{o.bytes_per_step / 1e6:.2f} |")
    return "\n".join(rows)


def target_of(reference: list[dict]) -> tuple[int, float]:
    """(step, eval loss) of DDP's last eval on unshaped links."""
    last = [r for r in reference if r.get("eval_loss") is not None and "step_time" in r][-1]
    return last["step"], last["eval_loss"]


def tabulate(work: Path, links: list[str], methods: list[str]) -> str:
    """The table from the runs in ``work`` (``target/`` and ``LINK-METHOD/``)."""
    target_step, target = target_of(records_of(work / "target" / "metrics.jsonl"))
    outcomes = [outcome_of(method, link, records_of(work / f"{link}-{method}" / "metrics.jsonl"), target)
                for link in links for method in methods if (work / f"{link}-{method}" / "metrics.jsonl").exists()]
    unshaped = {o.method: o for o in outcomes if o.link == "none"}
    return (f"target eval loss {target:.4f} (DDP after {target_step} steps, unshaped links)\n\n"
            + table(outcomes, unshaped))


def run_all(work: Path, links: list[str], methods: list[str], nodes: int, target_steps: int,
            budget_steps: int) -> None:
    from orchestrate.cluster import emulated

    state_dir = tempfile.mkdtemp(prefix="orch-sl", dir="/tmp")
    os.rmdir(state_dir)
    state = emulated.up(nodes, cpus_per_node=1, dashboard=False, state_dir=state_dir)
    try:
        reference = launch(state.address, "ddp", target_steps, work / "target", None)
        target_step, target = target_of(reference)
        print(f"target: DDP's eval loss after {target_step} steps on unshaped links = {target:.4f}", flush=True)
        for link in links:
            emulated.shape_links(state, None if link == "none" else link)
            for method in methods:
                records = launch(state.address, method, budget_steps, work / f"{link}-{method}", target)
                outcome = outcome_of(method, link, records, target)
                print(f"{link:>8} {method:>18}: {outcome.seconds_to_target} s to target (step "
                      f"{outcome.step_at_target}), mean step {outcome.mean_step_s:.3f} s", flush=True)
    finally:
        emulated.down(state_dir)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default="none,1gbit,100mbit,10mbit")
    parser.add_argument("--methods", default="ddp,diloco,diloco_h10,streaming_diloco,noloco,onebit_adam")
    parser.add_argument("--target-steps", type=int, default=100, help="DDP's eval loss here is the target")
    parser.add_argument("--budget-steps", type=int, default=500, help="most steps a method may take")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--tabulate", metavar="DIR", help="only print the table of the runs left in DIR")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    links, methods = args.links.split(","), args.methods.split(",")
    work = Path(args.tabulate or tempfile.mkdtemp(prefix="slowlink-"))
    if not args.tabulate:
        print(f"runs in {work}", flush=True)
        run_all(work, links, methods, args.nodes, args.target_steps, args.budget_steps)
    result = tabulate(work, links, methods)
    print(result)
    if args.out:
        Path(args.out).write_text(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
