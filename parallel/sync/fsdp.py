"""Sharded data parallelism with torch's FSDP2 (``fully_shard``): parameters, gradients and optimizer state are
sharded over the replica group; every all-gather and reduce-scatter FSDP issues is counted.

Selected with ``sync.name=ddp parallel.dp_shard=true``: the same gradient average as DDP, with a sharded memory
footprint. FSDP2 exposes ``set_custom_all_gather`` / ``set_custom_reduce_scatter`` for exactly this kind of
instrumentation; the counting wrappers delegate to torch's default implementations.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from parallel import comm
from parallel.sync.base import SyncStrategy


class CountingAllGather(DefaultAllGather):
    def __init__(self, counter: comm.CommCounter):
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.counter.add(comm.all_gather_bytes(comm.tensor_nbytes(input_tensor), comm.group_size(group)))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    def __init__(self, counter: comm.CommCounter):
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.counter.add(comm.reduce_scatter_bytes(comm.tensor_nbytes(input_tensor), comm.group_size(group)))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


class FSDPSync(SyncStrategy):
    name = "fsdp"

    def __init__(self, replica_mesh: DeviceMesh, counter: Optional[comm.CommCounter] = None):
        super().__init__(replica_mesh.get_group(), counter)
        self.replica_mesh = replica_mesh

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Each transformer block is its own FSDP unit (gathered just before use), then the root."""
        units = [*getattr(model, "layers", {}).values(), model]
        for unit in units:
            fully_shard(unit, mesh=self.replica_mesh)
            unit.set_custom_all_gather(CountingAllGather(self.counter))
            unit.set_custom_reduce_scatter(CountingReduceScatter(self.counter))
        self.model = model
        return model

    def before_optimizer(self, step: int) -> None:
        self.counter.end_event()
