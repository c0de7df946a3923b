"""Tensor and context parallelism on CPU gloo ranks: memory, throughput and bytes on the wire, as markdown.

- Context parallelism, cp = 1, 2, 4, ring and Ulysses side by side: the sequence length is doubled until one
  training step (forward, backward, gradient all-reduce over cp, AdamW) raises some worker's peak RSS more
  than the budget above its idle RSS (the RSS right before the step: runtime, model, optimizer state);
  reported are the longest length that fits, its peak, tokens/s and bytes sent per step.
- Tensor parallelism on 2 workers: bytes sent per step per rank for dp=2 (gradients), tp=2 and tp=2 with
  sequence + loss parallelism (activations), at the same global batch.

Bytes are counted, not derived from a formula for the model: a dispatch mode sees every collective the rank
issues (DTensor's functional collectives, torch.distributed calls, P2P sends) and adds the bytes that op puts on
the wire for the tensor it was given, with the ring conventions of parallel/comm.py. Peak RSS is the kernel's
high-water mark (VmHWM), reset to the idle RSS before each measured step. Step time is wall time between
barriers; world 4 oversubscribes 2 cores, so its tokens/s understate what 4 cores would do.

    .venv/bin/python -m benchmarks.parallel [--budget-mib 128] [--start-seq 512] [--max-seq 16384]
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrate.parallel import comm
from orchestrate.parallel.local_ranks import run_ranks

# A 2048-token vocabulary makes the per-token memory large (logits) while attention stays cheap at the lengths
# that fill the budget, so the sweep finishes in minutes.
MODEL = dict(vocab_size=2048, dim=128, n_layers=2, n_heads=8, n_kv_heads=4)
CP_DEGREES = (1, 2, 4)
TP_LAYOUTS = {
    "dp=2 (gradient all-reduce)": dict(dp=2),
    "tp=2": dict(tp=2, sequence_parallel=False, loss_parallel=False),
    "tp=2 + sequence + loss parallel": dict(tp=2, sequence_parallel=True, loss_parallel=True),
}

_functional = torch.ops._c10d_functional
_c10d = torch.ops.c10d


def _group(group) -> dist.ProcessGroup:
    """Functional collectives name their group; c10d ops carry it as a TorchScript object."""
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    return dist.ProcessGroup.unbox(group)


def _group_size(group) -> int:
    return _group(group).size()


def _sent_bytes(packet, args) -> int | None:
    """Bytes this rank sends for one collective, or None when ``packet`` is not a collective."""
    if packet in (_functional.all_reduce, _functional.all_reduce_):
        return comm.all_reduce_bytes(comm.tensor_nbytes(args[0]), _group_size(args[2]))
    if packet is _c10d.allreduce_:
        return sum(comm.all_reduce_bytes(comm.tensor_nbytes(t), _group_size(args[1])) for t in args[0])
    if packet is _functional.all_gather_into_tensor:
        return comm.all_gather_bytes(comm.tensor_nbytes(args[0]), _group_size(args[2]))
    if packet is _c10d._allgather_base_:
        return comm.all_gather_bytes(comm.tensor_nbytes(args[1]), _group_size(args[2]))
    if packet is _functional.reduce_scatter_tensor:
        return comm.reduce_scatter_bytes(comm.tensor_nbytes(args[0]), _group_size(args[3]))
    if packet is _c10d._reduce_scatter_base_:
        return comm.reduce_scatter_bytes(comm.tensor_nbytes(args[1]), _group_size(args[2]))
    # An equal-split all-to-all sends every chunk but its own: (W-1)/W of the input, as a reduce-scatter does.
    if packet is _functional.all_to_all_single:
        return comm.reduce_scatter_bytes(comm.tensor_nbytes(args[0]), _group_size(args[3]))
    if packet is _c10d.alltoall_base_:
        return comm.reduce_scatter_bytes(comm.tensor_nbytes(args[1]), _group_size(args[2]))
    if packet is _c10d.broadcast_:
        return sum(comm.tensor_nbytes(t) for t in args[0]) if _group(args[1]).rank() == args[2] else 0
    if packet is _c10d.send:
        return sum(comm.tensor_nbytes(t) for t in args[0])
    if packet in (_c10d.recv_, _c10d.barrier, _functional.wait_tensor, _functional._wrap_tensor_autograd):
        return 0
    if str(packet).startswith(("c10d.", "_c10d_functional.")):
        raise NotImplementedError(f"benchmark does not count bytes of {packet}")
    return None


class CollectiveBytes(TorchDispatchMode):
    """Counts the bytes of every collective issued on this thread (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        # Let DTensor lower its op into local ops and collectives first, then count those (as CommDebugMode does).
        if any(t is DTensor for t in types):
            return NotImplemented
        sent = _sent_bytes(func._overloadpacket, args)
        if sent:
            self.bytes += sent
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS
        clear_refs.write("5")


def _build(layout: dict, seq: int):
    """Model, optimizer and sync for ``layout`` on this rank, with the rank's mesh coordinates."""
    from orchestrate.models.llama import PARTS, LlamaConfig, build_llama
    from orchestrate.parallel.context import apply_cp
    from orchestrate.parallel.mesh import ParallelDims, build_mesh, replica_group
    from orchestrate.parallel.sync.ddp import DDPSync
    from orchestrate.parallel.tensor import apply_tp

    dims = ParallelDims(dp=layout.get("dp", 1), tp=layout.get("tp", 1), cp=layout.get("cp", 1))
    mesh = build_mesh(dims, "cpu")
    model = build_llama(LlamaConfig(**MODEL), seed=0, max_seq_len=seq)
    if dims.tp > 1:
        apply_tp(model, PARTS, mesh["tp"], layout["sequence_parallel"], layout["loss_parallel"])
    if dims.cp > 1:
        apply_cp(model, PARTS, mesh["cp"], layout["cp_impl"])
    sync = DDPSync(replica_group(mesh))
    wrapped = sync.wrap_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return dims, dims.coordinates(dist.get_rank()), wrapped, sync, optimizer


def _train_step(dims, coords, wrapped, sync, optimizer, batch: int, seq: int, step: int) -> None:
    from orchestrate.parallel.context import shard_sequence
    from orchestrate.parallel.sync.base import sync_step
    from orchestrate.parallel.tensor import loss_context, tp_loss

    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, MODEL["vocab_size"], (batch, seq + 1), generator=gen)
    rows = slice(coords["dp"] * batch // dims.dp, (coords["dp"] + 1) * batch // dims.dp)
    tokens, targets, positions = shard_sequence(tokens[rows, :-1], tokens[rows, 1:], coords["cp"], dims.cp)

    def backward() -> None:
        logits = wrapped(tokens, positions if dims.cp > 1 else None)
        with loss_context(logits):
            tp_loss(logits, targets).backward()

    sync_step(sync, optimizer, step, backward)


def _warm_up(setup, batch: int, seq: int) -> None:
    """Two steps: the first allocates optimizer state, the second lets torch DDP rebuild its buckets."""
    for step in range(2):
        _train_step(*setup, batch=batch, seq=seq, step=step)


def _measured_step(setup, batch: int, seq: int, step: int) -> dict:
    """One step: worst peak RSS and growth over idle RSS across ranks (MiB), wall seconds, bytes this rank sent."""
    _reset_peak_rss()
    idle = _status_mib("VmRSS")
    dist.barrier()
    started = time.perf_counter()
    with CollectiveBytes() as counted:
        _train_step(*setup, batch=batch, seq=seq, step=step)
    dist.barrier()
    seconds = time.perf_counter() - started
    peak = _status_mib("VmHWM")
    worst = torch.tensor([peak, peak - idle])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"seq": seq, "peak_mib": worst[0].item(), "growth_mib": worst[1].item(), "seconds": seconds,
            "bytes": counted.bytes, "calls": counted.calls}


