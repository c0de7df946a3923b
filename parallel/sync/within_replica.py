"""A low-communication strategy over replicas that are several ranks each: what the ranks of one replica do
together every step, then the strategy across replicas.

Two kinds of multi-rank replica:

- **Context parallelism** (``context_mean``): the cp ranks of a replica hold the same parameters and other tokens
  of the same sequences. Under DDP they are simply part of the replica group (dp x cp). A strategy that lets
  replicas train apart (DiLoCo, NoLoCo, 1-bit/0-1 Adam's compressed steps) must still keep them together: before
  its own hooks, every step, their gradients are all-reduced in full precision and averaged over cp. Each cp rank's
  loss is the mean over its T/cp tokens, so the average is the gradient of the mean over the whole sequences, the
  normalisation DDP uses. The cp ranks then hold bitwise-identical gradients, take identical steps, and each runs
  the strategy with the cp ranks of the same index in the other replicas (its ``replica_group`` is the dp group).
- **Sharded replicas** (``sharded_replicas``, ``parallel.dp_shard=S``): a replica is S ranks on fast links that
  shard its parameters, gradients and optimizer state with FSDP2; FSDP's reduce-scatter averages the gradients
  over the replica's batch during the backward pass. The strategy sees this rank's shard of every parameter (the
  local tensors of FSDP's DTensor parameters) and syncs it with the same shard of every other replica (its
  ``replica_group`` is the "dp_replicate" group): each shard of an outer step is the unsharded replica's outer step
  on that slice, so the run follows the unsharded one.

Bytes: ``counter`` is the strategy's (across replicas, what low-communication sync saves); the traffic within a
replica is counted apart in ``within_counter`` (like tp's).
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from orchestrate.parallel.comm import CommCounter
from orchestrate.parallel.sync.base import SyncStrategy
from orchestrate.parallel.sync.ddp import DDPSync
from orchestrate.parallel.sync.fsdp import FSDPSync


class WithinReplicaSync:
    """Wraps ``strategy`` (built on the group across replicas); every attribute not defined here is the
    strategy's. ``within`` is the sync among the ranks of one replica, run first."""

    def __init__(self, strategy: SyncStrategy, within: SyncStrategy):
        self.strategy, self.within = strategy, within
        self.within_counter = within.counter

    def __getattr__(self, name: str):
        if name == "strategy":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        """The replica's own wrapping first (FSDP2 replaces the parameters with their shards), then the strategy,
        which binds to the parameters it finds."""
        return self.strategy.wrap_model(self.within.wrap_model(model, blocks), blocks)

    def before_optimizer(self, step: int) -> None:
        self.within.before_optimizer(step)
        self.strategy.before_optimizer(step)


def context_mean(strategy: SyncStrategy, context_group) -> WithinReplicaSync:
    return WithinReplicaSync(strategy, DDPSync(context_group, CommCounter(), use_torch_ddp=False))


def sharded_replicas(strategy: SyncStrategy, shard_mesh: DeviceMesh) -> WithinReplicaSync:
    return WithinReplicaSync(strategy, FSDPSync(shard_mesh, CommCounter()))
