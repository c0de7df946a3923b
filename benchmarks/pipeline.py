"""Pipeline schedules side by side: measured bubble fraction against theory, and peak activation memory.

For every schedule at pp=2 and pp=4 (one gloo process per rank), on a small Llama:

- bubble of a rank = 1 - its compute / the step time, where the step runs from a barrier that starts every rank
  together to the end of the slowest rank (a rank that finishes early idles until the pipeline drains, as in
  the theory); averaged over ranks, median over the measured steps. Compute is the time inside the stages'
  forward/backward and the loss (``Pipeline.last_step_timing``). Theory: (p-1)/(m+p-1) for GPipe and 1F1B;
  (p-1)/(v*m+p-1) for the looped schedules with v stages per rank; zero-bubble schedules aim at ~0.
- The theory counts only idle time waiting for neighbours and assumes free transfers and no scheduling cost.
  The raw bubble also holds (a) the schedule's own Python bookkeeping between actions and (b) the gloo send/recv
  of activations and gradients between the stage processes. Both are measured and printed, and "net" subtracts
  them. (a) = the rank's step time minus compute minus the time blocked inside torch's p2p waits
  (``schedules._wait_batch_p2p``, a private function every schedule calls, wrapped here in the benchmark only).
  (b): right after every step we time one transfer of a boundary tensor by ping-pong between neighbouring ranks
  that both wait for it (no bubble in it; per step because the machine's load changes it several-fold) and
  charge each rank that cost for every message crossing its links in the step (sent and received). For 1F1B at
  pp=2 those are the transfers on the critical path: the stages have no slack, so between a rank's backward of
  microbatch i and its forward of i+1 both ranks wait for a gradient and an activation to cross. Elsewhere (b)
  is an estimate (it may subtract a transfer that overlapped compute, or miss a chain of transfers filling a
  deeper pipeline).
- peak activation memory per rank = for each local stage, the most microbatches whose activations it held at
  once (counted by the stage) times the bytes autograd saves for one microbatch (measured with
  saved_tensors_hooks, parameters excluded), summed over the rank's stages (an upper bound when there are two).

On a 2-core machine pp=4 (and pp x tp) oversubscribes the cores: a rank descheduled inside forward counts as
compute, so the measured bubble there is a rough figure. ``--dim`` enlarges the model: compute per microbatch
grows with dim^2, a transfer with dim, so the share of transfers in the waiting shrinks. ``--tp 2`` makes each
stage tensor-parallel (world pp x tp).

    python -m benchmarks.pipeline [--microbatches 8] [--steps 5] [--pp 2 4] [--dim 128] [--tp 1]
        [--schedules 1f1b gpipe]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from orchestrate.parallel.local_ranks import run_ranks

MODEL = dict(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256)
MICROBATCH_ROWS, SEQ = 2, 128
# (schedule, virtual stages)
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2), ("interleaved_zb", 2),
             ("zbv", 2), ("dualpipev", 2)]


def theory_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> float:
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (microbatches + pp - 1)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return (pp - 1) / (virtual_stages * microbatches + pp - 1)
    return 0.0


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that own storage under a wrapper subclass (DTensor, funcol's AsyncCollectiveTensor)."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return [plain for t in inner if isinstance(t, torch.Tensor) for plain in _plain_tensors(t)]


def saved_activation_bytes(module: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward of ``module``, counting each storage once."""
    params = [plain for t in [*module.parameters(), *module.buffers()] for plain in _plain_tensors(t)]
    param_storages = {t.untyped_storage().data_ptr() for t in params}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for plain in _plain_tensors(tensor):
            storage = plain.untyped_storage()
            if storage.data_ptr() not in param_storages:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(inputs)
    return sum(storages.values())


def _stage_input(stage: torch.nn.Module, model: dict) -> torch.Tensor:
    if stage.tok_embeddings is not None:
        return torch.randint(0, model["vocab_size"], (MICROBATCH_ROWS, SEQ))
    return torch.randn(MICROBATCH_ROWS, SEQ, model["dim"], requires_grad=True)


def link_messages(owners: list[int], pp_rank: int, microbatches: int) -> int:
    """Messages crossing a pipeline rank's links in one step, sent and received: per microbatch and per stage of
    the rank, an activation in and a gradient out where its predecessor lives on another rank, an activation out
    and a gradient in where its successor does."""
    per_microbatch = 0
    for stage_id, owner in enumerate(owners):
        if owner == pp_rank:
            per_microbatch += 2 * (stage_id > 0 and owners[stage_id - 1] != pp_rank)
            per_microbatch += 2 * (stage_id < len(owners) - 1 and owners[stage_id + 1] != pp_rank)
    return per_microbatch * microbatches


def one_way_transfer_s(shape: tuple[int, ...], group, reps: int = 8) -> float:
    """Seconds for one fp32 message of ``shape`` between neighbouring pipeline ranks that both wait for it (half
    a ping-pong round trip, median over ``reps``); the slowest neighbour pair, known to every rank."""
    import torch.distributed as dist

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    message = torch.randn(shape)
    slowest = torch.zeros(1)
    for left in range(size - 1):
        dist.barrier(group=group)
        if rank not in (left, left + 1):
            continue
        peer = dist.get_global_rank(group, left + 1 if rank == left else left)
        trips = []
        for _ in range(reps + 2):  # two warm-up trips
            start = time.perf_counter()
            if rank == left:
                dist.send(message, peer)
                dist.recv(message, peer)
            else:
                dist.recv(message, peer)
                dist.send(message, peer)
            trips.append(time.perf_counter() - start)
        slowest = torch.maximum(slowest, torch.tensor([statistics.median(trips[2:]) / 2]))
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return slowest.item()


