"""Recovery as a user sees it, and what the protection costs the training loop.

Recovery (``--part recovery``): one long quickstart run (2 workers, snapshot every step) per row; the benchmark
kills a worker from outside ``--kills`` times, each at a random moment of a step (seeded), with its own clock, and
waits for the run to recover before the next kill. For each kill: seconds from the kill to the end of the first
step finished after the recovery (detection, attribution, new process, restore, re-formed process groups
included; the workers' timestamp, same machine), seconds until the controller had attributed the failure, the
steps redone, and where the lost rank's state came from.
  * process: SIGKILL of a random rank's process; with keepers (default) and without.
  * node: the raylet of a random training node is killed with the processes of its ranks, as in a machine crash
    (simulated multi-node cluster, one CPU per node; a fresh spare node is added after each loss), its keeper
    included; ``dp=2`` (the survivor is a replica) and ``tp=2`` (no replica: the keepers' parity).
Goodput: the step rate of the killed run (wall clock from its first to its last step) over the fault-free step
rate of the same configuration, with the mean time between kills.

Overhead (``--part overhead``, per recipe, ``--recipes``, default quickstart and small): the median step time of
fault-free runs with keepers (every rank copies each snapshot into its arena in the keeper's shared memory;
commits), snapshotting every step and every 10 steps, both writing to disk every ``--disk-every`` steps, over the
same runs without any checkpointing, the configurations alternating ``--repeats`` times; and the keepers' memory against
the state they protect. Encode/decode speed of the erasure code is ``benchmarks/erasure.py``.

    python -m benchmarks.recovery [--part both|recovery|overhead] [--kills 6] [--seed 0] [--steps 40]
        [--small-steps 12] [--disk-every 10] [--repeats 5] [--recipes quickstart small]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stats import median_interval
from orchestrate.cluster.simulated import SimulatedCluster


def launch(steps: int, *overrides: str, recipe: str = "quickstart") -> list[dict]:
    """The metrics records of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"recipe={recipe}", f"train.steps={steps}", f"run.dir={tmp}/run", "logging.progress=false",
                *overrides]
        subprocess.run([sys.executable, "-m", "orchestrate", "launch", *args], check=True, capture_output=True)
        return [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]


def median_step_s(records: list[dict]) -> float:
    return statistics.median(r["step_time"] for r in records if "step_time" in r)


LONG_RUN = ["recipe=quickstart", "train.steps=1000000", "optim.schedule=constant", "logging.progress=false",
            "checkpoint.persist_every=0"]
SETTLE_STEPS = 5  # steps the run makes after a recovery before the next kill, and at least SETTLE_S seconds
SETTLE_S = 10.0


def records_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()[:-1] if path.exists() else []  # the last line may be partial
    return [json.loads(line) for line in lines]


