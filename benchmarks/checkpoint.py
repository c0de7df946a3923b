"""Training-visible stall per checkpoint: orchestrate's lazy engine against torch.save and DCP.

State: 1 GiB fp32 laid out like specs/checkpointing.md section 5 (31 x [4096, 2048] + 128 x [256, 256]).
"Stall" is the time the training thread cannot compute:
- orchestrate (lazy): ``snapshot`` + ``wait_until_copied`` with a simulated forward/backward in between, as the
  training-step contract places them; persistence to the universal format runs in the background.
- orchestrate (no overlap): ``wait_until_copied`` right after ``snapshot``: the full copy, the worst case.
- ``torch.save`` to the page cache, ``dcp.save(no_dist=True)`` (defaults: fsync), and the blocking part of
  ``dcp.async_save(no_dist=True)`` (staging); their background part is awaited outside the measurement.

Run: ``.venv/bin/python -m benchmarks.checkpoint [--gib 1.0] [--repeats 3] [--step-ms 400]``
Prints a markdown table; ratios are each method's median stall over the lazy engine's and over the copy floor.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp

from checkpoint.arena import HostArena
from checkpoint.engine import CheckpointEngine, UniversalPersister
from checkpoint.universal import FragmentSpec, TrainerState


def make_state(gib: float) -> dict[str, torch.Tensor]:
    rows = max(1, int(4096 * gib))  # other sizes scale the big tensors' rows and keep 159 tensors
    state = {f"layers.{i}.weight": torch.randn(rows, 2048) for i in range(31)}
    state.update({f"norms.{i}.weight": torch.randn(256, 256) for i in range(128)})
    return state


def calibrated_step(step_ms: float) -> Callable[[], None]:
    """A stand-in forward/backward: fixed matmul work that takes about ``step_ms`` on an idle core."""
    a = torch.randn(512, 512)

    def work(iterations: int) -> None:
        x = a
        for _ in range(iterations):
            x = torch.tanh(x @ a / 512)

    started = time.perf_counter()
    work(20)
    per_iteration = (time.perf_counter() - started) / 20
    iterations = max(1, int(step_ms / 1000 / per_iteration))
    return lambda: work(iterations)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def bench_engine(state, root: Path, repeats: int, simulated_step) -> dict[str, list[float]]:
    """Stalls with and without overlap, then background persist times, all through one reused arena."""
    fragments = [FragmentSpec.whole(name, tensor) for name, tensor in state.items()]
    arena = HostArena()
    stalls = {"lazy": [], "floor": [], "persist": []}
    with CheckpointEngine(arena, every=1) as engine:
        for step in range(1, 2 * (repeats + 1) + 1):
            engine.snapshot(step, lambda: fragments)
            overlapped = step % 2 == 1
            if overlapped:
                simulated_step()
            engine.wait_until_copied()
            if step > 2:  # the first two snapshots fault in the arena pages
                stalls["lazy" if overlapped else "floor"].append(engine.stats[-1].blocked_s)
    for step in range(1, repeats + 1):
        persister = UniversalPersister(root / "orchestrate", keep=1)
        with CheckpointEngine(arena, every=1, persist_every=1, persister=persister) as engine:
            engine.snapshot(step, lambda: fragments, TrainerState(step=step))
        stalls["persist"].append(engine.stats[-1].persist_s)
    return stalls


def bench_baselines(state, root: Path, repeats: int) -> dict[str, list[float]]:
    results = {"torch.save": [], "dcp.save": [], "dcp.async_save": [], "dcp.async_save total": []}
    for attempt in range(repeats + 1):
        target = root / f"baseline-{attempt}"
        target.mkdir()
        seconds = {}
        seconds["torch.save"], _ = timed(lambda: torch.save(state, target / "state.pt"))
        seconds["dcp.save"], _ = timed(lambda: dcp.save(state, checkpoint_id=target / "dcp", no_dist=True))
        blocking, future = timed(lambda: dcp.async_save(state, checkpoint_id=target / "async", no_dist=True))
        seconds["dcp.async_save"] = blocking
        seconds["dcp.async_save total"] = blocking + timed(future.result)[0]
        shutil.rmtree(target)
        if attempt:  # the first round warms allocators and the page cache
            for name, value in seconds.items():
                results[name].append(value)
    return results


def table(engine: dict[str, list[float]], baselines: dict[str, list[float]], nbytes: int) -> str:
    lazy = max(statistics.median(engine["lazy"]), 1e-3)  # clamped: a fully hidden copy would divide by ~0
    floor = statistics.median(engine["floor"])
    rows = [("orchestrate lazy snapshot (copy overlapped with the step)", engine["lazy"]),
            ("orchestrate snapshot without overlap (copy floor)", engine["floor"]),
            ("torch.save (page cache)", baselines["torch.save"]),
            ("dcp.save, no_dist (defaults, fsync)", baselines["dcp.save"]),
            ("dcp.async_save, no_dist: blocking part", baselines["dcp.async_save"])]
    lines = [f"State: {nbytes / 2**30:.3f} GiB fp32, 159 tensors. Median of the measured rounds; ratios are "
             f"over the lazy stall clamped to at least 1 ms.", "",
             "| method | training-visible stall (s) | / orchestrate lazy | / orchestrate without overlap |",
             "|---|---:|---:|---:|"]
    for name, values in rows:
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.4f} | {max(median, 1e-3) / lazy:.1f}x | {median / floor:.2f}x |")
    lines += ["", "Background work, not on the training thread:", "",
              f"- orchestrate persist to the universal format (fsync, commit): "
              f"{statistics.median(engine['persist']):.3f} s",
              f"- dcp.async_save until written: {statistics.median(baselines['dcp.async_save total']):.3f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=400.0, help="simulated forward/backward duration")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # dcp warns about no_dist on every call
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        state = make_state(args.gib)
        simulated_step = calibrated_step(args.step_ms)
        engine = bench_engine(state, root, args.repeats, simulated_step)
        baselines = bench_baselines(state, root, args.repeats)
        print(table(engine, baselines, sum(t.nbytes for t in state.values())))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