class P2PWaitClock:
    """Seconds this process spends blocked in torch pipelining's p2p waits since the last ``reset``."""

    def __init__(self):
        from torch.distributed.pipelining import schedules

        self.seconds = 0.0
        original = schedules._wait_batch_p2p

        def timed(work):
            start = time.perf_counter()
            try:
                return original(work)
            finally:
                self.seconds += time.perf_counter() - start

        schedules._wait_batch_p2p = timed

    def reset(self) -> None:
        self.seconds = 0.0


def _measure_rank(rank, world, model, tp, schedules, microbatches, steps):
    import torch.distributed as dist

    from orchestrate.models.llama import PARTS, LlamaConfig, build_llama, cross_entropy_loss
    from orchestrate.parallel.mesh import ParallelDims, build_mesh
    from orchestrate.parallel.pipeline import build_pipeline
    from orchestrate.parallel.tensor import apply_tp

    mesh = build_mesh(ParallelDims(pp=world // tp, tp=tp), "cpu")
    pp_group = mesh["pp"].get_group()
    pp_rank = dist.get_rank(pp_group)
    batch_rows = microbatches * MICROBATCH_ROWS
    tokens = torch.randint(0, model["vocab_size"], (batch_rows, SEQ + 1), generator=torch.Generator().manual_seed(0))
    boundary = (MICROBATCH_ROWS, SEQ, model["dim"])
    clock = P2PWaitClock()
    results = {}
    for schedule, virtual_stages in schedules:
        pipe = build_pipeline(build_llama(LlamaConfig(**model), seed=0), PARTS, pp_group, schedule, microbatches,
                              (MICROBATCH_ROWS, SEQ), cross_entropy_loss, virtual_stages=virtual_stages,
                              parallelize_stage=lambda stage: apply_tp(stage, PARTS, mesh["tp"], False, False))
        messages = link_messages(pipe.layout.owners, pp_rank, microbatches)
        samples: dict[str, list[float]] = {key: [] for key in ("raw", "bookkeeping", "transfers", "net", "one_way")}
        for step in range(steps + 1):  # step 0 warms up the schedule and the communicators
            dist.barrier()
            clock.reset()
            pipe.step(tokens[:, :-1], tokens[:, 1:])
            timing, blocked_s = pipe.last_step_timing, clock.seconds
            step_s = torch.tensor([timing.total_s])
            dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
            step_s = step_s.item()
            one_way_s = one_way_transfer_s(boundary, pp_group)
            bookkeeping_s = timing.wait_s - blocked_s
            transfers_s = messages * one_way_s
            if step > 0:
                for key, value in (("raw", step_s - timing.compute_s), ("bookkeeping", bookkeeping_s),
                                   ("transfers", transfers_s),
                                   ("net", max(0.0, step_s - timing.compute_s - bookkeeping_s - transfers_s))):
                    samples[key].append(value / step_s)
                samples["one_way"].append(one_way_s)
        activation_bytes = sum(held * saved_activation_bytes(stage, _stage_input(stage, model))
                               for held, stage in zip(timing.peak_in_flight, pipe.stage_modules))
        results[schedule] = {key: statistics.median(values) for key, values in samples.items()}
        results[schedule].update(held=timing.peak_in_flight, activation_mib=activation_bytes / 2**20)
        dist.barrier()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=MODEL["dim"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--schedules", nargs="+", default=[name for name, _ in SCHEDULES])
    args = parser.parse_args()
    model = {**MODEL, "dim": args.dim}
    schedules = [(name, v) for name, v in SCHEDULES if name in args.schedules]
    print(f"model {model}, microbatch {MICROBATCH_ROWS}x{SEQ} tokens, m={args.microbatches}, tp={args.tp}, "
          f"load average before {os.getloadavg()[0]:.1f}\n")
    print("| pp | tp | schedule | v | bubble raw | bookkeeping | p2p transfers | bubble net | theory | "
          "raw / theory | net / theory | p2p one-way (ms) | microbatches held per rank | "
          "peak activations per rank (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pp in args.pp:
        ranks = run_ranks(pp * args.tp, _measure_rank, model, args.tp, schedules, args.microbatches, args.steps,
                          timeout_s=300)
        for schedule, virtual_stages in schedules:
            rows = [rank[schedule] for rank in ranks]
            raw, bookkeeping, transfers, net = (statistics.mean(row[key] for row in rows)
                                                for key in ("raw", "bookkeeping", "transfers", "net"))
            theory = theory_bubble(schedule, pp, args.microbatches, virtual_stages)
            ratios = f"{theory:.3f} | {raw / theory:.2f} | {net / theory:.2f}" if theory else "~0 | - | -"
            held = " / ".join("+".join(map(str, row["held"])) for row in rows)
            memory = " / ".join(f"{row['activation_mib']:.1f}" for row in rows)
            print(f"| {pp} | {args.tp} | {schedule} | {virtual_stages} | {raw:.3f} | {bookkeeping:.3f} | "
                  f"{transfers:.3f} | {net:.3f} | {ratios} | {rows[0]['one_way'] * 1e3:.2f} | {held} | {memory} |")
    print(f"\nload average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