def wait_for(run_dir: Path, process: subprocess.Popen, done, timeout_s: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = records_of(run_dir)
        if done(records):
            return records
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run stopped or hung: {process.poll()} {process.stderr.read()[-2000:]}")
        time.sleep(0.02)


def steps_after(records: list[dict], recoveries: int) -> int:
    """Steps logged since the ``recoveries``-th recovery (or the start)."""
    seen, count = 0, 0
    for r in records:
        if "recovery" in r:
            seen, count = seen + 1, 0
        elif "step_time" in r and seen == recoveries:
            count += 1
    return count if seen == recoveries else 0


def kill_run(kind: str, kills: int, seed: int, *overrides: str, sim: SimulatedCluster | None = None) -> dict:
    """Kill a random rank's process (or node) ``kills`` times in one run; per kill: seconds to the first step
    after the recovery, seconds to attribution, steps redone, source. Plus the run's steps per second."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        process = subprocess.Popen([sys.executable, "-m", "orchestrate", "launch", *LONG_RUN,
                                    f"fault.max_restarts={kills}", f"run.dir={run_dir}", *overrides],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            kills_done, kill_times = [], []
            for i in range(kills):
                records = wait_for(run_dir, process, lambda rs: steps_after(rs, i) >= SETTLE_STEPS)
                time.sleep(SETTLE_S)
                records = records_of(run_dir)
                workers = [r for r in records if r.get("event") == "workers"][-1]
                step_s = statistics.median(r["step_time"] for r in records[-SETTLE_STEPS:] if "step_time" in r)
                rank = rng.randrange(len(workers["pids"]))
                time.sleep(rng.uniform(0, step_s))  # a random moment of a step
                killed_at = time.time()
                kill_times.append(killed_at)
                if kind == "process":
                    os.kill(workers["pids"][rank], signal.SIGKILL)
                else:  # the node's raylet and every process of the node's ranks, as when a machine crashes
                    [node] = [n for n in sim.nodes if n.node_id == workers["nodes"][rank]]
                    sim.cluster.remove_node(node, allow_graceful=False)
                    sim.nodes.remove(node)
                    for pid, node_id in zip(workers["pids"], workers["nodes"]):
                        if node_id == node.node_id:
                            os.kill(pid, signal.SIGKILL)
                records = wait_for(run_dir, process, lambda rs: sum("recovery" in r for r in rs) > i)
                recovery = [r["recovery"] for r in records if "recovery" in r][i]
                kills_done.append({"seconds": recovery["resumed_at"] - killed_at,
                                   "detected_s": recovery["detected_at"] - killed_at,
                                   "steps_lost": recovery["steps_lost"], "source": recovery["source"]})
                if sim is not None:
                    sim.live_nodes(len(sim.nodes) + 1)  # a spare again for the next loss
            records = wait_for(run_dir, process, lambda rs: steps_after(rs, kills) >= SETTLE_STEPS)
            steps = [r for r in records if "step_time" in r]
            rate = (len(steps) - 1) / (steps[-1]["time"] - steps[0]["time"])
            interval = (kill_times[-1] - kill_times[0]) / max(1, kills - 1)
            return {"kills": kills_done, "steps_per_s": rate, "kill_interval_s": interval}
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """Two Ctrl-C: the run stops at once and tears down its Ray cluster."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
    process.wait(timeout=120)


def fault_free_rate(*overrides: str, sim: SimulatedCluster | None = None, steps: int = 60) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        process = subprocess.Popen([sys.executable, "-m", "orchestrate", "launch", *LONG_RUN,
                                    f"run.dir={run_dir}", *overrides],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            records = wait_for(run_dir, process, lambda rs: steps_after(rs, 0) >= steps)
        finally:
            stop(process)
    done = [r for r in records if "step_time" in r]
    return (len(done) - 1) / (done[-1]["time"] - done[0]["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disk-every", type=int, default=10, help="steps between disk checkpoints")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("both", "recovery", "overhead"), default="both")
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "small"])
    parser.add_argument("--small-steps", type=int, default=12)
    args = parser.parse_args()
    if args.part != "overhead":
        print_recoveries(args)
    if args.part != "recovery":
        print_keeper_overhead(args.recipes, {"quickstart": args.steps, "small": args.small_steps}, args.disk_every,
                              args.repeats)


RECOVERY_ROWS = [  # lost, kind, overrides, on the simulated cluster
    ("process (keepers)", "process", ("parallel.dp=2",), False),
    ("process (no keepers)", "process", ("parallel.dp=2", "checkpoint.keepers=false"), False),
    ("node, dp=2", "node", ("parallel.dp=2",), True),
    ("node, tp=2", "node", ("parallel.dp=1", "parallel.tp=2"), True),
]
ON_NODES = ("cluster.cpus_per_worker=1", "cluster.start_timeout_s=120")
GOALS = {"process": ("<= 5 s", "<= 10 s", "<= 1"), "node": ("<= 15 s", "-", "-")}


