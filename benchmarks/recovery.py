"""Recovery in memory (SnapshotKeeper, level 1) vs from disk (level 2), in one run.

Three runs of the quickstart recipe (2 workers, snapshot every step), each with one injected fault, read the
recovery record the controller writes: seconds from the failure being detected to the first finished step after
it, and the steps redone.
  * keeper: rank 1's process dies; its node's keeper still holds every rank's newest handed-over snapshot.
  * parity: rank 1's node dies with its keeper (simulated multi-node cluster: one CPU per node, a spare node);
    its snapshot is decoded from the other keepers of the erasure-coded group.
  * disk: rank 1's process dies without keepers; the newest universal checkpoint on disk is loaded.
Then the price of that protection on the training loop: the median step time of fault-free runs with keepers
(every rank hands its snapshot to its node's keeper after every step) over the same runs without them (snapshots
only to disk), alternating the two ``--repeats`` times.
Encode/decode speed of the erasure code against memcpy, and its memory overhead, are ``benchmarks/erasure.py``.

    python -m benchmarks.recovery [--steps 40] [--at-step 25] [--persist-every 10] [--repeats 3]
        [--part both|recovery|overhead]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.simulated import SimulatedCluster


def launch(steps: int, persist_every: int, *overrides: str) -> list[dict]:
    """The metrics records of one quickstart run."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["recipe=quickstart", f"train.steps={steps}", f"checkpoint.persist_every={persist_every}",
                f"run.dir={tmp}/run", "logging.progress=false", *overrides]
        subprocess.run([sys.executable, "-m", "orchestrator", "launch", *args], check=True, capture_output=True)
        return [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]


def median_step_s(records: list[dict]) -> float:
    return statistics.median(r["step_time"] for r in records if "step_time" in r)


def recover(steps: int, at_step: int, persist_every: int, *overrides: str) -> dict:
    records = launch(steps, persist_every, "fault.kill_rank=1", f"fault.at_step={at_step}", *overrides)
    [recovery] = [r["recovery"] for r in records if "recovery" in r]
    commits = [r["ckpt_l1_s"] for r in records if r.get("ckpt_l1_s") is not None]
    return {**recovery, "l1_commit_s": statistics.median(commits) if commits else None,
            "step_s": median_step_s(records)}


def recover_from_node_loss(steps: int, at_step: int, persist_every: int) -> dict:
    sim = SimulatedCluster()
    try:
        sim.start()
        sim.live_nodes(3)
        return recover(steps, at_step, persist_every, "checkpoint.keepers=true", "fault.kind=node",
                       f"cluster.address={sim.address}", "cluster.cpus_per_worker=1")
    finally:
        sim.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--at-step", type=int, default=25)
    parser.add_argument("--persist-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("both", "recovery", "overhead"), default="both")
    args = parser.parse_args()
    if args.part != "overhead":
        print_recoveries(args)
    if args.part != "recovery":
        print_handover_overhead(args.steps, args.persist_every, args.repeats)


def print_recoveries(args: argparse.Namespace) -> None:
    common = (args.steps, args.at_step, args.persist_every)
    runs = [("rank 1's process", recover(*common, "checkpoint.keepers=true")),
            ("rank 1's node (3-node simulated cluster)", recover_from_node_loss(*common)),
            ("rank 1's process, no keepers", recover(*common, "checkpoint.keepers=false"))]
    print(f"Recovery: quickstart, 2 workers, fault before step {args.at_step}, disk every {args.persist_every} "
          f"steps, snapshot every step\n")
    print("| lost | source | restored step | steps redone | seconds to next finished step | goal | median step "
          "(s) | median L1 commit (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for lost, r in runs:
        goal = "-" if r["source"] == "disk" else "<= 10 s, <= 1 step"
        commit = "-" if r["l1_commit_s"] is None else f"{r['l1_commit_s']:.2f}"
        print(f"| {lost} | {r['source']} | {r['restored_step']} | {r['steps_lost']} | {r['seconds']:.1f} | {goal} "
              f"| {r['step_s']:.3f} | {commit} |")


def print_handover_overhead(steps: int, persist_every: int, repeats: int) -> None:
    medians: dict[str, list[float]] = {"true": [], "false": []}
    for _ in range(repeats):
        for keepers in medians:  # alternating, so a change in the machine's load hits both alike
            medians[keepers].append(median_step_s(launch(steps, persist_every, f"checkpoint.keepers={keepers}")))
    ratios = [with_ / without for with_, without in zip(medians["true"], medians["false"])]
    print(f"\nHandover overhead: median step time with keepers over without, no faults, {repeats} alternating "
          f"pairs of {steps}-step runs\n")
    print("| pair | with keepers (s) | without (s) | ratio |")
    print("|---|---|---|---|")
    for i, (with_, without, ratio) in enumerate(zip(medians["true"], medians["false"], ratios), 1):
        print(f"| {i} | {with_:.3f} | {without:.3f} | {ratio:.2f} |")
    print(f"| median | | | **{statistics.median(ratios):.2f}** |")


if __name__ == "__main__":
    main()
