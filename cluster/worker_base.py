"""The distributed half of every worker actor: rendezvous, process group, liveness. Knows nothing of models."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def pick_backend() -> tuple[str, str]:
    """(backend, device type): NCCL on assigned GPUs, gloo on CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "nccl", "cuda"
    return "gloo", "cpu"


class DistributedWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.backend, self.device_type = pick_backend()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port for rank 0 to listen on."""
        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((address, 0))
            return address, sock.getsockname()[1]

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float) -> dict:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        if self.device_type == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "backend": self.backend}

    def ping(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
