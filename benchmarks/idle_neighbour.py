"""What one more idle Ray process on the node costs a run whose ranks use every core, beside what the keepers cost.

On a single node the keepers do no per-step work (a rank writes its snapshot into the keeper's shared memory
itself; only versions due on disk are committed), yet a run with keepers is slower than one without. This
benchmark separates the cost of the keeper's process existing from the cost of anything it does: the same
1 GiB model as ``benchmarks/checkpoint.py`` (its model, optimizer, data and step-time measure) is trained

- without checkpointing;
- without checkpointing, beside one idle Ray actor (created with the keeper's own actor options, doing nothing);
- with keepers and a snapshot every step, no disk writes (what the keeper's process costs with its work).

Every run joins one embedded Ray cluster this benchmark starts (2 CPUs, on 127.0.0.1), so all arms share the same
Ray processes, this benchmark's own driver included; only the idle actor differs between the first two. Each
repeat runs every arm once, in alternating order; a ratio is the median over repeats of the paired ratio to the
run without checkpointing of that repeat, with its distribution-free 95% interval where the repeats allow one.

    python -m benchmarks.idle_neighbour [--repeats 6] [--steps 32] [--quick]
"""
from __future__ import annotations

import argparse
import os
from functools import partial

from benchmarks.checkpoint import (ORCHESTRATE_METHODS, WARMUP_STEPS, MethodResults, add_run_arguments, fmt,
                                   median_or_none, one_cluster_for_all_runs, paired_ratios, run_alternating,
                                   run_orchestrate, shared_overrides, training_state_size)
from benchmarks.stats import median_interval

NONE = "no checkpointing"
BESIDE_IDLE = "no checkpointing, one idle Ray actor beside"
KEEPERS = "keepers, snapshot every step, no disk"
ARMS = {NONE: ORCHESTRATE_METHODS["orchestrate, no checkpointing"],
        BESIDE_IDLE: ORCHESTRATE_METHODS["orchestrate, no checkpointing"],
        KEEPERS: ORCHESTRATE_METHODS["orchestrate, snapshot every step + keepers, no disk"]}


class IdleActor:
    def pid(self) -> int:
        return os.getpid()


def start_idle_actor():
    """An actor that does nothing, placed and started like a keeper (same actor options, same node)."""
    import ray

    from orchestrate.checkpoint.keepers.keeper import keeper_actor_options

    actor = ray.remote(IdleActor).options(**keeper_actor_options(ray.get_runtime_context().get_node_id())).remote()
    ray.get(actor.pid.remote())
    return actor


def run_arm(arm: str, overrides: list[str], timeout_s: float):
    import ray

    idle = start_idle_actor() if arm == BESIDE_IDLE else None
    try:
        return run_orchestrate(overrides + ARMS[arm], timeout_s)
    finally:
        if idle is not None:
            ray.kill(idle)


def table(results: dict[str, MethodResults], repeats: int) -> str:
    lines = ["| run | iteration time (s) | ratio to no checkpointing | 95% interval | per repeat |",
             "|---|---:|---:|---|---|"]
    for arm, result in results.items():
        ratios = paired_ratios(result, results[NONE])
        interval = median_interval([r for r in ratios if r is not None])
        lines.append(f"| {arm} | {fmt(median_or_none(result.iteration_s(r) for r in range(repeats)))} | "
                     f"{fmt(median_or_none(ratios))} | {'-' if interval is None else '-'.join(map(fmt, interval))} | "
                     f"{', '.join(map(fmt, ratios))} |")
    failures = [f"- {arm}, {error}" for arm, result in results.items() for error in result.errors]
    return "\n".join(lines + (["", "Failed runs (last line of stderr):", *failures] if failures else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, repeats=6, steps=32)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat of 4 steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.layers, args.repeats, args.steps = 128, 2, 1, 4
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS} (warm-up steps are skipped)")
    n_params, state_gib = training_state_size(args)
    with one_cluster_for_all_runs() as join:
        overrides = shared_overrides(args) + [join]
        results = run_alternating({arm: partial(run_arm, arm, overrides, args.timeout) for arm in ARMS}, args.repeats)
    print(f"Model: Llama dim {args.dim}, {args.layers} layers, {n_params / 1e6:.1f}M parameters, training state "
          f"{state_gib:.2f} GiB; {args.steps} steps per run, iteration time = mean over steps {WARMUP_STEPS + 1}.."
          f"{args.steps}; median of {args.repeats} alternating repeats; every run joined to one Ray cluster.\n")
    print(table(results, args.repeats))


if __name__ == "__main__":
    main()
