"""Start, train and recover at scale on a simulated cluster (one raylet per node, cluster/simulated.py).

For N = 4, 8, 16, 32 nodes (one rank of one CPU each, plus one spare node): ``orchestrate launch`` of quickstart
at dp=N (global batch 2N), 30 steps, with the node of rank 1 killed at step 15 (``fault.kind=node``: its raylet
and everything on it SIGKILLed). Reported per N:

- seconds from the launch command to the end of the first step (Ray connection, placement, N workers starting
  and importing torch, process group, model build: what a user waits before training);
- the controller's CPU seconds per step (user + system time of the driver process over the steps before the
  fault, divided by those steps): the cost of polling N ranks;
- recovery seconds as the run records them (from the lost rank's last report to the first step after), and
  the source it recovered from.

Keepers are off (32 keeper processes would not fit beside 32 trainers in this machine's memory); a lost DDP rank
heals from its surviving replica, which needs none.

    python -m benchmarks.scale [--nodes 4,8,16,32] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil


def records_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            break
    return records


def cpu_seconds(process: psutil.Process) -> Optional[float]:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return None


def measure(address: str, nodes: int, steps: int, fault_step: int, run_dir: Path) -> dict:
    command = [sys.executable, "-m", "orchestrate", "launch", "recipe=quickstart", f"parallel.dp={nodes}",
               f"train.global_batch_size={2 * nodes}", f"train.steps={steps}", f"cluster.address={address}",
               "cluster.cpus_per_worker=1", "checkpoint.keepers=false", "checkpoint.persist_every=0",
               "fault.kind=node", "fault.kill_rank=1", f"fault.at_step={fault_step}", "logging.progress=false",
               f"run.dir={run_dir}"]
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(process.pid)
    cpu_at: dict[int, float] = {}  # step -> driver CPU seconds when that step's record was seen
    while process.poll() is None:
        seen = [r["step"] for r in records_of(run_dir / "metrics.jsonl") if "step_time" in r]
        used = cpu_seconds(driver)
        if seen and used is not None and seen[-1] not in cpu_at:
            cpu_at[seen[-1]] = used
        time.sleep(0.2)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"N={nodes}: launch failed: {stderr.strip().splitlines()[-1:]}")
    records = records_of(run_dir / "metrics.jsonl")
    first = next(r for r in records if "step_time" in r)
    before_fault = sorted(step for step in cpu_at if step < fault_step)
    cpu_per_step = ((cpu_at[before_fault[-1]] - cpu_at[before_fault[0]]) / (before_fault[-1] - before_fault[0])
                    if len(before_fault) >= 2 and before_fault[-1] > before_fault[0] else None)
    [recovery] = [r["recovery"] for r in records if "recovery" in r]
    step_times = sorted(r["step_time"] for r in records if "step_time" in r)
    return {"nodes": nodes, "launch_to_first_step_s": first["time"] - launched,
            "controller_cpu_s_per_step": cpu_per_step, "median_step_s": step_times[len(step_times) // 2],
            "recovery_s": recovery["seconds"], "source": recovery["source"]}


def table(rows: list[dict]) -> str:
    lines = ["| nodes (ranks) | launch to first step, s | controller CPU s / step | median step s | "
             "recovery after a node loss, s (source) |", "|---|---|---|---|---|"]
    for row in rows:
        cpu = row["controller_cpu_s_per_step"]
        lines.append(f"| {row['nodes']} | {row['launch_to_first_step_s']:.1f} | "
                     f"{f'{cpu:.3f}' if cpu is not None else '-'} | {row['median_step_s']:.2f} | "
                     f"{row['recovery_s']:.1f} ({row['source']}) |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="4,8,16,32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="also write the table and the raw rows (JSON) here")
    args = parser.parse_args(argv)
    from orchestrate.cluster.simulated import SimulatedCluster

    sim = SimulatedCluster()
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = []
    try:
        sim.start()
        for nodes in map(int, args.nodes.split(",")):
            sim.resize(nodes + 1)  # a spare for the lost rank
            row = measure(sim.address, nodes, args.steps, args.steps // 2, work / f"n{nodes}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        sim.shutdown()
    result = table(rows)
    print(result)
    if args.out:
        Path(args.out).write_text(result + "\n\n" + json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
