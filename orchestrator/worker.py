"""TrainWorker: one Ray actor per rank. Builds mesh -> model -> parallelism -> optimizer + sync -> data ->
checkpointing, then trains, keeping per-step metrics for the controller to poll while training runs."""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Optional

import torch

from orchestrate.checkpoint.universal import CheckpointError, TrainerState
from orchestrate.cluster.worker_base import DistributedWorker
from orchestrate.checkpointing import TrainerCheckpointer
from orchestrate.config import Config
from orchestrate.fault_injection import record_fired
from orchestrate.data import ResumableSampler, WindowedTokens, eval_window_ids, load_tokens
from orchestrate.models import family
from orchestrate.parallelize import build_runner
from orchestrate.step_report import StepReport
from orchestrate.trainer import Trainer, build_lr_scheduler, build_optimizer
from orchestrate.parallel.mesh import build_mesh
from orchestrate.parallel.sync import build_sync


def build_data(cfg: Config) -> WindowedTokens:
    tokens = load_tokens(cfg.data.source, cfg.data.path, cfg.data.max_bytes, cfg.data.tokenizer)
    return WindowedTokens(tokens, cfg.train.seq_len, cfg.data.val_fraction)


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
        self._metrics: list[StepReport] = []
        self._lock = threading.Lock()
        self._reported = threading.Condition(self._lock)  # a report was published, or a ``train`` call began or ended
        self._stream = -1  # the controller's id of the newest ``train`` call: its reports go to polls of that id
        self._training = False
        self._in_step = False
        self._stop = threading.Event()  # set by the controller: leave ``train`` before the next step
        self._data: Optional[tuple[dict, WindowedTokens]] = None  # (data config, tokens): kept across recoveries
        self._previous: Optional[TrainerCheckpointer] = None  # snapshots from before a failure, until all restored

    def setup(self, cfg: Config, keeper=None, restore: Optional[tuple] = None) -> dict:
        """Build this rank's training stack. ``keeper``: this node's SnapshotKeeper (level 1 on). ``restore``:
        where the state of a version comes from after a failure instead of the disk: ``("own", version)`` (a
        surviving rank rolls back to its own snapshot in memory), ``("replica", version, worker)`` (a
        data-parallel replica's snapshot, sent by that worker) or ``("keeper", version, keeper)``.

        A surviving rank calls this again after a recovery: it keeps its process and its data and rebuilds the
        model, optimizer and sync strategy around the new process groups (DTensor, DDP and pipeline stages bind
        their groups when they are built), then rolls back to ``version``."""
        self._retire_checkpointer()
        self.cfg = cfg
        self.cfg_dict = dataclasses.asdict(cfg)  # what each version records (checkpoint/universal.py: TrainerState)
        self._metrics, self._in_step = [], False
        self._stop.clear()
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
        dims = cfg.dims
        self.coords = dims.coordinates(self.rank)
        device = torch.device(self.device_type)
        model_family = family(cfg.model.name)
        model = model_family.build(cfg.model, seed=cfg.train.seed, max_seq_len=cfg.train.seq_len)
        if cfg.model.init_from and restore is None and not cfg.checkpoint.resume_from:
            # before parallelizing: every layout shards it from here
            model_family.load_hf_into(model, cfg.model.init_from)
        model = model.to(device)
        with self.collective_connections():  # the groups of the mesh and of the replica dimension connect here
            mesh = build_mesh(dims, self.device_type)
            sync = build_sync(cfg.sync.name, mesh, cfg.dims, cfg.sync.options(),
                              stages_driven_by_schedule=cfg.parallel.pp > 1)
            runner = build_runner(cfg, mesh, self.coords, model, model_family.PARTS, sync,
                                  model_family.cross_entropy_loss)
        optimizer = sync.build_optimizer(runner.parameters(), lambda _params: build_optimizer(cfg.optim, runner))
        scheduler = build_lr_scheduler(cfg.optim, cfg.train.steps, optimizer)
        data = self._load_data(cfg)
        sampler = ResumableSampler(data.n_train, cfg.train.global_batch_size, self.coords["dp"], dims.dp,
                                   cfg.train.seed)
        checkpointer = TrainerCheckpointer(cfg, self.rank, self.coords, runner, optimizer, sync,
                                           self._trainer_state, keeper)
        self.trainer = Trainer(runner, optimizer, scheduler, sync, sampler, data, device, cfg.train.grad_clip,
                               snapshotter=checkpointer)
        self.faults = [spec for spec in cfg.fault.planned() if spec.rank == self.rank]
        self.keeper = keeper
        resumed = None
        if restore is not None:
            state = checkpointer.restore_snapshot(*self._snapshot_to_restore(restore))
            self.trainer.fast_forward(state.step, state.samples_consumed)
            resumed = state.step
        elif cfg.checkpoint.resume_from:
            state = checkpointer.restore(cfg.checkpoint.resume_from)
            self.trainer.fast_forward(state.step, state.samples_consumed)
            resumed = state.step
        self.checkpointer = checkpointer
        self._inject_faults(lambda spec: spec.during_recovery)
        n_params = sum(p.numel() for p in model.parameters())
        sizes = self.checkpointer.snapshot_size_estimate() if keeper is not None else None
        return {"rank": self.rank, "reports_loss": runner.reports_loss, "n_params": n_params,
                "train_windows": data.n_train, "coords": self.coords, "resumed_step": resumed,
                "snapshot_bytes": sizes, "pid": os.getpid(),
                "heals_from_replicas": sync.replicas_identical}

    def _load_data(self, cfg: Config) -> WindowedTokens:
        """The tokens of ``cfg.data``; a surviving rank keeps the ones it loaded."""
        key = {**dataclasses.asdict(cfg.data), "seq_len": cfg.train.seq_len}
        if self._data is None or self._data[0] != key:
            self._data = (key, build_data(cfg))
        return self._data[1]

    def _retire_checkpointer(self) -> None:
        """Before a rebuild: the checkpointer that holds this rank's snapshots from before the failure is kept
        (as ``_previous``) until every rank of the gang restored, since a replacement replica may read from it;
        one that holds nothing (a recovery failed before a snapshot was taken) is dropped."""
        current, self.checkpointer = self.checkpointer, None
        if current is None:
            return
        if current.held_versions():
            if self._previous is not None:
                self._previous.release()
            self._previous = current
        else:
            current.release()

    def _release_previous(self) -> None:
        if self._previous is not None:
            self._previous.release()
            self._previous = None

    def _holder_of(self, version: int) -> TrainerCheckpointer:
        for holder in (self.checkpointer, self._previous):
            if holder is not None and version in holder.held_versions():
                return holder
        raise CheckpointError(f"rank {self.rank} holds no snapshot of version {version} in memory")

    def _snapshot_to_restore(self, restore: tuple) -> tuple[dict, object]:
        """(index, payload) of this rank's state at the version to restore, from where ``restore`` says."""
        import ray

        kind, version = restore[0], restore[1]
        if kind == "own":
            return self._holder_of(version).held_snapshot(version)
        if kind == "replica":
            return ray.get(restore[2].snapshot_of.options(concurrency_group="control").remote(version))
        if kind == "keeper":
            return ray.get(restore[2].get.remote(version, self.rank))
        raise ValueError(f"unknown restore source {kind!r}")

    def _trainer_state(self, step: int) -> TrainerState:
        t = self.trainer
        return TrainerState(step=step, samples_consumed=t.sampler.consumed, seed=self.cfg.train.seed,
                            scheduler={"last_epoch": t.scheduler.last_epoch}, config=self.cfg_dict,
                            extra={"replicas": self.checkpointer.replicas})

    def train(self, until_step: int, stream: int = 0) -> dict:
        """Train from the current step up to ``until_step``; then finish outstanding checkpoint writes. The step
        reports go to ``poll_metrics`` calls of the same ``stream`` (the controller's id of this call)."""
        with self._lock:
            self._stream, self._training = stream, True
            self._reported.notify_all()
        try:
            return self._train(until_step)
        finally:
            with self._lock:
                self._training = False
                self._reported.notify_all()

    def _train(self, until_step: int) -> dict:
        self._release_previous()  # every rank of the gang restored: nobody reads the old snapshots any more
        try:
            while self.trainer.step < until_step and not self._stop.is_set():
                self._inject_faults(lambda spec: spec.at_step == self.trainer.step + 1)
                self._in_step = True
                metrics = self.trainer.train_step()
                self._in_step = False
                if self._eval_due(metrics.step):
                    metrics.eval_loss = self.evaluate(self.cfg.train.eval_batches)
                self._publish(StepReport(metrics, self.checkpointer.versions()))
        except Exception:
            self.leave_process_group()  # a collective failed: the gang is broken, let the others know at once
            raise
        if self._stop.is_set():  # a recovery: the gang re-forms
            self.leave_process_group()
        else:
            self.checkpointer.close()
        return {"step": self.trainer.step, "ckpt_l2": self.checkpointer.versions().l2}

    def _inject_faults(self, due) -> None:
        """Fire this rank's planned faults that are due (``fault.*``): deliberate, abrupt, as a crash would be. Each
        is recorded as fired first (fault_injection.py), so the rank dies at once."""
        for spec in [spec for spec in self.faults if due(spec)]:
            self.faults.remove(spec)
            record_fired(self.cfg.run.dir, spec)
            if spec.kind == "keeper":
                import ray

                ray.kill(self.keeper, no_restart=True)
                continue
            if spec.kind == "node":
                kill_node_of_this_process()
            os._exit(1)

    def use_keeper(self, keeper, arena: dict) -> None:
        """Snapshot into ``arena``, owned by this node's ``keeper``, from the next version on."""
        self.keeper = keeper
        self.checkpointer.use_arena(keeper, arena)

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and self.cfg.train.eval_batches > 0 and step % every == 0

    def evaluate(self, n_batches: int) -> Optional[float]:
        t = self.trainer
        batches = eval_window_ids(t.data, n_batches, self.cfg.train.global_batch_size, self.coords["dp"],
                                  self.cfg.parallel.dp)
        return t.evaluate(batches)

    def _publish(self, report: StepReport) -> None:
        with self._lock:
            self._metrics.append(report)
            self._reported.notify_all()

    def stop_training(self) -> None:
        """Leave ``train`` before the next step (a recovery is about to roll every rank back)."""
        self._stop.set()

    def held_versions(self, wait_for_copy: bool = True) -> list[int]:
        """Versions of this rank's state that its own memory holds (its snapshot arenas), for a recovery or a
        save on interrupt (then without waiting: training goes on)."""
        holders = [h for h in (self.checkpointer, self._previous) if h is not None]
        return sorted({version for holder in holders for version in holder.held_versions(wait_for_copy)})

    def pin_snapshot(self, version: Optional[int]) -> bool:
        return self.checkpointer.pin(version)

    def save_pinned(self, version: int, root: str, keep: int) -> None:
        self.checkpointer.save_pinned(version, root, tuple(range(self.world_size)), keep)

    def snapshot_of(self, version: int) -> tuple[dict, object]:
        """(index, payload) of this rank's snapshot of ``version``: sent to a replacement data-parallel replica."""
        return self._holder_of(version).held_snapshot(version)

    def finished_steps(self) -> int:
        """Steps finished: one fewer than started while a step is running."""
        started = self.trainer.step
        return started - 1 if started and self._in_step else started

    def poll_metrics(self, stream: int, wait_s: float = 0.0) -> tuple[list[StepReport], bool]:
        """(reports of the steps of ``train`` call ``stream`` finished since the last poll, whether that call may
        still report more), waiting up to ``wait_s`` for a report or the call's end (orchestrator/report_polls.py;
        runs in the reports group, beside ``train`` and the control calls). A poll of an older stream gets nothing.
        The controller can log no step after the newest one it took, so this rank's arena spares that version:
        a recovery rolls back to it (or to an older one) even while the controller has fallen behind."""
        with self._lock:
            self._reported.wait_for(lambda: self._stream > stream or (
                self._stream == stream and (self._metrics or not self._training)), timeout=wait_s)
            if self._stream != stream:
                return [], self._stream < stream  # the call has not begun yet, or a newer one replaced it
            drained, self._metrics = self._metrics, []
            checkpointer = self.checkpointer
            if drained and checkpointer is not None:
                checkpointer.note_reported(drained[-1].metrics.step)
            return drained, self._training
