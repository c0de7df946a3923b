"""Recovery in memory (SnapshotKeeper, level 1) vs from disk (level 2), in one run.

Three runs of the quickstart recipe (2 workers, snapshot every step), each with one injected fault, read the
recovery record the controller writes: seconds from the failure being detected to the first finished step after
it, and the steps redone.
  * keeper: rank 1's process dies; its node's keeper still holds every rank's newest handed-over snapshot.
  * parity: rank 1's node dies with its keeper (simulated multi-node cluster: one CPU per node, a spare node);
    its snapshot is decoded from the other keepers of the erasure-coded group.
  * disk: rank 1's process dies without keepers; the newest universal checkpoint on disk is loaded.
Then the price of that protection on the training loop, per recipe (``--recipes``, default quickstart and
small): the median step time of fault-free runs with keepers (every rank copies each snapshot into its arena in
the keeper's shared memory; commits; disk every ``--persist-every`` snapshots), snapshotting every step and every
10 steps, over the same runs without any checkpointing, the configurations alternating ``--repeats`` times; and
the keepers' memory against the state they protect.
Encode/decode speed of the erasure code against memcpy, and its memory overhead, are ``benchmarks/erasure.py``.

    python -m benchmarks.recovery [--steps 40] [--small-steps 12] [--at-step 25] [--persist-every 10]
        [--repeats 5] [--part both|recovery|overhead] [--recipes quickstart small]
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


def launch(steps: int, persist_every: int, *overrides: str, recipe: str = "quickstart") -> list[dict]:
    """The metrics records of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"recipe={recipe}", f"train.steps={steps}", f"checkpoint.persist_every={persist_every}",
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("both", "recovery", "overhead"), default="both")
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "small"])
    parser.add_argument("--small-steps", type=int, default=12)
    args = parser.parse_args()
    if args.part != "overhead":
        print_recoveries(args)
    if args.part != "recovery":
        print_keeper_overhead(args.recipes, {"quickstart": args.steps, "small": args.small_steps}, args.persist_every,
                              args.repeats)


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


OVERHEAD_RUNS = {  # name -> overrides, measured against no checkpointing at all
    "none": ("checkpoint.every=0", "checkpoint.persist_every=0"),
    "keepers, snapshot every step": ("checkpoint.keepers=true", "checkpoint.every=1"),
    "keepers, snapshot every 10 steps": ("checkpoint.keepers=true", "checkpoint.every=10"),
}


def print_keeper_overhead(recipes: list[str], steps: dict[str, int], persist_every: int, repeats: int) -> None:
    """Median step time of fault-free runs with keepers over the same runs without any checkpointing, the
    configurations alternating ``repeats`` times so that a change in the machine's load hits them alike."""
    for recipe in recipes:
        medians: dict[str, list[float]] = {name: [] for name in OVERHEAD_RUNS}
        memory = None
        for _ in range(repeats):
            for name, overrides in OVERHEAD_RUNS.items():
                records = launch(steps[recipe], persist_every, *overrides, recipe=recipe)
                medians[name].append(median_step_s(records[2:]))  # the first steps warm up
                memory = next((r["nodes"] for r in records if r.get("event") == "keeper_memory"), memory)
        print(f"\nKeeper overhead, recipe {recipe}: median step time over no checkpointing, {repeats} alternating "
              f"repeats of {steps[recipe]}-step runs (disk every {persist_every} snapshots)\n")
        print("| configuration | median step (s) per repeat | ratio per repeat | median ratio | goal |")
        print("|---|---|---|---|---|")
        for name in OVERHEAD_RUNS:
            ratios = [t / base for t, base in zip(medians[name], medians["none"])]
            goal = "-" if name == "none" else "<= 1.05"
            print(f"| {name} | {' / '.join(f'{t:.3f}' for t in medians[name])} | "
                  f"{' / '.join(f'{r:.3f}' for r in ratios)} | **{statistics.median(ratios):.3f}** | {goal} |")
        print_memory(memory)


def print_memory(nodes: dict) -> None:
    """Keeper memory per node against the state it protects (goal: versions kept x n / (n - m) of it)."""
    print("\n| node | state of its ranks (MiB) | arenas (MiB) | parity (MiB) | (arenas + parity) / state | goal | "
          "keeper RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for node, m in sorted(nodes.items()):
        state, mib = m["state_bytes"], 2 ** 20
        print(f"| {node[:8]} | {state / mib:.1f} | {m['arena_bytes'] / mib:.1f} | {m['parity_bytes'] / mib:.1f} | "
              f"{(m['arena_bytes'] + m['parity_bytes']) / state:.2f} | <= {m['slots']} x n/(n-m) | "
              f"{m['rss_bytes'] / mib:.0f} |")


if __name__ == "__main__":
    main()
