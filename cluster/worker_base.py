"""The distributed half of every worker actor: rendezvous, process group, liveness. Knows nothing of models."""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from orchestrate.cluster.network import collective_interface_environment, listening_socket


def pick_backend() -> tuple[str, str]:
    """(backend, device type): NCCL on assigned GPUs, gloo on CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "nccl", "cuda"
    return "gloo", "cpu"


def _socket_fds() -> dict[int, str]:
    """fd -> "socket:[inode]" of this process's open sockets."""
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            found[int(entry)] = target
    return found


def _stop_sending(fd: int, name: str) -> None:
    """SHUT_WR on the TCP connection ``fd`` if it is still the socket ``name`` (an fd number may be reused)."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != name:
            return
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                sock.shutdown(socket.SHUT_WR)
    except OSError:  # closed or not connected any more
        pass


class DistributedWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.backend, self.device_type = pick_backend()
        self._collective_sockets: dict[int, str] = {}  # fd -> "socket:[inode]" opened by process groups
        self._store_listener: Optional[socket.socket] = None
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks to the actor's log, as the controller's

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address (as Ray reports it) and the port rank 0's rendezvous store listens on, bound to
        that address only."""
        import ray

        if self._store_listener is not None:  # one from a rendezvous that never happened
            self._store_listener.close()
        self._store_listener = listening_socket(ray.util.get_node_ip_address())
        return self._store_listener.getsockname()[:2]

    def _rendezvous_store(self, master_addr: str, master_port: int, timeout: timedelta) -> dist.TCPStore:
        if self.rank != 0:
            return dist.TCPStore(master_addr, master_port, self.world_size, False, timeout)
        listener, self._store_listener = self._store_listener, None
        return dist.TCPStore(master_addr, master_port, self.world_size, True, timeout, wait_for_workers=False,
                             master_listen_fd=listener.detach())  # the store owns (and closes) the socket

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float) -> dict:
        """Join the gang's process group; a rank that survived a failure leaves its broken one first.
        The collectives use the interface of this node's address (see ``cluster.network``)."""
        import ray

        self.leave_process_group()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          **collective_interface_environment(ray.util.get_node_ip_address()))
        if self.device_type == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        timeout = timedelta(seconds=timeout_s)
        with self.collective_connections():
            store = self._rendezvous_store(master_addr, master_port, timeout)
            dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "address": ray.util.get_node_ip_address(), "backend": self.backend}

    @contextmanager
    def collective_connections(self):
        """Remember the connections that process groups open inside (gloo connects every pair when a group is
        made): ``leave_process_group`` closes them."""
        before = _socket_fds()
        try:
            yield
        finally:
            self._collective_sockets.update({fd: name for fd, name in _socket_fds().items() if before.get(fd) != name})

    def leave_process_group(self) -> None:
        """Leave a process group that a failure elsewhere broke, so that a peer blocked in a collective with this
        rank fails now instead of at the collective timeout. NCCL aborts its communicators. Gloo has no abort: its
        connections stay open while any object still holds the group (a destroy does not close them), so this
        rank half-closes (SHUT_WR) the TCP connections its groups opened; a peer waiting on one fails at once
        ("connection closed by peer"), and this process, which only stops sending, stays up."""
        if self.backend == "nccl" and dist.is_initialized():
            dist.distributed_c10d._abort_process_group()
        for fd, name in self._collective_sockets.items():
            _stop_sending(fd, name)
        self._collective_sockets = {}
        if dist.is_initialized():
            dist.destroy_process_group()

    def ping(self) -> int:
        return os.getpid()

    def stacks(self) -> str:
        """Every thread's stack as faulthandler prints it (the C-level dump also shows a thread blocked in native
        code, e.g. a collective), headed by this rank and process."""
        with tempfile.TemporaryFile("w+") as out:
            faulthandler.dump_traceback(out, all_threads=True)
            out.seek(0)
            return f"rank {self.rank}, pid {os.getpid()}\n{out.read()}"

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
