"""DDP: average gradients over the replica group every step, every byte counted.

Pure data parallelism uses torch's DistributedDataParallel (bucketed all-reduce overlapped with backward) with a
comm hook that counts the bytes of each bucket. When parameters are DTensors (tensor parallelism) or the module
is a pipeline stage, torch DDP does not apply, so gradients are all-reduced in flat buckets after backward.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from orchestrate.parallel import comm
from orchestrate.parallel.sync.base import SyncStrategy

BUCKET_BYTES = 25 * 1024 * 1024


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _counting_allreduce_hook(strategy, bucket):
    # No annotations: DDP checks the hook signature and rejects the string annotations of postponed evaluation.
    buffer = bucket.buffer()
    world = comm.group_size(strategy.replica_group)
    buffer.div_(world)
    work = comm.all_reduce(buffer, strategy.replica_group, strategy.counter, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPSync(SyncStrategy):
    name = "ddp"
    replicas_identical = True
    writes_state_between_steps = False

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None, use_torch_ddp: bool = True):
        super().__init__(replica_group, counter)
        self.use_torch_ddp = use_torch_ddp
        self.torch_ddp = False

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        self.model = model
        world = comm.group_size(self.replica_group)
        has_dtensor = any(isinstance(p, DTensor) for p in model.parameters())
        if world > 1 and self.use_torch_ddp and not has_dtensor:
            self.torch_ddp = True
            wrapped = DistributedDataParallel(model, process_group=self.replica_group, forward_sync_buffers=False)
            wrapped.register_comm_hook(self, _counting_allreduce_hook)
            return wrapped
        return model

    def before_optimizer(self, step: int) -> None:
        if not self.torch_ddp and comm.group_size(self.replica_group) > 1:
            self._all_reduce_gradients()
        self.counter.end_event()

    @torch.no_grad()
    def _all_reduce_gradients(self) -> None:
        world = comm.group_size(self.replica_group)
        grads = [_local(p.grad) for p in self.model.parameters() if p.grad is not None]
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            comm.all_reduce(flat, self.replica_group, self.counter)
            flat.div_(world)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors of at most ``bucket_bytes`` (a single larger tensor is its own)."""
    buckets, current, size = [], [], 0
    for tensor in tensors:
        nbytes = comm.tensor_nbytes(tensor)
        if current and (size + nbytes > bucket_bytes or tensor.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets
