"""Sharded data parallelism with torch's FSDP2 (``fully_shard``): parameters, gradients and optimizer state are
sharded over the replica group; every all-gather and reduce-scatter FSDP issues is counted.

Selected with ``sync.name=ddp parallel.dp_shard=true``: the same gradient average as DDP, with a sharded memory
footprint. With a shard degree below dp (``parallel.dp_shard=S``) the mesh is 2-D ("dp_replicate", "dp_shard") and
FSDP2 runs as HSDP: sharded within a replica, gradients all-reduced across replicas. FSDP2 exposes
``set_custom_all_gather`` / ``set_custom_reduce_scatter`` / ``set_all_reduce_hook`` for exactly this kind of
instrumentation; the counting wrappers delegate to torch's default implementations.

Under a low-communication strategy (``within_replica.sharded_replicas``) this class shards one replica over its
own ranks (a 1-D mesh) and the strategy syncs the shards across replicas.
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from orchestrate.parallel import comm
from orchestrate.parallel.sync.base import SyncStrategy


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
        """``replica_mesh``: 1-D (shard over it) or 2-D ("dp_replicate", "dp_shard") for HSDP."""
        group = replica_mesh.get_group() if replica_mesh.ndim == 1 else replica_mesh["dp_shard"].get_group()
        super().__init__(group, counter)
        self.replica_mesh = replica_mesh

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        """Each repeated block is its own FSDP unit (gathered just before use), then the root."""
        units = [*(blocks or {}).values(), model]
        for unit in units:
            fully_shard(unit, mesh=self.replica_mesh)
            unit.set_custom_all_gather(CountingAllGather(self.counter))
            unit.set_custom_reduce_scatter(CountingReduceScatter(self.counter))
            if self.replica_mesh.ndim == 2:
                unit.set_all_reduce_hook(self._count_replica_all_reduce)
        self.model = model
        return model

    def _count_replica_all_reduce(self, reduced) -> None:
        """HSDP: called with each all-reduce's output (this rank's gradient shard, averaged across replicas)."""
        replicas = self.replica_mesh["dp_replicate"].size()
        self.counter.add(comm.all_reduce_bytes(comm.tensor_nbytes(reduced), replicas))

    def before_optimizer(self, step: int) -> None:
        self.counter.end_event()
