"""TrainWorker: one Ray actor per rank. Builds mesh -> model -> parallelism -> optimizer + sync -> data ->
checkpointing, then trains, keeping per-step metrics for the controller to poll while training runs."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Optional

import torch
from omegaconf import OmegaConf

from checkpoint.universal import TrainerState
from cluster.worker_base import DistributedWorker
from orchestrator.checkpointing import TrainerCheckpointer
from orchestrator.config import Config, llama_config
from orchestrator.data import ResumableSampler, WindowedTokens, eval_window_ids, load_tokens
from orchestrator.models import build_llama, cross_entropy_loss
from orchestrator.parallelize import build_runner
from orchestrator.trainer import StepMetrics, Trainer, build_lr_scheduler, build_optimizer
from parallel.comm import CommCounter
from parallel.mesh import build_mesh, replica_mesh
from parallel.sync import SyncStrategy, build_sync
from parallel.sync.context_mean import ContextMeanSync
from parallel.sync.fsdp import FSDPSync


def config_from_dict(cfg_dict: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg_dict))


def build_data(cfg: Config) -> WindowedTokens:
    tokens = load_tokens(cfg.data.source, cfg.data.path, cfg.data.max_bytes)
    return WindowedTokens(tokens, cfg.train.seq_len, cfg.data.val_fraction)


def build_sync_strategy(cfg: Config, mesh) -> SyncStrategy:
    """DDP and FSDP average over dp x cp; other strategies act across dp, after a cp gradient mean (cp > 1)."""
    replicas = replica_mesh(mesh)
    if cfg.parallel.dp_shard:
        return FSDPSync(replicas, CommCounter())
    if cfg.sync.name == "ddp":
        return build_sync(cfg.sync.name, replicas.get_group(), CommCounter())
    strategy = build_sync(cfg.sync.name, mesh["dp"].get_group(), CommCounter(), cfg.sync.options())
    return strategy if cfg.parallel.cp == 1 else ContextMeanSync(strategy, mesh["cp"].get_group())


def kill_node_of_this_process() -> None:
    """SIGKILL the raylet that started this worker: the node leaves the cluster with every process on it."""
    import psutil

    raylet = psutil.Process(os.getpid()).parent()
    if raylet is None or raylet.name() != "raylet":
        raise RuntimeError(f"fault.kind=node: this worker's parent is {raylet and raylet.name()}, not a raylet")
    raylet.kill()


class TrainWorker(DistributedWorker):
    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.cfg: Optional[Config] = None
        self.trainer: Optional[Trainer] = None
        self.checkpointer: Optional[TrainerCheckpointer] = None
        self._metrics: list[dict] = []
        self._lock = threading.Lock()
        self._polls = 0  # poll_metrics calls answered
        self._in_step = False

    def setup(self, cfg_dict: dict, keeper=None, restore_from_keeper=None) -> dict:
        """``keeper``: this node's SnapshotKeeper (level 1 on). ``restore_from_keeper``: (version, keeper) holding
        this rank's snapshot of that version, to restore after a failure instead of reading the disk."""
        self.cfg = cfg = config_from_dict(cfg_dict)
        self.cfg_dict = cfg_dict
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
        dims = cfg.dims
        self.coords = dims.coordinates(self.rank)
        device = torch.device(self.device_type)
        mesh = build_mesh(dims, self.device_type)
        model = build_llama(llama_config(cfg), seed=cfg.train.seed).to(device)
        sync = build_sync_strategy(cfg, mesh)
        runner = build_runner(cfg, mesh, self.coords, model, sync, cross_entropy_loss)
        optimizer = sync.build_optimizer(runner.parameters(), lambda _params: build_optimizer(cfg.optim, runner))
        scheduler = build_lr_scheduler(cfg.optim, cfg.train.steps, optimizer)
        data = build_data(cfg)
        sampler = ResumableSampler(data.n_train, cfg.train.global_batch_size, self.coords["dp"], dims.dp,
                                   cfg.train.seed)
        self.checkpointer = TrainerCheckpointer(cfg, self.rank, self.coords, runner, optimizer, sync,
                                                self._trainer_state, keeper)
        self.trainer = Trainer(runner, optimizer, scheduler, sync, sampler, data, device, cfg.train.grad_clip,
                               snapshotter=self.checkpointer)
        self.faults = [spec for spec in cfg.fault.planned() if spec.rank == self.rank]
        self.keeper = keeper
        resumed = None
        if restore_from_keeper is not None:
            import ray

            version, source = restore_from_keeper
            index, payload = ray.get(source.get.remote(version, self.rank))
            state = self.checkpointer.restore_snapshot(index, payload)
            self.trainer.fast_forward(state.step, state.samples_consumed)
            resumed = state.step
        elif cfg.checkpoint.resume_from:
            state = self.checkpointer.restore(cfg.checkpoint.resume_from)
            self.trainer.fast_forward(state.step, state.samples_consumed)
            resumed = state.step
        self._inject_faults(lambda spec: spec.during_recovery)
        n_params = sum(p.numel() for p in model.parameters())
        sizes = self.checkpointer.snapshot_size_estimate() if keeper is not None else None
        return {"rank": self.rank, "reports_loss": runner.reports_loss, "n_params": n_params,
                "train_windows": data.n_train, "coords": self.coords, "resumed_step": resumed,
                "snapshot_bytes": sizes}

    def _trainer_state(self, step: int) -> TrainerState:
        t = self.trainer
        return TrainerState(step=step, samples_consumed=t.sampler.consumed, seed=self.cfg.train.seed,
                            scheduler={"last_epoch": t.scheduler.last_epoch}, config=self.cfg_dict,
                            extra={"replicas": self.checkpointer.replicas})

    def train(self, until_step: int) -> dict:
        """Train from the current step up to ``until_step``; then finish outstanding checkpoint writes."""
        while self.trainer.step < until_step:
            self._inject_faults(lambda spec: spec.at_step == self.trainer.step + 1)
            self._in_step = True
            metrics = self.trainer.train_step()
            self._in_step = False
            self._publish(metrics)
        self.checkpointer.close()
        return {"step": self.trainer.step, **self.checkpointer.versions()}

    def _inject_faults(self, due) -> None:
        """Fire this rank's planned faults that are due (``fault.*``): deliberate, abrupt, as a crash would be."""
        for spec in [spec for spec in self.faults if due(spec)]:
            self.faults.remove(spec)
            if not spec.during_recovery:
                self._announce_fault(spec)
            if spec.kind == "keeper":
                import ray

                ray.kill(self.keeper, no_restart=True)
                continue
            if spec.kind == "node":
                kill_node_of_this_process()
            os._exit(1)

    def _announce_fault(self, spec, timeout_s: float = 5.0) -> None:
        """Let the controller's metric poll see the fault before it fires, so it is not fired again after the
        recovery redoes this step."""
        with self._lock:
            self._metrics.append({"step": self.trainer.step, "fault": dataclasses.asdict(spec)})
            polls_before = self._polls
        # poll polls_before + 1 takes the announcement; the controller sends the next one only after that reply
        # arrived (a reply still in flight when the node dies would be lost)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._polls < polls_before + 2:
            time.sleep(0.02)

    def use_keeper(self, keeper, arena: dict) -> None:
        """Snapshot into ``arena``, owned by this node's ``keeper``, from the next version on."""
        self.keeper = keeper
        self.checkpointer.use_arena(keeper, arena)

    def evaluate(self, n_batches: int) -> Optional[float]:
        t = self.trainer
        batches = eval_window_ids(t.data, n_batches, self.cfg.train.global_batch_size, self.coords["dp"],
                                  self.cfg.parallel.dp)
        return t.evaluate(batches)

    def _publish(self, metrics: StepMetrics) -> None:
        record = {**metrics.as_dict(), **self.checkpointer.versions()}
        with self._lock:
            self._metrics.append(record)

    def finished_steps(self) -> int:
        """Steps finished: one fewer than started while a step is running."""
        started = self.trainer.step
        return started - 1 if started and self._in_step else started

    def poll_metrics(self) -> list[dict]:
        """Metrics of the steps finished since the last poll (runs beside train in the control group)."""
        with self._lock:
            drained, self._metrics = self._metrics, []
            self._polls += 1
        return drained
