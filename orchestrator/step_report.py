"""What a step leaves behind: each rank's report (its step metrics and what it knows of its checkpoints), and
the one record per step the controller logs to metrics.jsonl, built from the reports of every polled rank and the
keepers' progress."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from orchestrate.trainer import StepMetrics


@dataclass(frozen=True)
class RankCheckpoint:
    """What one rank knows of its checkpoints after a step."""

    l0: Optional[int] = None  # newest version copied to host memory (level 0)
    l2: Optional[int] = None  # keepers off: newest version this rank's own writer committed to disk
    handed: Optional[int] = None  # keepers on: newest version handed over to its node's keeper
    copied_bytes: Optional[int] = None  # keepers on: bytes its snapshot copies moved so far


@dataclass(frozen=True)
class StepReport:
    """One rank's report of one finished step (sent to the controller when it polls)."""

    metrics: StepMetrics
    checkpoint: RankCheckpoint

    @property
    def step(self) -> int:
        return self.metrics.step

    @property
    def time(self) -> float:
        return self.metrics.time


@dataclass(frozen=True)
class KeeperProgress:
    """The keepers' progress when a step is logged (level 1 on)."""

    committed: Optional[int]  # newest version committed in memory across nodes (level 1)
    persisted: Optional[int]  # newest version the keepers wrote to disk (level 2)
    commit_s: Optional[float]  # seconds the newest level-1 commit took


@dataclass(frozen=True)
class StepRecord:
    """The controller's record of one step; ``to_metrics`` is its metrics.jsonl line."""

    step: int
    loss: Optional[float]
    lr: float
    tokens: int
    tokens_per_s: float
    step_time: float
    comm_bytes: int
    comm_peak_bytes: int
    wall_time: float  # seconds since the controller started, at the end of the step
    time: float  # wall clock at the end of the step (the slowest rank)
    ckpt_l0: Optional[int] = None
    ckpt_l2: Optional[int] = None
    eval_loss: Optional[float] = None
    copied_bytes: Optional[int] = None  # keepers on: bytes the ranks' snapshot copies moved
    keepers: Optional[KeeperProgress] = None
    timing: dict = field(default_factory=dict)  # the loss rank's phases (and pipeline compute/wait split)

    def to_metrics(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("eval_loss", "copied_bytes", "keepers", "timing")}
        if self.keepers is not None:
            record.update(ckpt_l1=self.keepers.committed, ckpt_l2=self.keepers.persisted,
                          ckpt_l1_s=self.keepers.commit_s)
        if self.eval_loss is not None:
            record["eval_loss"] = self.eval_loss
        if self.copied_bytes is not None:
            record["ckpt_copied_bytes"] = self.copied_bytes
        return {**record, **self.timing}


def aggregate_step(reports: list[StepReport], run_start: float, tokens_per_step: int,
                   keepers: Optional[KeeperProgress] = None) -> StepRecord:
    """The record of a step from the reports of its ranks, rank 0's first (in rank order, so sums are
    deterministic). Rank 0 coordinates checkpoint commits, so its checkpoint versions are the committed ones."""
    first = reports[0].metrics
    losses = [r.metrics.loss for r in reports if r.metrics.loss is not None]
    # replicas of low-communication methods differ between syncs: their held-out losses are averaged
    eval_losses = [r.metrics.eval_loss for r in reports if r.metrics.eval_loss is not None]
    step_time = max(r.metrics.step_time for r in reports)
    end = max(r.metrics.time for r in reports)
    copied = [r.checkpoint.copied_bytes for r in reports]
    return StepRecord(
        step=first.step, loss=sum(losses) / len(losses) if losses else None, lr=first.lr, tokens=first.tokens,
        tokens_per_s=tokens_per_step / step_time, step_time=step_time, comm_bytes=first.comm_bytes,
        comm_peak_bytes=first.comm_peak_bytes, wall_time=end - run_start, time=end,
        ckpt_l0=reports[0].checkpoint.l0, ckpt_l2=reports[0].checkpoint.l2,
        eval_loss=sum(eval_losses) / len(eval_losses) if eval_losses else None,
        copied_bytes=sum(copied) if all(c is not None for c in copied) else None,
        keepers=keepers, timing=loss_rank_timing(reports))


def loss_rank_timing(reports: list[StepReport]) -> dict[str, float]:
    """Where the step went as the first rank that has the loss saw it: its phases (forward_backward_s, update_s,
    snapshot_s) and, in a pipeline, the last stage's compute/wait split (pp_compute_s, pp_wait_s)."""
    return next((r.metrics.timing for r in reports if r.metrics.loss is not None and r.metrics.timing), {})
