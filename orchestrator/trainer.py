"""The training step: the contract every part plugs into (DESIGN.md section 2)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from orchestrator.config import OptimConfig
from orchestrator.data import ResumableSampler, WindowedTokens
from parallel.sync import SyncStrategy


class Snapshotter(Protocol):
    """The checkpoint engine as the step sees it (lazy: copies overlap the next forward/backward)."""

    def wait_until_copied(self) -> None: ...

    def snapshot(self, step: int) -> None: ...


@dataclass
class StepMetrics:
    step: int
    loss: Optional[float]  # this rank's mean loss over its tokens; None on ranks without the loss
    lr: float
    tokens: int  # global tokens consumed so far
    step_time: float
    comm_bytes: int  # cumulative bytes this rank sent across the replica dimension
    comm_peak_bytes: int
    time: float  # wall-clock at the end of the step

    def as_dict(self) -> dict:
        return asdict(self)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


def lr_factor(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(cfg: OptimConfig, total_steps: int, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, total_steps, step))


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, sync: SyncStrategy,
                 sampler: ResumableSampler, data: WindowedTokens, loss_fn: Callable, device: torch.device,
                 grad_clip: float, reports_loss: bool = True, snapshotter: Optional[Snapshotter] = None):
        self.model, self.optimizer, self.scheduler, self.sync = model, optimizer, scheduler, sync
        self.sampler, self.data, self.loss_fn, self.device = sampler, data, loss_fn, device
        self.grad_clip, self.reports_loss, self.snapshotter = grad_clip, reports_loss, snapshotter
        self.step = 0
        self.tokens_per_step = sampler.global_batch * data.seq_len

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        return loss.detach()

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        self.step += 1
        inputs, targets = self.data.batch(self.sampler.next_window_ids())
        loss = self.forward_backward(inputs.to(self.device), targets.to(self.device))
        self.sync.before_optimizer(self.step)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=False)
        if self.snapshotter is not None:
            self.snapshotter.wait_until_copied()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.sync.after_optimizer(self.step)
        if self.snapshotter is not None:
            self.snapshotter.snapshot(self.step)
        return StepMetrics(
            step=self.step, loss=float(loss) if self.reports_loss else None, lr=lr,
            tokens=self.sampler.consumed * self.data.seq_len, step_time=time.perf_counter() - start,
            comm_bytes=self.sync.counter.total, comm_peak_bytes=self.sync.counter.peak, time=time.time())

    @torch.no_grad()
    def evaluate(self, window_batches) -> Optional[float]:
        losses = [float(self.loss_fn(self.model(x.to(self.device)), y.to(self.device)))
                  for x, y in (self.data.batch(ids) for ids in window_batches)]
        return sum(losses) / len(losses) if self.reports_loss and losses else None