def context_sweep(rank: int, world: int, impls: list[str], budget_mib: float, start_seq: int,
                  max_seq: int) -> dict:
    """Per impl: the measured step at the longest doubling of ``start_seq`` within the budget (or None)."""
    results = {}
    for impl in impls:
        setup = _build(dict(cp=world, cp_impl=impl), max_seq)
        _warm_up(setup, batch=1, seq=2 * world * 8)
        best, seq = None, start_seq
        while seq <= max_seq:
            measured = _measured_step(setup, batch=1, seq=seq, step=seq)
            if measured["growth_mib"] > budget_mib:
                break
            best, seq = measured, seq * 2
        results[impl] = best
        del setup
    return results


def tensor_bytes(rank: int, world: int, layouts: dict, batch: int, seq: int) -> dict:
    results = {}
    for name, layout in layouts.items():
        setup = _build(layout, seq)
        _warm_up(setup, batch=batch, seq=seq)
        results[name] = _measured_step(setup, batch=batch, seq=seq, step=2)
    return results


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=float, default=128.0,
                        help="per-worker budget: peak RSS of a step minus the RSS before it (MiB)")
    parser.add_argument("--start-seq", type=int, default=512)
    parser.add_argument("--max-seq", type=int, default=16384)
    parser.add_argument("--tp-seq", type=int, default=512)
    parser.add_argument("--tp-batch", type=int, default=4)
    args = parser.parse_args()
    # A fixed mmap threshold stops glibc from keeping freed activation buffers, so RSS tracks live memory.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

    print(f"model {MODEL}, batch 1, budget: peak RSS at most {args.budget_mib:.0f} MiB over idle, per worker\n")
    print("| cp | attention | longest seq in budget | worst peak over idle (MiB) | worst peak RSS (MiB) | tokens/s "
          "| MiB sent/step/rank |")
    print("|---|---|---|---|---|---|---|")
    for cp in CP_DEGREES:
        impls = ["ring", "ulysses"] if cp > 1 else ["ring"]
        sweep = run_ranks(cp, context_sweep, impls, args.budget_mib, args.start_seq, args.max_seq,
                          timeout_s=600)[0]
        for impl, best in sweep.items():
            label = impl if cp > 1 else "local (no cp)"
            if best is None:
                print(f"| {cp} | {label} | < {args.start_seq} | - | - | - | - |")
                continue
            capped = " (max tried)" if best["seq"] == args.max_seq else ""
            print(f"| {cp} | {label} | {best['seq']}{capped} | {best['growth_mib']:.0f} | {best['peak_mib']:.0f} | "
                  f"{best['seq'] / best['seconds']:.0f} | {_mib(best['bytes'])} |")

    tokens = args.tp_batch * args.tp_seq
    print(f"\n2 workers, global batch {args.tp_batch} x {args.tp_seq} tokens\n")
    print("| layout | MiB sent/step/rank | collectives/step/rank | tokens/s | worst peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    measured = run_ranks(2, tensor_bytes, TP_LAYOUTS, args.tp_batch, args.tp_seq, timeout_s=600)[0]
    for name, row in measured.items():
        print(f"| {name} | {_mib(row['bytes'])} | {row['calls']} | {tokens / row['seconds']:.0f} | "
              f"{row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
