"""Copying training state on a thread that is not the training thread, without slowing the training thread.

Why not ``Tensor.copy_``: a CPU ``copy_`` of more than a few thousand elements runs as an OpenMP parallel region,
and the first parallel region a thread runs gives that thread its own OpenMP team (as many threads as torch
uses), which lives as long as the thread. With two teams in the process GNU OpenMP counts more of its threads
than cores and, for every team, cuts the time a thread spins at a barrier before it sleeps from 300,000
iterations to 100: the training thread's workers then fall asleep at nearly every barrier of every kernel and
have to be woken (a one-off check with the 1 GiB model of benchmarks/checkpoint.py, not a committed
benchmark: after one 16 MB ``copy_`` on a pool thread, 8 forward/backward passes on the main thread made
~17,000 voluntary context switches instead of ~5 and took 1.5-1.6 s each instead of 1.2). numpy's ``copyto`` copies contiguous memory with one ``memcpy`` that
releases the GIL and starts no threads (and a background copy should take one core, not every core the
training uses). The same holds for any parallel torch kernel: code that runs on a worker's other threads (the
control methods, the copy thread) keeps torch's parallel kernels off them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _host_bytes(tensor: torch.Tensor):
    """A uint8 numpy view of a contiguous CPU tensor's memory, or None when it has no such view."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
        return None
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


# at::internal::GRAIN_SIZE: a CPU kernel over fewer elements runs inline on the calling thread, no OpenMP team
SMALL_NUMEL = 32768


def copy_tensors(outs: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> int:
    """``copy_tensor`` of each pair, the small contiguous host tensors all in one ``torch._foreach_copy_`` call
    (one by one, the Python around each copy cost ~20 microseconds, far more than copying a step count: a small
    model's snapshot copies dozens of them every step). Returns the bytes copied."""
    small_outs, small_sources = [], []
    for out, source in zip(outs, sources):
        if out.numel() < SMALL_NUMEL and out.shape == source.shape and out.dtype == source.dtype and \
                out.device.type == "cpu" and source.device.type == "cpu":
            small_outs.append(out)
            small_sources.append(source.detach())
        else:
            copy_tensor(out, source)
    if small_outs:
        with torch.no_grad():
            torch._foreach_copy_(small_outs, small_sources)
    return sum(out.nbytes for out in outs)


def copy_tensor(out: torch.Tensor, source: torch.Tensor) -> None:
    """``out.copy_(source)`` for tensors of the same shape and dtype, starting no OpenMP team when both are
    contiguous host tensors (see the module note); anything else (another device, a strided view) by ``copy_``."""
    if out.shape == source.shape and out.dtype == source.dtype:
        out_bytes, source_bytes = _host_bytes(out), _host_bytes(source)
        if out_bytes is not None and source_bytes is not None:
            np.copyto(out_bytes, source_bytes)
            return
    with torch.no_grad():
        out.copy_(source.detach())
