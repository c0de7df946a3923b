"""0/1 Adam (arXiv 2202.06009, as DeepSpeed's zoadam.py implements it).

Steps t count from 1. Two stages:

Variance stage (t <= ``var_freeze_step``, about the end of the LR warm-up): v is updated only on exponentially
spaced steps (``VarianceSchedule``: every step for kappa updates, then every 2nd step for kappa updates, every 4th,
...). Those steps average the gradients in full precision and update m and v; every other step averages them with
the 1-bit all-reduce (1-bit Adam's ``OneBitAllReduce``, error feedback on worker and server) and updates m only.
Parameters move every step with p <- p - lr * (m / (sqrt(v) + eps) + wd * p), identically on all replicas.

Compression stage (t > ``var_freeze_step``; v frozen, the error buffers restart at zero because they now carry
another quantity): every replica takes local steps with its own gradients. Every ``local_interval(t)`` steps
(1 at first, doubling every ``local_step_scaler`` steps, capped at ``local_step_clipper``) it takes the
accumulated update u back out of the parameters, rescales it by (sqrt(v) + eps), 1-bit-all-reduces it, sets
m = -mean(u) / sum(lr) over the local steps, and applies the reduced update.

Not copied from DeepSpeed: its first step() only allocates buffers; the freeze starts right after step
``var_freeze_step`` (DeepSpeed freezes one step later). DeepSpeed accumulates u in a buffer and subtracts it back
out; here u = p - p_sync with p_sync the parameters of the last sync (the same quantity without the rounding
drift), so replicas are bitwise identical after every sync. All tensors travel as one flat buffer. No bias
correction (neither has DeepSpeed's).

Trainer contract: as 1-bit Adam (onebit_adam.py): ``build_optimizer`` replaces the default optimizer, call
``before_optimizer`` (full-precision gradient average on variance steps) and ``after_optimizer`` every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from orchestrate.parallel import comm
from orchestrate.parallel.sync.tensors import local_tensor
from orchestrate.parallel.sync.onebit_adam import OneBitAdam, OneBitAdamSync


@dataclass(frozen=True)
class ZeroOneAdamConfig:
    var_freeze_step: int = 1000  # last step whose variance is updated; about the end of the LR warm-up
    var_update_scaler: int = 16  # kappa: the variance interval doubles after every kappa variance updates
    local_step_scaler: int = 1000  # after the freeze, the local-step interval doubles every this many steps
    local_step_clipper: int = 16  # the largest local-step interval (H in the paper)

    def __post_init__(self):
        for key in ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")


@dataclass(frozen=True)
class VarianceSchedule:
    """Which steps update v (and average gradients in full precision), and how often replicas sync later."""

    config: ZeroOneAdamConfig

    def updates_variance(self, t: int) -> bool:
        """Block j holds kappa updates spaced 2**j apart, at multiples of 2**j after block j-1 ended."""
        if t > self.config.var_freeze_step:
            return False
        last, interval = 0, 1
        while True:
            first = (last // interval + 1) * interval
            end = first + (self.config.var_update_scaler - 1) * interval
            if t <= end:
                return t % interval == 0
            last, interval = end, interval * 2

    def local_interval(self, t: int) -> int:
        local_steps = t - self.config.var_freeze_step  # 1 on the first step after the freeze
        doublings = (local_steps - 1) // self.config.local_step_scaler
        return min(self.config.local_step_clipper, 2 ** min(doublings, 62))

    def syncs(self, t: int) -> bool:
        """After the freeze: does step t end with a 1-bit all-reduce of the accumulated update?"""
        return t % self.local_interval(t) == 0


class ZeroOneAdam(OneBitAdam):
    """0/1 Adam on each parameter's local shard. ``one_bit_mean`` is the error-compensated 1-bit mean over the
    replica group; full-precision gradient averages on variance steps are the caller's (``ZeroOneAdamSync``)."""

    def __init__(self, params, one_bit_mean: Callable[[torch.Tensor], torch.Tensor], config: ZeroOneAdamConfig,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, one_bit_mean, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         freeze_step=config.var_freeze_step, bias_correction=False)
        self.schedule = VarianceSchedule(config)
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.group_of = [index for index, group in enumerate(self.param_groups) for _ in group["params"]]
        # The parameters at the last sync and the lr summed over the local steps since (per group).
        self.anchors = [torch.zeros(local_tensor(p).shape, dtype=self.state_dtype) for p in self.params]
        self.lr_sums = torch.zeros(len(self.param_groups), dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        frozen = self.frozen
        self.step_count += 1
        t = self.step_count
        full_precision = not frozen and self.schedule.updates_variance(t)
        momenta = [self._moments(p)[0] for p in self.params]
        grads = [self._local_grad(p, m) for p, m in zip(self.params, momenta)]
        if not frozen and not full_precision:
            grads = self._split(self.momentum_mean(self._flat(grads)), momenta)
        for param, grad, group_index in zip(self.params, grads, self.group_of):
            beta1, beta2 = self.param_groups[group_index]["betas"]
            exp_avg, exp_avg_sq = self._moments(param)
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            if full_precision:
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            self._update(param, self.param_groups[group_index])
        if frozen:
            self.lr_sums += torch.tensor([group["lr"] for group in self.param_groups], dtype=torch.float64)
            if self.schedule.syncs(t):
                self._sync()
        elif t == self.freeze_step:
            self._start_local_steps()
        return loss

    def _start_local_steps(self) -> None:
        for anchor, param in zip(self.anchors, self.params):
            anchor.copy_(local_tensor(param))
        for error in self.momentum_mean.state().values():
            error.zero_()

    def _sync(self) -> None:
        scales = [self._moments(p)[1].sqrt().add_(self.param_groups[g]["eps"])
                  for p, g in zip(self.params, self.group_of)]
        updates = [(local_tensor(p).to(self.state_dtype) - anchor) * scale
                   for p, anchor, scale in zip(self.params, self.anchors, scales)]
        reduced = self._split(self.momentum_mean(self._flat(updates)), updates)
        for param, anchor, update, scale, group_index in zip(self.params, self.anchors, reduced, scales,
                                                             self.group_of):
            self._moments(param)[0].copy_(update).div_(-float(self.lr_sums[group_index]))
            anchor.addcdiv_(update, scale)
            local_tensor(param).copy_(anchor)
        self.lr_sums.zero_()

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    @staticmethod
    def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in like]), like)]


