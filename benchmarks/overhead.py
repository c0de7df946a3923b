"""Overhead of orchestrate's DDP against a plain torch.multiprocessing DDP loop, side by side in one run.

Same model, data, batch, optimizer and number of workers. Step time is the steady-state wall time per step
(median over repeats, first ``--warmup`` steps skipped) measured the same way on both sides: the time between
the ends of consecutive steps on the workers. Also: seconds from invoking ``orchestrate launch`` to the first
finished step.

    python -m benchmarks.overhead [--steps 80] [--repeats 3]
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
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrate.cli import compose_config
from orchestrate.data import ResumableSampler
from orchestrate.models.llama import build_llama, cross_entropy_loss
from orchestrate.trainer import build_lr_scheduler, build_optimizer
from orchestrate.worker import build_data

RECIPE = ["recipe=quickstart"]  # --recipe replaces it


def per_step_seconds(end_times: list[float], warmup: int) -> float:
    steady = end_times[warmup:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def run_orchestrate(steps: int, warmup: int, *overrides: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        subprocess.run([sys.executable, "-m", "orchestrate", "launch", *RECIPE, f"train.steps={steps}",
                        f"run.dir={tmp}/run", "logging.progress=false", *overrides], check=True,
                       capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time"] for r in records if "loss" in r]
    return per_step_seconds(ends, warmup), ends[0] - started


def _plain_rank(rank: int, world: int, port: int, steps: int, recipe: list[str], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    cfg = compose_config([*recipe, f"train.steps={steps}"])
    model = build_llama(cfg.model, seed=cfg.train.seed, max_seq_len=cfg.train.seq_len)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_lr_scheduler(cfg.optim, steps, optimizer)
    data = build_data(cfg)
    sampler = ResumableSampler(data.n_train, cfg.train.global_batch_size, rank, world, cfg.train.seed)
    ends = []
    for _ in range(steps):
        inputs, targets = data.batch(sampler.next_window_ids())
        cross_entropy_loss(ddp(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ends.append(time.time())
    results[rank] = ends
    dist.destroy_process_group()
    os._exit(0)


def run_plain(steps: int, warmup: int, world: int = 2) -> float:
    from orchestrate.parallel.local_ranks import free_port

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_plain_rank, args=(r, world, port, steps, list(RECIPE), results))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        ends = [max(values) for values in zip(*[results[r] for r in range(world)])]
    return per_step_seconds(ends, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", default="quickstart")
    args = parser.parse_args()
    RECIPE[:] = [f"recipe={args.recipe}"]
    bare, snapshots, plain, first = [], [], [], []
    for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
        step_s, first_s = run_orchestrate(args.steps, args.warmup, "checkpoint.every=0")
        bare.append(step_s)
        first.append(first_s)
        snapshots.append(run_orchestrate(args.steps, args.warmup, "checkpoint.every=1", "checkpoint.keepers=false",
                                         "checkpoint.persist_every=0")[0])
        plain.append(run_plain(args.steps, args.warmup))
    print(f"Overhead: recipe {args.recipe}, 2 workers, {args.steps} steps, median of {args.repeats} interleaved runs\n")
    print("| metric | orchestrate | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    rows = [("step time, no checkpointing vs plain torch DDP", bare, plain, "<= 1.05"),
            ("step time, in-process snapshot every step (keepers off) vs plain torch DDP", snapshots, plain, "-"),
            ("step time, in-process snapshot every step (keepers off) vs no checkpointing", snapshots, bare,
             "<= 1.05")]
    for label, ours, base, goal in rows:
        ratio = statistics.median(o / b for o, b in zip(ours, base))
        print(f"| {label} (ms) | {1000 * statistics.median(ours):.1f} | {1000 * statistics.median(base):.1f} "
              f"| {ratio:.3f} | {goal} |")
    print(f"| launch to first finished step (s) | {statistics.median(first):.1f} | - | - | <= 10 |")


if __name__ == "__main__":
    main()
