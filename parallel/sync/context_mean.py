"""A low-communication strategy with context parallelism: gradients are averaged over the cp group every step,
then the strategy acts across the data-parallel ranks only.

Context-parallel ranks of one replica hold the same parameters and other tokens of the same sequences. Under DDP
they are simply part of the replica group (dp x cp). A strategy that lets replicas train apart (DiLoCo, NoLoCo,
1-bit/0-1 Adam's compressed steps) must still keep them together: before its own hooks, every step, their
gradients are all-reduced in full precision and averaged over cp. Each cp rank's loss is the mean over its
T/cp tokens, so the average is the gradient of the mean over the whole sequences, the normalisation DDP uses.
The cp ranks then hold bitwise-identical gradients, take identical steps, and each runs the strategy with the cp
ranks of the same index in the other replicas (its ``replica_group`` is the dp group).

Bytes: ``counter`` is the strategy's (across dp, what low-communication sync saves); the cp all-reduce is counted
apart in ``context_counter`` (intra-replica traffic, like tp's).
"""
from __future__ import annotations

from torch import nn

from parallel.comm import CommCounter
from parallel.sync.base import SyncStrategy
from parallel.sync.ddp import DDPSync


class ContextMeanSync:
    """Wraps ``strategy`` (built on the dp group); every attribute not defined here is the strategy's."""

    def __init__(self, strategy: SyncStrategy, context_group):
        self.strategy = strategy
        self.context_counter = CommCounter()
        self._context_mean = DDPSync(context_group, self.context_counter, use_torch_ddp=False)

    def __getattr__(self, name: str):
        if name == "strategy":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self._context_mean.wrap_model(model)
        return self.strategy.wrap_model(model)

    def before_optimizer(self, step: int) -> None:
        self._context_mean.before_optimizer(step)
        self.strategy.before_optimizer(step)