class ZeroOneAdamSync(OneBitAdamSync):
    name = "zero_one_adam"
    state_prefix = "zero_one_adam"
    replicas_diverge = True  # between syncs of the compression stage

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None,
                 config: Optional[ZeroOneAdamConfig] = None):
        super().__init__(replica_group, counter)
        self.config = config or ZeroOneAdamConfig()

    def build_optimizer(self, params: Iterable[nn.Parameter], build_default) -> torch.optim.Optimizer:
        groups = self._default_groups(params, build_default)
        self.optimizer = ZeroOneAdam(groups, self._one_bit_mean(groups), self.config)
        return self.optimizer

    def before_optimizer(self, step: int) -> None:
        optimizer = self.optimizer
        if not optimizer.frozen and optimizer.schedule.updates_variance(optimizer.step_count + 1):
            self._gradient_mean.before_optimizer(step)

    def _local_views(self) -> dict[str, torch.Tensor]:
        views = {f"{self.state_prefix}.anchor.{self._names[id(p)]}": anchor
                 for p, anchor in zip(self.optimizer.params, self.optimizer.anchors)}
        views[f"{self.state_prefix}.lr_sums"] = self.optimizer.lr_sums
        return views

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self._local_views()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if f"{self.state_prefix}.step" not in state:
            return
        super().load_state_dict(state)
        for key, target in self._local_views().items():
            target.copy_(state[key])
