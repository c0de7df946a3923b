"""The training step: the contract every part plugs into (sync hooks: docs/lowcomm.md section 0.3; snapshots:
checkpoint/engine.py)."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from orchestrate.config import OptimConfig
from orchestrate.data import ResumableSampler, WindowedTokens
from orchestrate.parallel.sync import SyncStrategy


class Snapshotter(Protocol):
    """The checkpoint engine as the step sees it (lazy: copies overlap the next forward/backward)."""

    def wait_until_copied(self) -> None: ...

    def snapshot(self, step: int) -> None: ...

    def optimizer_step(self, step: int) -> None: ...


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
    # where the step went: forward_backward_s, update_s (sync hooks, clipping, optimizer), snapshot_s (waiting for
    # the last copy, starting this one); pipeline ranks also pp_compute_s / pp_wait_s
    timing: dict = field(default_factory=dict)
    eval_loss: Optional[float] = None  # held-out loss after this step (train.eval_every), on ranks with the loss

    def as_dict(self) -> dict:
        return asdict(self)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": True} if cfg.fused else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)


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


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip by the global norm over the whole model: DTensor norms are reduced over their mesh, and a pipeline
    rank's squared norm is summed with the other stages' (each rank holds only its stages' gradients)."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_group is not None:
        squared = total.pow(2).reshape(1)
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt()[0]
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total


class Trainer:
    def __init__(self, runner, optimizer: torch.optim.Optimizer, scheduler, sync: SyncStrategy,
                 sampler: ResumableSampler, data: WindowedTokens, device: torch.device, grad_clip: float,
                 snapshotter: Optional[Snapshotter] = None):
        self.runner, self.optimizer, self.scheduler, self.sync = runner, optimizer, scheduler, sync
        self.sampler, self.data, self.device = sampler, data, device
        self.grad_clip, self.snapshotter = grad_clip, snapshotter
        self.step = 0

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        self.step += 1
        inputs, targets = self.data.batch(self.sampler.next_window_ids())
        loss = self.runner.forward_backward(inputs.to(self.device), targets.to(self.device))
        computed = time.perf_counter()
        if self.snapshotter is not None:  # before the strategy's hook too: it may update sync state in place
            self.snapshotter.wait_until_copied()
        copied = time.perf_counter()
        self.sync.before_optimizer(self.step - 1)  # strategies count steps from 0
        if self.grad_clip > 0:
            clip_grad_norm_(self.runner.parameters(), self.grad_clip, self.runner.pp_group)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.snapshotter is not None:  # it may write the update straight into the step's snapshot
            self.snapshotter.optimizer_step(self.step)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.sync.after_optimizer(self.step - 1)
        updated = time.perf_counter()
        if self.snapshotter is not None:
            self.snapshotter.snapshot(self.step)
        end = time.perf_counter()
        # where the step's time went on this rank (the loss rank's split is logged with each step)
        phases = {"forward_backward_s": computed - start, "update_s": updated - copied,
                  "snapshot_s": (copied - computed) + (end - updated)}
        return StepMetrics(
            step=self.step, loss=float(loss) if loss is not None else None, lr=lr,
            tokens=self.sampler.consumed * self.data.seq_len, step_time=end - start,
            comm_bytes=self.sync.counter.total, comm_peak_bytes=self.sync.counter.peak, time=time.time(),
            timing={**phases, **self.runner.step_timing()})

    def fast_forward(self, step: int, samples_consumed: int) -> None:
        """Continue after a restored version: the step counter, the sample stream and the LR schedule."""
        self.step = step
        self.sampler.load_state_dict({"consumed": samples_consumed})
        with warnings.catch_warnings():  # stepping the schedule before any optimizer step is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                self.scheduler.step()

    @torch.no_grad()
    def evaluate(self, window_batches) -> Optional[float]:
        with self.sync.evaluating():  # e.g. Streaming DiLoCo: the replicas' common (outer) weights
            losses = [self.runner.evaluate(x.to(self.device), y.to(self.device))
                      for x, y in (self.data.batch(ids) for ids in window_batches)]
        losses = [float(loss) for loss in losses if loss is not None]
        return sum(losses) / len(losses) if losses else None
