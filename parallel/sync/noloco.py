"""NoLoCo (arXiv 2506.10911): DiLoCo without a global all-reduce.

Every replica keeps its own slow weights phi_i and outer velocity delta_i. Every H inner steps the replicas are
split into groups of n (a permutation seeded by the outer step, identical on all ranks) and each replica
exchanges with its group only, point to point:

    delta_i <- alpha * delta_i - beta * mean_G(Delta_j) - gamma * (phi_i - mean_G(phi_j)),   Delta_j = phi_j - theta_j
    phi_i   <- phi_i + delta_i ;  theta_i <- phi_i

With gamma == beta (the reference code and the default) this is delta_i <- alpha*delta_i + beta*(mean_G theta_j
- phi_i), so only the live weights travel (N values each way for n = 2). Otherwise phi and Delta travel; phi does
not change during the inner phase, so its exchange for the next outer step is posted right after this one and
overlaps the H inner steps.

alpha = ``momentum``, beta = ``outer_lr``, gamma = ``consensus_lr``; the config must lie in the stability window
(docs/lowcomm.md section 3.1): beta > alpha and sqrt(c)*alpha < gamma < sqrt(c*(2 + alpha^2)) with
c = n / (2(n - 1)).
Replicas never reach exact consensus: checkpoints are per worker; ``average_replicas()`` averages them for export.
Trainer contract as DiLoCo (diloco.py): no gradient averaging, default inner optimizer, step counts from 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from orchestrate.parallel import comm
from orchestrate.parallel.sync.base import SyncStrategy
from orchestrate.parallel.sync.tensors import FlatParams, copy_named_state, trainable_parameters


@dataclass(frozen=True)
class NoLoCoConfig:
    sync_every: int = 50  # H
    group_size: int = 2  # n, replicas per gossip group
    momentum: float = 0.5  # alpha
    outer_lr: float = 0.7  # beta, weight of the group's mean pseudo-gradient
    consensus_lr: float = 0.7  # gamma, pull towards the group's mean slow weights

    def __post_init__(self):
        if self.sync_every < 1:
            raise ValueError(f"sync_every={self.sync_every}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: must be >= 2")
        check_stability(self.group_size, self.momentum, self.outer_lr, self.consensus_lr)


def check_stability(group_size: int, alpha: float, beta: float, gamma: float) -> None:
    """Raise unless (alpha, beta, gamma) lies in the paper's stability window (its appendix A; docs/lowcomm.md
    section 3.1)."""
    if not beta > alpha:
        raise ValueError(f"outer_lr={beta} must exceed momentum={alpha} (the expected weights diverge otherwise)")
    c = group_size / (2 * (group_size - 1))
    low, high = math.sqrt(c) * alpha, math.sqrt(c * (2 + alpha ** 2))
    if not low < gamma < high:
        raise ValueError(f"consensus_lr={gamma}: must lie in ({low:.3f}, {high:.3f}) for group_size={group_size} "
                         f"and momentum={alpha}, or the replica spread grows without bound")


def noloco_groups(outer_step: int, world: int, group_size: int) -> list[list[int]]:
    """Partition of replica ranks into world/n groups for outer step ``outer_step`` (0-based)."""
    if world % group_size:
        raise ValueError(f"group_size={group_size}: must divide the {world} replicas")
    permutation = torch.randperm(world, generator=torch.Generator().manual_seed(outer_step + 1))
    count = world // group_size
    return [sorted(permutation[j::count].tolist()) for j in range(count)]


def update_velocity(velocity: torch.Tensor, slow: torch.Tensor, mean_delta: torch.Tensor,
                    mean_slow: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """delta <- alpha*delta - beta*mean(Delta) - gamma*(phi - mean(phi)), in place."""
    return velocity.mul_(alpha).sub_(mean_delta, alpha=beta).sub_(slow - mean_slow, alpha=gamma)


def update_velocity_same_rates(velocity: torch.Tensor, slow: torch.Tensor, mean_fast: torch.Tensor,
                               alpha: float, beta: float) -> torch.Tensor:
    """The beta == gamma form: delta <- alpha*delta + beta*(mean(theta) - phi), in place."""
    return velocity.mul_(alpha).add_(mean_fast - slow, alpha=beta)


class GroupMean:
    """Mean of a flat tensor over a few members of the replica group, exchanged point to point.

    Sends and receives are posted at construction and complete in ``result()``; ``mine`` must not change until
    then. The sum runs over members in rank order, so every member computes bitwise the same mean.
    """

    def __init__(self, mine: torch.Tensor, members: list[int], group, counter: comm.CommCounter):
        self.mine, self.members = mine, members
        self.me = dist.get_rank(group)
        self._received = {peer: torch.empty_like(mine) for peer in members if peer != self.me}
        self._works = [comm.isend(mine, peer, group, counter) for peer in self._received]
        self._works += [comm.irecv(buffer, peer, group) for peer, buffer in self._received.items()]
        self._value: Optional[torch.Tensor] = None

    def result(self) -> torch.Tensor:
        if self._value is None:
            for work in self._works:
                work.wait()
            total = torch.zeros_like(self.mine)
            for member in self.members:
                total += self.mine if member == self.me else self._received[member]
            self._value = total / len(self.members)
        return self._value


class NoLoCoSync(SyncStrategy):
    replicas_diverge = True
    name = "noloco"
    state_prefix = "noloco"

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None,
                 config: Optional[NoLoCoConfig] = None):
        super().__init__(replica_group, counter)
        self.config = config or NoLoCoConfig()
        self._slow_exchange: Optional[GroupMean] = None  # mean_G(phi) for the next outer step, in flight

    @property
    def exchanges_fast_weights_only(self) -> bool:
        return self.config.outer_lr == self.config.consensus_lr

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        self.model = model
        self.world = comm.group_size(self.replica_group)
        noloco_groups(0, self.world, self.config.group_size)  # validates the divisibility now
        self.flat = FlatParams(trainable_parameters(model))
        self.slow = self.flat.flatten()
        self.velocity = torch.zeros_like(self.slow)
        return model

    def my_group(self, outer_step: int) -> list[int]:
        me = dist.get_rank(self.replica_group)
        groups = noloco_groups(outer_step, self.world, self.config.group_size)
        return next(group for group in groups if me in group)

    @torch.no_grad()
    def after_optimizer(self, step: int) -> None:
        if (step + 1) % self.config.sync_every:
            return
        outer_step = (step + 1) // self.config.sync_every - 1
        cfg = self.config
        members = self.my_group(outer_step)
        if self.exchanges_fast_weights_only:
            mean_fast = GroupMean(self.flat.flatten(), members, self.replica_group, self.counter).result()
            update_velocity_same_rates(self.velocity, self.slow, mean_fast, cfg.momentum, cfg.outer_lr)
        else:
            slow_exchange = self._slow_exchange or self._exchange_slow(members)
            delta = self.slow - self.flat.flatten()
            mean_delta = GroupMean(delta, members, self.replica_group, self.counter).result()
            update_velocity(self.velocity, self.slow, mean_delta, slow_exchange.result(),
                            cfg.momentum, cfg.outer_lr, cfg.consensus_lr)
        self.slow += self.velocity
        self.flat.write(self.slow)
        if not self.exchanges_fast_weights_only:
            self._slow_exchange = self._exchange_slow(self.my_group(outer_step + 1))
        self.counter.end_event()

    def _exchange_slow(self, members: list[int]) -> GroupMean:
        return GroupMean(self.slow, members, self.replica_group, self.counter)

    @torch.no_grad()
    def average_replicas(self) -> None:
        """Export: replace every replica's slow and live weights by their mean over the whole replica group."""
        self.wait_for_exchanges()
        comm.all_reduce(self.slow, self.replica_group, self.counter)
        self.slow.div_(self.world)
        self.flat.write(self.slow)
        self.counter.end_event()

    def outer_parameters(self) -> dict[str, torch.Tensor]:
        """name -> this replica's slow weights phi_i, shaped like the local shard."""
        return self.flat.views(self.slow)

    def wait_for_exchanges(self) -> None:
        """Complete the in-flight exchange of phi (the next outer step re-posts it). Call before the sync object
        is dropped while the process group lives on: an abandoned exchange leaves peers' messages unmatched."""
        if self._slow_exchange is not None:
            self._slow_exchange.result()
            self._slow_exchange = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.state_prefix}.slow.{n}": v for n, v in self.flat.views(self.slow).items()}
        state.update({f"{self.state_prefix}.velocity.{n}": v for n, v in self.flat.views(self.velocity).items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait_for_exchanges()
        if not copy_named_state(self.state_dict(), state):
            self.slow.copy_(self.flat.flatten())
            self.velocity.zero_()
