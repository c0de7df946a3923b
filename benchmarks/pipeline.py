"""Pipeline schedules side by side: measured bubble fraction against theory, and peak activation memory.

For every schedule at pp=2 and pp=4 (one gloo process per rank), on a small Llama:

- bubble = waiting / step time on each rank (``Pipeline.last_step_timing``: time outside the stages'
  forward/backward), averaged over ranks, median over the measured steps. Theory: (p-1)/(m+p-1) for GPipe and
  1F1B; (p-1)/(v*m+p-1) for the looped schedules with v stages per rank; zero-bubble schedules aim at ~0.
- peak activation memory per rank = for each local stage, the most microbatches whose activations it held at
  once (counted by the stage) times the bytes autograd saves for one microbatch (measured with
  saved_tensors_hooks, parameters excluded), summed over the rank's stages (an upper bound when there are two).

On a 2-core machine pp=4 oversubscribes the cores: a rank descheduled inside forward counts as compute, so the
measured bubble there is a rough figure.

    python -m benchmarks.pipeline [--microbatches 8] [--steps 3] [--pp 2 4]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from tests.distributed import run_ranks

MODEL = dict(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=128)
MICROBATCH_ROWS, SEQ = 2, 128
# (schedule, virtual stages)
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2), ("interleaved_zb", 2),
             ("zbv", 2), ("dualpipev", 2)]


def theory_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> str:
    if schedule in ("gpipe", "1f1b"):
        return f"{(pp - 1) / (microbatches + pp - 1):.2f}"
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return f"{(pp - 1) / (virtual_stages * microbatches + pp - 1):.2f}"
    return "~0"


def saved_activation_bytes(module: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward of ``module``, counting each storage once."""
    param_storages = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(inputs)
    return sum(storages.values())


def _stage_input(stage: torch.nn.Module) -> torch.Tensor:
    if stage.tok_embeddings is not None:
        return torch.randint(0, MODEL["vocab_size"], (MICROBATCH_ROWS, SEQ))
    return torch.randn(MICROBATCH_ROWS, SEQ, MODEL["dim"], requires_grad=True)


def _measure_rank(rank, world, microbatches, steps):
    import torch.distributed as dist

    from orchestrator.models import LlamaConfig, build_llama, cross_entropy_loss
    from parallel.pipeline import build_pipeline

    batch_rows = microbatches * MICROBATCH_ROWS
    tokens = torch.randint(0, MODEL["vocab_size"], (batch_rows, SEQ + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for schedule, virtual_stages in SCHEDULES:
        pipe = build_pipeline(build_llama(LlamaConfig(**MODEL), seed=0), dist.group.WORLD, schedule, microbatches,
                              (MICROBATCH_ROWS, SEQ), cross_entropy_loss, virtual_stages=virtual_stages)
        bubbles = []
        for step in range(steps + 1):  # step 0 warms up the schedule and the communicators
            pipe.step(tokens[:, :-1], tokens[:, 1:])
            timing = pipe.last_step_timing
            if step > 0:
                bubbles.append(timing.wait_s / timing.total_s)
        activation_bytes = sum(held * saved_activation_bytes(stage, _stage_input(stage))
                               for held, stage in zip(timing.peak_in_flight, pipe.stage_modules))
        results[schedule] = dict(bubble=statistics.median(bubbles), held=timing.peak_in_flight,
                                 activation_mib=activation_bytes / 2**20)
        dist.barrier()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(f"model {MODEL}, microbatch {MICROBATCH_ROWS}x{SEQ} tokens, m={args.microbatches}\n")
    print("| pp | schedule | v | bubble measured | bubble theory | microbatches held per rank | "
          "peak activations per rank (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for pp in args.pp:
        ranks = run_ranks(pp, _measure_rank, args.microbatches, args.steps, timeout_s=300)
        for schedule, virtual_stages in SCHEDULES:
            rows = [rank[schedule] for rank in ranks]
            bubble = statistics.mean(row["bubble"] for row in rows)
            held = " / ".join("+".join(map(str, row["held"])) for row in rows)
            memory = " / ".join(f"{row['activation_mib']:.1f}" for row in rows)
            print(f"| {pp} | {schedule} | {virtual_stages} | {bubble:.2f} | "
                  f"{theory_bubble(schedule, pp, args.microbatches, virtual_stages)} | {held} | {memory} |")


if __name__ == "__main__":
    main()
