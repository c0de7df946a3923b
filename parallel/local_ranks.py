"""Run a function on N real gloo ranks (separate processes) on this machine and collect what each rank returns
(tests and benchmarks).

Every rank uses one thread, a finite timeout, and leaves through os._exit after destroy_process_group, which
avoids gloo's flaky SIGABRT at interpreter exit ("terminate called without an active exception" after
destroy_process_group returned, in 7 of 20 DDP runs without it).
"""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, results, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)


def run_ranks(world: int, fn: Callable, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """fn(rank, world, *args) on each rank; returns the per-rank results (must be picklable)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results, timeout_s))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout_s * 3)
            if proc.is_alive():
                proc.kill()
        collected = dict(results)
    errors = [f"rank {r}:\n{v[1]}" for r, v in sorted(collected.items()) if v[0] == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    missing = [r for r in range(world) if r not in collected]
    if missing:
        raise AssertionError(f"ranks {missing} returned nothing (crashed or timed out)")
    return [collected[r][1] for r in range(world)]
