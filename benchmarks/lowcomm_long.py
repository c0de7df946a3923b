"""Long-horizon, tuned comparison of the low-communication methods with DDP on the Llama task (issue 15).

    python -m benchmarks.lowcomm --task llama-long --methods ddp,diloco_h50   # runs the settings not yet run
    python -m benchmarks.lowcomm --task llama-long --tabulate                 # the tables, from the results file

Every method gets the same sweep budget (four settings, one run each, the same steps, data and init): DDP over
its inner learning rate, DiLoCo and Streaming DiLoCo over the outer learning rate, NoLoCo over its outer learning
rate and momentum, 1-bit Adam over its freeze point. Each method is then compared at its best setting with DDP at
DDP's best setting. A run appends one JSON line to ``benchmarks/results/lowcomm_llama_long.jsonl`` (committed),
so a sweep can be continued and every table re-derived from the file.

The regime (``REGIME``): our Llama, small enough that thousands of steps of 4 replicas fit on a 2-core machine,
with a per-replica batch large enough that one replica's gradient is not mostly noise. Eval loss is measured on
fixed held-out windows every ``EVAL_EVERY`` steps, a multiple of H, so the DiLoCo family is evaluated on its
synchronized parameters and every method at equal tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from benchmarks.lowcomm import LlamaTask, Run, _train
from orchestrate.parallel.local_ranks import run_ranks

RESULTS = Path(__file__).resolve().parent / "results" / "lowcomm_llama_long.jsonl"
TASK_NAME = "llama-long"
EVAL_EVERY = 100


@dataclass(frozen=True)
class Regime:
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    seq_len: int = 64
    batch_per_replica: int = 16
    replicas: int = 4
    steps: int = 2000
    lr: float = 3e-3  # DDP's (and every inner optimizer's) base learning rate; DDP's sweep scales it
    warmup_steps: int = 50
    eval_windows: int = 128
    corpus_bytes: int = 8_000_000


REGIME = Regime()


def sweeps(steps: int) -> dict[str, list[tuple[str, Run, float]]]:
    """method -> [(setting label, run, inner lr scale)]: four settings each (the single worker is a reference)."""
    def streaming(h: int, lr: float) -> dict:
        return dict(sync_every=h, outer_lr=lr, quantization="e3m0", layers_per_fragment=2, quant_block=64)

    outer_lrs = (0.3, 0.5, 0.7, 1.0)
    return {
        "ddp": [(f"lr x{scale}", Run("DDP", "ddp"), scale) for scale in (0.5, 1.0, 2.0, 4.0)],
        "single": [("lr x1", Run("single worker", "ddp", single_worker=True), 1.0)],
        "diloco_h50": [(f"outer lr {lr}", Run("DiLoCo H=50", "diloco", dict(sync_every=50, outer_lr=lr)), 1.0)
                       for lr in outer_lrs],
        "diloco_h100": [(f"outer lr {lr}", Run("DiLoCo H=100", "diloco", dict(sync_every=100, outer_lr=lr)), 1.0)
                        for lr in outer_lrs],
        "streaming_h50": [(f"outer lr {lr}", Run("Streaming DiLoCo H=50 e3m0", "streaming_diloco",
                                                 streaming(50, lr)), 1.0) for lr in outer_lrs],
        "streaming_h100": [(f"outer lr {lr}", Run("Streaming DiLoCo H=100 e3m0", "streaming_diloco",
                                                  streaming(100, lr)), 1.0) for lr in outer_lrs],
        "noloco_h50": [(f"outer lr {lr}, momentum {m}", Run("NoLoCo H=50", "noloco",
                                                            dict(sync_every=50, outer_lr=lr, momentum=m)), 1.0)
                       for lr, m in ((0.5, 0.3), (0.7, 0.5), (1.0, 0.5), (0.7, 0.3))],  # inside its stability window
        # the diagnosis of DiLoCo's gap: DDP steps before the first outer step, as the DiLoCo papers start from a
        # model trained with data parallelism (bytes include the warm-up's); at H=50's best outer lr (its sweep)
        "diloco_h50_warmup": [(f"DDP warm-up {w} steps", Run("DiLoCo H=50 after DDP warm-up", "diloco", dict(
            sync_every=50, outer_lr=0.5, ddp_warmup_steps=w)), 1.0) for w in (100, 250, 500, 1000)],
        "streaming_h50_warmup": [("outer lr 0.5, DDP warm-up 250 steps", Run(
            "Streaming DiLoCo H=50 e3m0 after DDP warm-up", "streaming_diloco", dict(streaming(50, 0.5),
                                                                               ddp_warmup_steps=250)), 1.0)],
        "sparseloco_h50_warmup": [("outer lr 1.6, DDP warm-up 250 steps", Run(
            "SparseLoCo H=50 after DDP warm-up", "diloco", dict(sync_every=50, outer_lr=1.6, compression="sparseloco",
                                                                ddp_warmup_steps=250)), 1.0)],
        "sparseloco_h50": [(f"outer lr {lr}", Run("SparseLoCo H=50", "diloco", dict(
            sync_every=50, outer_lr=lr, compression="sparseloco")), 1.0) for lr in SPARSELOCO_OUTER_LRS],
        "onebit_adam": [(f"freeze at {share:.0%}", Run("1-bit Adam", "onebit_adam",
                                                        dict(freeze_step=max(1, int(steps * share)))), 1.0)
                        for share in (0.05, 0.1, 0.2, 0.4)],
    }


# SparseLoCo's best of the first four (0.5..1.3) was the largest, so its sweep was extended past that edge.
SPARSELOCO_OUTER_LRS = (0.5, 0.7, 1.0, 1.3, 1.6, 2.0)

GOALS = {"diloco_h50": 1.05, "streaming_h50": 1.07, "noloco_h50": 1.10, "onebit_adam": 1.02, "sparseloco_h50": 1.10,
         "diloco_h50_warmup": 1.05, "streaming_h50_warmup": 1.07, "sparseloco_h50_warmup": 1.10}


class LongLlamaTask(LlamaTask):
    """The lowcomm Llama task with the model, batch, schedule and evaluation of ``Regime``."""

    def __init__(self, rank: int, world: int, regime: Regime, lr_scale: float):
        from orchestrate.config import OptimConfig
        from orchestrate.data import WindowedTokens, load_tokens
        from orchestrate.models.llama import LlamaConfig

        self.rank, self.world, self.steps = rank, world, regime.steps
        self.BATCH = regime.batch_per_replica
        self.model_config = LlamaConfig(dim=regime.dim, n_layers=regime.n_layers, n_heads=regime.n_heads,
                                        n_kv_heads=regime.n_kv_heads)
        self.optim = OptimConfig(lr=regime.lr * lr_scale, warmup_steps=regime.warmup_steps)
        self.data = WindowedTokens(load_tokens("stdlib", None, regime.corpus_bytes), regime.seq_len, 0.02)
        ids = torch.arange(self.data.n_train, self.data.n_train + regime.eval_windows).numpy()
        self.eval_set = self.data.batch(ids)


def _rank(rank: int, world: int, run: Run, regime: Regime, lr_scale: float) -> dict:
    torch.manual_seed(0)
    task = LongLlamaTask(rank, world, regime, lr_scale)
    return _train(run, task, TASK_NAME, regime.steps, rank, eval_every=EVAL_EVERY)


def run_setting(method: str, label: str, run: Run, lr_scale: float, regime: Regime) -> dict:
    started = time.time()
    per_rank = run_ranks(regime.replicas, _rank, run, regime, lr_scale, timeout_s=4 * 3600)
    curve = {step: sum(r["curve"][step] for r in per_rank) / len(per_rank) for step in per_rank[0]["curve"]}
    return {"method": method, "setting": label, "regime": asdict(regime), "eval_loss": curve[regime.steps],
            "curve": {str(step): loss for step, loss in curve.items()}, "bytes": per_rank[0]["total"],
            "peak_bytes": per_rank[0]["peak"], "seconds": round(time.time() - started, 1)}


def read_results(regime: Regime) -> list[dict]:
    if not RESULTS.exists():
        return []
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["regime"] == asdict(regime)]


def run_missing(methods: list[str], regime: Regime) -> None:
    done = {(row["method"], row["setting"]) for row in read_results(regime)}
    for method in methods:
        for label, run, lr_scale in sweeps(regime.steps)[method]:
            if (method, label) in done:
                continue
            row = run_setting(method, label, run, lr_scale, regime)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(f"{method} {label}: eval {row['eval_loss']:.4f} in {row['seconds']:.0f}s", flush=True)


def best_of(rows: list[dict], method: str) -> Optional[dict]:
    candidates = [row for row in rows if row["method"] == method]
    return min(candidates, key=lambda row: row["eval_loss"]) if candidates else None


def tabulate(regime: Regime) -> None:
    rows = read_results(regime)
    ddp = best_of(rows, "ddp")
    if ddp is None:
        print("no DDP run yet: run --methods ddp first")
        return
    print(f"\nllama-long: {regime.replicas} replicas, {regime.steps} steps, batch {regime.batch_per_replica} x "
          f"{regime.seq_len} tokens per replica, Llama dim {regime.dim} x {regime.n_layers} layers; each method at "
          f"its best setting of the sweep, DDP at its best ({ddp['setting']})\n")
    print("| method | best setting | eval loss | / DDP | goal | bytes / DDP | peak bytes / DDP | settings run |")
    print("|---|---|---|---|---|---|---|---|")
    for method in sweeps(regime.steps):
        best = best_of(rows, method)
        if best is None:
            continue
        ratio = best["eval_loss"] / ddp["eval_loss"]
        goal = GOALS.get(method)
        verdict = "-" if goal is None else f"<= {goal:.2f} {'met' if ratio <= goal else '**missed**'}"
        runs = len([row for row in rows if row["method"] == method])
        print(f"| {method} | {best['setting']} | {best['eval_loss']:.4f} | {ratio:.3f} | {verdict} | "
              f"{best['bytes'] / ddp['bytes']:.5f} | {best['peak_bytes'] / ddp['peak_bytes']:.4f} | {runs} |")
    print("\nEvery setting (eval loss at the end; the sweep behind the table):\n")
    print("| method | setting | eval loss | / DDP best | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['setting']} | {row['eval_loss']:.4f} | "
              f"{row['eval_loss'] / ddp['eval_loss']:.3f} | {row['seconds']:.0f} |")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lowcomm --task llama-long")
    parser.add_argument("--methods", default="", help=f"comma-separated: {', '.join(sweeps(1))}")
    parser.add_argument("--steps", type=int, default=REGIME.steps)
    parser.add_argument("--batch-per-replica", type=int, default=REGIME.batch_per_replica)
    parser.add_argument("--tabulate", action="store_true")
    args = parser.parse_args(argv)
    regime = replace(REGIME, steps=args.steps, batch_per_replica=args.batch_per_replica)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(sweeps(1)))
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; valid: {', '.join(sweeps(1))}")
    run_missing(methods, regime)
    if args.tabulate or not methods:
        tabulate(regime)
