"""Instrumented collectives: every byte a worker sends across a parallel dimension is counted where it is sent.

Bytes are what one rank puts on the wire for the collective as implemented by ring algorithms (gloo and NCCL
both use rings for large messages), computed from the real tensor handed to the collective:

    all_reduce      2 (W-1)/W * nbytes      (reduce-scatter + all-gather)
    reduce_scatter    (W-1)/W * nbytes      (nbytes of the full input)
    all_gather        (W-1)   * nbytes      (nbytes of this rank's chunk)
    broadcast / send          nbytes        (counted by the sender only)

A group of one rank sends nothing.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_reduce_bytes(nbytes: int, world: int) -> int:
    return 0 if world <= 1 else (2 * (world - 1) * nbytes) // world


def reduce_scatter_bytes(nbytes: int, world: int) -> int:
    return 0 if world <= 1 else ((world - 1) * nbytes) // world


def all_gather_bytes(chunk_nbytes: int, world: int) -> int:
    return 0 if world <= 1 else (world - 1) * chunk_nbytes


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class CommCounter:
    """Cumulative bytes sent by this rank, plus the largest single sync event (``peak``).

    A sync event groups the collectives of one synchronisation (all buckets of one DDP step, one DiLoCo outer
    step) so ``peak`` is the burst a slow link must carry at once. Thread-safe: DDP comm hooks run on autograd
    threads.
    """

    total: int = 0
    peak: int = 0
    _event: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.total += nbytes
            self._event += nbytes

    def end_event(self) -> None:
        with self._lock:
            self.peak = max(self.peak, self._event)
            self._event = 0

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "peak": self.peak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.peak = int(state["total"]), int(state["peak"])


def all_reduce(tensor: torch.Tensor, group, counter: CommCounter, op=dist.ReduceOp.SUM, async_op: bool = False):
    """Gloo corrupts non-contiguous buffers silently, so callers pass contiguous ones."""
    if not tensor.is_contiguous():
        raise ValueError("all_reduce needs a contiguous tensor (gloo corrupts non-contiguous buffers)")
    counter.add(all_reduce_bytes(tensor_nbytes(tensor), group_size(group)))
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_gather_into(output: torch.Tensor, chunk: torch.Tensor, group, counter: CommCounter, async_op: bool = False):
    counter.add(all_gather_bytes(tensor_nbytes(chunk), group_size(group)))
    return dist.all_gather_single(output, chunk.contiguous(), group=group, async_op=async_op)


def reduce_scatter_into(output: torch.Tensor, full: torch.Tensor, group, counter: CommCounter,
                        op=dist.ReduceOp.SUM, async_op: bool = False):
    counter.add(reduce_scatter_bytes(tensor_nbytes(full), group_size(group)))
    return dist.reduce_scatter_single(output=output, input=full.contiguous(), op=op, group=group, async_op=async_op)


def all_to_all_bytes(nbytes: int, world: int) -> int:
    return 0 if world <= 1 else ((world - 1) * nbytes) // world


def all_to_all(output: torch.Tensor, full: torch.Tensor, group, counter: CommCounter, async_op: bool = False):
    """Equal-split all-to-all: chunk k of ``full`` goes to rank k; this rank keeps its own chunk (not sent)."""
    if not (output.is_contiguous() and full.is_contiguous()):
        raise ValueError("all_to_all needs contiguous tensors (gloo corrupts non-contiguous buffers)")
    counter.add(all_to_all_bytes(tensor_nbytes(full), group_size(group)))
    return dist.all_to_all_single(output, full, group=group, async_op=async_op)


def isend(tensor: torch.Tensor, group_dst: int, group, counter: CommCounter):
    """Asynchronous point-to-point send to the rank ``group_dst`` of ``group``; counted by the sender."""
    if not tensor.is_contiguous():
        raise ValueError("isend needs a contiguous tensor (gloo corrupts non-contiguous buffers)")
    counter.add(tensor_nbytes(tensor))
    return dist.isend(tensor, group=group, group_dst=group_dst)


def irecv(tensor: torch.Tensor, group_src: int, group):
    """Asynchronous point-to-point receive; the bytes were counted by the sender."""
    if not tensor.is_contiguous():
        raise ValueError("irecv needs a contiguous tensor (gloo corrupts non-contiguous buffers)")
    return dist.irecv(tensor, group=group, group_src=group_src)