def print_recoveries(args: argparse.Namespace) -> None:
    print(f"Recovery from the kill: quickstart, 2 workers, snapshot every step, {args.kills} kills per row at "
          f"random moments (seed {args.seed}), measured by the killer's clock\n")
    print("| lost | source | seconds to next step, median / worst | goal (median / worst) | attributed after (s), "
          "median | steps redone, median / worst | goal | goodput (a kill every) | per kill (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lost, kind, overrides, on_nodes in RECOVERY_ROWS:
        sim = SimulatedCluster() if on_nodes else None
        try:
            extra = ()
            if sim is not None:
                sim.start()
                sim.live_nodes(3)
                extra = (f"cluster.address={sim.address}", *ON_NODES)
            result = kill_run(kind, args.kills, args.seed, *overrides, *extra, sim=sim)
            if sim is not None:
                sim.resize(3)
            base = fault_free_rate(*overrides, *extra, sim=sim)
        finally:
            if sim is not None:
                sim.shutdown()
        kills = result["kills"]
        seconds = [k["seconds"] for k in kills]
        lost_steps = [k["steps_lost"] for k in kills]
        sources = "/".join(sorted({k["source"] for k in kills}))
        median_goal, worst_goal, steps_goal = GOALS[kind]
        print(f"| {lost} | {sources} | {statistics.median(seconds):.1f} / {max(seconds):.1f} | {median_goal} / "
              f"{worst_goal} | {statistics.median(k['detected_s'] for k in kills):.1f} | "
              f"{statistics.median(lost_steps):g} / {max(lost_steps)} | {steps_goal} | "
              f"{result['steps_per_s'] / base:.2f} ({result['kill_interval_s']:.0f} s) | "
              f"{' '.join(f'{x:.1f}' for x in seconds)} |")


OVERHEAD_RUNS = {  # name -> steps between snapshots (0: no checkpointing at all, the baseline)
    "none": 0,
    "keepers, snapshot every step": 1,
    "keepers, snapshot every 10 steps": 10,
}
OVERHEAD_GOAL = 1.05  # keepers' median step time over no checkpointing (issue 12)


def overhead_overrides(every: int, disk_every: int) -> tuple[str, ...]:
    """``checkpoint.persist_every`` counts snapshots: both keeper rows write to disk every ``disk_every`` steps."""
    if every == 0:
        return ("checkpoint.every=0", "checkpoint.persist_every=0")
    return ("checkpoint.keepers=true", f"checkpoint.every={every}",
            f"checkpoint.persist_every={max(1, disk_every // every)}")


def print_keeper_overhead(recipes: list[str], steps: dict[str, int], disk_every: int, repeats: int) -> None:
    """Median step time of fault-free runs with keepers over the same runs without any checkpointing, the
    configurations alternating ``repeats`` times so that a change in the machine's load hits them alike."""
    for recipe in recipes:
        medians: dict[str, list[float]] = {name: [] for name in OVERHEAD_RUNS}
        memory = None
        for _ in range(repeats):
            for name, every in OVERHEAD_RUNS.items():
                records = launch(steps[recipe], *overhead_overrides(every, disk_every), recipe=recipe)
                medians[name].append(median_step_s(records[2:]))  # the first steps warm up
                memory = next((r["nodes"] for r in records if r.get("event") == "keeper_memory"), memory)
        print(f"\nKeeper overhead, recipe {recipe}: median step time over no checkpointing, {repeats} alternating "
              f"repeats of {steps[recipe]}-step runs (disk every {disk_every} steps)\n")
        print("| configuration | median step (s) per repeat | ratio per repeat | median ratio | 95% interval | "
              "goal |")
        print("|---|---|---|---|---|---|")
        for name in OVERHEAD_RUNS:
            ratios = [t / base for t, base in zip(medians[name], medians["none"])]
            ratio, interval = statistics.median(ratios), median_interval(ratios)
            print(f"| {name} | {' / '.join(f'{t:.3f}' for t in medians[name])} | "
                  f"{' / '.join(f'{r:.3f}' for r in ratios)} | **{ratio:.3f}** | "
                  f"{'-' if interval is None else '%.3f-%.3f' % interval} | {overhead_goal(name, ratio)} |")
        print_memory(memory)


def overhead_goal(configuration: str, ratio: float) -> str:
    if configuration == "none":
        return "-"
    return f"<= {OVERHEAD_GOAL} " + ("met" if ratio <= OVERHEAD_GOAL else "**missed**")


def print_memory(nodes: dict) -> None:
    """Keeper memory per node against the state it protects (goal: versions kept x n / (n - m) of it)."""
    print("\n| node | state of its ranks (MiB) | arenas (MiB) | parity (MiB) | (arenas + parity) / state | goal | "
          "keeper RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for node, m in sorted(nodes.items()):
        state, mib = m["state_bytes"], 2 ** 20
        print(f"| {node[:8]} | {state / mib:.1f} | {m['arena_bytes'] / mib:.1f} | {m['parity_bytes'] / mib:.1f} | "
              f"{(m['arena_bytes'] + m['parity_bytes']) / state:.3f} | <= {m['slots']} x n/(n-m) | "
              f"{m['rss_bytes'] / mib:.0f} |")


if __name__ == "__main__":
    main()
