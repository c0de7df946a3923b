"""The controller's per-step record from the ranks' typed reports (orchestrator/step_report.py), down from a
trainer's step."""
import dataclasses
import time

import numpy as np
import torch

from orchestrate.data import ResumableSampler, WindowedTokens
from orchestrate.parallel.sync import SyncStrategy
from orchestrate.step_report import KeeperProgress, RankCheckpoint, StepReport, aggregate_step
from orchestrate.trainer import StepMetrics, Trainer


def report(rank_loss, time, handed=None, copied=None, l0=None, l2=None, eval_loss=None, timing=None):
    metrics = StepMetrics(step=7, loss=rank_loss, lr=1e-3, tokens=7 * 512, step_time=time - 100.0, comm_bytes=10,
                          comm_peak_bytes=4, time=time, timing=timing or {}, eval_loss=eval_loss)
    return StepReport(metrics, RankCheckpoint(l0=l0, l2=l2, handed=handed, copied_bytes=copied))


def test_a_step_record_takes_rank_zero_s_versions_the_slowest_rank_s_time_and_the_mean_loss():
    reports = [report(2.0, 100.5, l0=7, l2=5, eval_loss=3.0), report(4.0, 100.25, eval_loss=5.0)]
    record = aggregate_step(reports, run_start=90.0, tokens_per_step=512)
    assert (record.step, record.loss, record.step_time, record.wall_time) == (7, 3.0, 0.5, 10.5)
    line = record.to_metrics()
    assert line["ckpt_l0"] == 7 and line["ckpt_l2"] == 5 and line["eval_loss"] == 4.0 and line["tokens_per_s"] == 1024
    assert not {"ckpt_l1", "ckpt_copied_bytes", "keepers", "timing"} & set(line)


def test_with_keepers_the_record_carries_their_progress_and_the_bytes_copied():
    reports = [report(None, 101.0, handed=6, copied=100, l0=7, timing={"pp_compute_s": 0.2}),
               report(1.5, 101.0, handed=7, copied=50, timing={"pp_compute_s": 0.3})]
    line = aggregate_step(reports, 100.0, 512, KeeperProgress(committed=6, persisted=5, commit_s=0.01)).to_metrics()
    assert (line["ckpt_l1"], line["ckpt_l2"], line["ckpt_l1_s"]) == (6, 5, 0.01)
    assert line["ckpt_copied_bytes"] == 150 and line["loss"] == 1.5
    assert line["pp_compute_s"] == 0.3  # the split of the rank that has the loss (the last stage)


class LastPipelineStage:
    """A runner as the trainer sees a pipeline's last stage: the loss, and the compute/wait split of the step."""

    pp_group = None

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def forward_backward(self, inputs, targets):
        loss = torch.nn.functional.cross_entropy(self.model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach()

    def step_timing(self):
        return {"pp_compute_s": 0.01, "pp_wait_s": 0.002}


class SlowSnapshotter:
    """Waits ``seconds`` for the last copy and again to start this one; the optimizer steps as without it."""

    def __init__(self, optimizer, seconds):
        self.optimizer, self.seconds = optimizer, seconds

    def wait_until_copied(self):
        time.sleep(self.seconds)

    def snapshot(self, step):
        time.sleep(self.seconds)

    def optimizer_step(self, step):
        self.optimizer.step()


def test_a_trained_step_s_phases_reach_the_record_beside_the_pipeline_split():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = WindowedTokens(np.arange(400, dtype=np.uint16) % 16, seq_len=8, val_fraction=0.1)
    trainer = Trainer(LastPipelineStage(model), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      SyncStrategy(None), ResumableSampler(data.n_train, 4, 0, 1, seed=0), data,
                      torch.device("cpu"), grad_clip=1.0, snapshotter=SlowSnapshotter(optimizer, 0.01))
    for _ in range(2):
        metrics = trainer.train_step()
        first_stage = dataclasses.replace(metrics, loss=None, step_time=metrics.step_time + 1, timing={})
        line = aggregate_step([StepReport(first_stage, RankCheckpoint()), StepReport(metrics, RankCheckpoint())],
                              run_start=metrics.time - 10, tokens_per_step=32).to_metrics()
        phases = [line[key] for key in ("forward_backward_s", "update_s", "snapshot_s")]
        assert min(phases) >= 0 and line["snapshot_s"] >= 0.02  # both of the snapshotter's waits
        assert sum(phases) <= metrics.step_time + 1e-6 and line["step_time"] == metrics.step_time + 1
        assert (line["pp_compute_s"], line["pp_wait_s"]) == (0.01, 0.002)
