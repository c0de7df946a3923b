"""The controller: one state machine per run that owns the worker group, the metric stream and the run directory.

STARTING -> RUNNING -> FINISHED | FAILED   (RECOVERING -> RUNNING arrives with in-memory recovery)
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from ray.exceptions import GetTimeoutError, RayError

from orchestrate.checkpoint.universal import CheckpointError, discard_uncommitted
from orchestrate.cluster.health import await_lost_nodes, live_node_ids, node_answers, worker_slots
from orchestrate.cluster.ray_cluster import ClusterUnreachable, RayRuntime, check_cluster_answers, local_capacity
from orchestrate.cluster.worker_group import (PlacementError, SetupTimeout, StartTimeout, WorkerGroup, WorkerGroupError,
                                             rank_ranges)
from orchestrate.checkpoint.keepers.service import KeeperService
from orchestrate.config import Config, ConfigError, derive
from orchestrate.failures import HEALTH_CHECK_TIMEOUT_S, dead_ranks, describe_failure, raise_if_failed, stop_survivors
from orchestrate.fault_injection import FaultPlan, check_node_faults
from orchestrate.interrupt import InterruptRequests, RunInterrupted, save_held_versions
from orchestrate.metrics import MetricsLog
from orchestrate.progress import ProgressLine
from orchestrate.report_polls import ReportPolls
from orchestrate.recovery import (RecoveryPlan, RecoveryRecord, data_parallel_that_fits, failure_time,
                                  plan_after_failure)
from orchestrate.step_report import KeeperProgress, StepReport, aggregate_step
from orchestrate.worker import TrainWorker

log = logging.getLogger(__name__)


class RunState(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"  # Ctrl-C or SIGTERM: the newest snapshot saved, then stopped


@dataclass
class RunResult:
    state: RunState
    run_dir: Path
    steps: int = 0
    final_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    error: Optional[str] = None
    first_step_s: Optional[float] = None  # seconds from controller start to the first finished step
    checkpoint: Optional[int] = None  # newest version committed to disk
    interrupted: Optional[RunInterrupted] = None


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def check_capacity(cfg: Config, cpus: float, gpus: float, where: str) -> None:
    c, world = cfg.cluster, cfg.world_size
    need_cpus, need_gpus = world * c.cpus_per_worker, world * c.gpus_per_worker
    if need_cpus > cpus + 1e-9:
        raise ConfigError(
            f"cluster.cpus_per_worker={c.cpus_per_worker}: {world} workers need {need_cpus:g} CPUs but {where} "
            f"has {cpus:g} (lower cluster.cpus_per_worker or the parallel degrees)")
    if need_gpus > gpus + 1e-9:
        raise ConfigError(f"cluster.gpus_per_worker={c.gpus_per_worker}: {world} workers need {need_gpus:g} "
                          f"GPUs but {where} has {gpus:g}")


@dataclass
class _Attempt:
    """What the controller's recovery loop carries from one gang to the next."""

    group: Optional[WorkerGroup] = None
    plan: Optional[RecoveryPlan] = None  # where the recovering gang restores from
    lost: list[int] = field(default_factory=list)  # ranks to start anew
    restarts: int = 0
    recovering: bool = False


class Controller:
    def __init__(self, cfg: Config, interrupts: Optional[InterruptRequests] = None):
        self.cfg = cfg
        self.interrupts = interrupts
        self.state = RunState.STARTING
        self.start_time = time.time()
        self.recovery: Optional[RecoveryRecord] = None  # the recovery in progress, logged at its first step
        self.recoveries: list[RecoveryRecord] = []
        self.faults: Optional[FaultPlan] = None  # injected faults: still to fire, fired
        self.keepers: Optional[KeeperService] = None
        self._busy: dict[int, object] = {}  # rank -> its running setup or train call
        self._setup_infos: list[dict] = []  # what each rank's setup returned, for planning a recovery
        self._last_report: dict[int, float] = {}  # rank -> wall time at the end of its newest reported step
        self._streams = 0  # ``train`` calls issued: each call's reports are polled under its number
        self.snapshot_sizes: dict[int, tuple[int, int]] = {}  # rank -> (payload, metadata) bytes of a snapshot
        self._attached_to: dict[int, object] = {}  # rank -> the keeper whose arena it snapshots into
        self._keepers_unsettled = False  # a keeper replacement failed part way: the next look tries again

    def preflight(self) -> None:
        """Checks that need to know the cluster; for the embedded cluster they run before anything starts."""
        if self.cfg.cluster.address is None:
            capacity = local_capacity(self.cfg.cluster.num_cpus)
            check_capacity(self.cfg, capacity.cpus, capacity.gpus, "this machine's local cluster")
        else:
            try:
                check_cluster_answers(self.cfg.cluster.address)
            except ClusterUnreachable as err:
                raise ConfigError(str(err)) from None

    def run(self) -> RunResult:
        self.preflight()
        run_dir = (Path(self.cfg.run.dir) if self.cfg.run.dir else default_run_dir(self.cfg)).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg = derive(self.cfg, {
            "run.dir": str(run_dir),
            "checkpoint.dir": str(Path(self.cfg.checkpoint.dir or run_dir / "checkpoints").resolve())})
        if Path(cfg.checkpoint.dir).exists():
            discard_uncommitted(cfg.checkpoint.dir)  # debris of a crashed attempt must never be merged
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        result = RunResult(RunState.STARTING, run_dir)
        progress = ProgressLine(cfg.train.steps, cfg.logging.progress, cfg.logging.log_every)
        metrics = MetricsLog(run_dir, cfg.logging.wandb, cfg.run.name, resolved)
        try:
            with RayRuntime(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb) as runtime:
                if self.interrupts is not None:
                    self.interrupts.install()
                if cfg.cluster.address is not None:
                    res = runtime.resources()
                    check_capacity(cfg, res.cpus, res.gpus, f"the cluster at {cfg.cluster.address}")
                self.keepers = KeeperService(cfg.checkpoint.keeper_settings(), cfg.world_size, live_node_ids,
                                             node_answers) if cfg.checkpoint.keepers_on else None
                self.faults = FaultPlan(cfg)
                try:
                    self._run_group(result, progress, metrics)
                    self._log_fired_faults(progress, metrics, result.steps)  # keeper faults leave no failure
                finally:
                    self.faults.forget()
                    if self.keepers is not None:
                        self.keepers.shutdown()
        except RunInterrupted as interrupted:
            result.interrupted, result.checkpoint = interrupted, interrupted.step
            self.state = RunState.INTERRUPTED
        except (RayError, WorkerGroupError, StartTimeout) as err:
            if isinstance(err, CheckpointError) and self.recovery is None and not self.recoveries:
                # a bad checkpoint to resume from, met by the workers: bad input, exit 2 (in a recovery: a failure)
                raise ConfigError(str(err).strip().splitlines()[-1]) from None
            cause = getattr(err, "cause", None) or err  # a rank's own exception, not Ray's wrapper
            result.error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause) else ''}"
            self.state = RunState.FAILED
        finally:
            progress.close()
            metrics.close()
        result.state = self.state
        return result

    def _run_group(self, result: RunResult, progress: ProgressLine, metrics: MetricsLog) -> None:
        """Run the gang; when ranks or nodes die, RECOVERING: the surviving ranks stay (they roll back to their
        own snapshot in memory), the lost ranks start anew and restore from the fastest source that has their
        state (recovery.py), and the gang goes on from there."""
        attempt = _Attempt()
        gang_cfg = self.cfg
        try:
            while True:
                try:
                    if attempt.group is None:
                        attempt.group = self._start_group()
                    elif attempt.lost:
                        attempt.group.replace(attempt.lost)
                    self._run_once(attempt.group, self.faults.for_gang(gang_cfg, attempt.recovering),
                                   attempt.plan, result, progress, metrics)
                    return
                except WorkerGroupError as err:
                    gang_cfg = self._recover(err, attempt, result, progress, metrics)
        finally:
            if attempt.group is not None:
                attempt.group.shutdown()

    def _recover(self, err: WorkerGroupError, attempt: "_Attempt", result: RunResult, progress: ProgressLine,
                 metrics: MetricsLog) -> Config:
        """Plan the recovery from ``err`` into ``attempt`` (or raise when there is nothing to restore from or no
        restart left); returns the config the recovering gang gets."""
        detected, group = time.time(), attempt.group
        dead = dead_ranks(group, err)
        self._drop_fired_faults(attempt, progress, metrics, result.steps)
        lost_nodes = await_lost_nodes(getattr(err, "node_ids", []))
        smaller_dp = self._data_parallel_after_node_loss(err) if lost_nodes else None
        if group is not None and smaller_dp:
            group.shutdown()
            group = attempt.group = None
        survivors = [] if group is None else [r for r in range(group.world_size) if r not in dead]
        if self.keepers is not None:
            self.keepers.drain()  # no commit frees a version while the survivors are asked
        held = stop_survivors(group, survivors, self._busy)
        dead = sorted(set(dead) | set(survivors) - set(held))
        plan = plan_after_failure(self.cfg.checkpoint.dir, dead, held, result.steps, bool(smaller_dp),
                                  self._setup_infos, self.keepers.plan_restore if self.keepers else None)
        if attempt.restarts >= self.cfg.fault.max_restarts or plan is None:
            reason = f"fault.max_restarts={self.cfg.fault.max_restarts} used up" if plan else \
                "no committed checkpoint to restore"
            raise WorkerGroupError(f"{describe_failure(err)} ({reason})", rank=err.rank) from None
        if self.recovery is not None:  # the previous recovery failed before a step finished
            self._log_interrupted_recovery(err, result, metrics)
        attempt.restarts, attempt.recovering, attempt.lost, attempt.plan = attempt.restarts + 1, True, dead, plan
        self.state = RunState.RECOVERING
        where = f"disk {plan.disk.name}" if plan.disk else f"{plan.source} version {plan.version}"
        nodes = f", node {', '.join(n[:8] for n in lost_nodes)} lost" if lost_nodes else ""
        progress.message(f"{describe_failure(err)}{nodes}; recovering (restart {attempt.restarts}/"
                         f"{self.cfg.fault.max_restarts}): ranks {dead} start anew, {len(held)} stay, from {where}")
        self.recovery = RecoveryRecord(
            failed_rank=err.rank, restarted_ranks=dead, kept_ranks=sorted(held), lost_nodes=lost_nodes,
            source=plan.source, version=plan.version if plan.disk is None else str(plan.disk),
            decoded_ranks=plan.decoded_ranks, detected_at=detected,
            started=failure_time(self._last_report, dead, detected),
            last_step=max(result.steps, getattr(err, "finished_step", 0)))
        if smaller_dp:
            self._shrink_data_parallel(smaller_dp, progress)
            self.faults.drop_ranks_from(self.cfg.world_size)
        if self.keepers is not None:
            self.keepers.prepare_restore(None if plan.disk else plan.version, self.cfg.world_size)
        return derive(self.cfg, {"checkpoint.resume_from": str(plan.disk) if plan.disk else None})

    def _drop_fired_faults(self, attempt: "_Attempt", progress: ProgressLine, metrics: MetricsLog,
                           step: int) -> None:
        """Faults that fired are not given to the recovering gang (it redoes their steps): those the ranks recorded
        (fault_log.py), and faults during a recovery once one happened."""
        self._log_fired_faults(progress, metrics, step)
        self.faults.drop_fired(attempt.recovering)

    def _log_fired_faults(self, progress: ProgressLine, metrics: MetricsLog, step: int) -> None:
        for spec in self.faults.newly_fired():
            progress.message(f"fault injected: {spec.kind} of rank {spec.rank} before step {spec.at_step}")
            metrics.log({"step": step, "event": "fault", "fault": dataclasses.asdict(spec)})

    def _start_group(self) -> WorkerGroup:
        c = self.cfg.cluster
        try:
            return WorkerGroup(TrainWorker, self.cfg.world_size, c.cpus_per_worker, c.gpus_per_worker,
                               self.cfg.start_timeout_s, c.collective_timeout_s)
        except PlacementError as err:
            raise ConfigError(f"cluster.cpus_per_worker={c.cpus_per_worker}: {err}") from None

    def _data_parallel_after_node_loss(self, err: WorkerGroupError) -> Optional[int]:
        """None if the layout still fits the cluster, else the largest smaller data-parallel degree that does."""
        c = self.cfg.cluster
        slots = worker_slots(c.cpus_per_worker, c.gpus_per_worker)
        if slots >= self.cfg.world_size:
            return None
        dp = data_parallel_that_fits(self.cfg, slots)
        if dp is not None:
            return dp
        raise WorkerGroupError(f"{describe_failure(err)}; the cluster has room for {slots} workers, too few for any "
                               f"data-parallel degree of this layout", rank=err.rank)

    def _shrink_data_parallel(self, dp: int, progress: ProgressLine) -> None:
        progress.message(f"the cluster has no room for parallel.dp={self.cfg.parallel.dp} any more: resuming "
                         f"elastically with parallel.dp={dp} from the universal checkpoint")
        self.recovery.elastic = {"dp_from": self.cfg.parallel.dp, "dp_to": dp}
        self.cfg = derive(self.cfg, {"parallel.dp": dp, "cluster.num_workers": None})

    def _run_once(self, group: WorkerGroup, gang_cfg: Config, plan: Optional[RecoveryPlan], result: RunResult,
                  progress: ProgressLine, metrics: MetricsLog) -> None:
        cfg = self.cfg
        try:
            infos = self._gather_setup(group, self._setup_calls(group, gang_cfg, plan), progress)
        except RayError as err:  # a layout the component rejects once built (e.g. fragments vs sync_every)
            if isinstance(err, ValueError) and not isinstance(err, CheckpointError):
                raise ConfigError(str(err).strip().splitlines()[-1]) from None
            raise
        self._setup_infos = infos
        metrics.log({"step": result.steps, "event": "workers", "pids": [info["pid"] for info in infos],
                     "nodes": [info["node_id"] for info in group.infos],
                     "addresses": [info["address"] for info in group.infos]})
        if self.keepers is not None:
            self.snapshot_sizes = {info["rank"]: tuple(info["snapshot_bytes"]) for info in infos}
            self._attach_arenas(group)
        if self.recovery is None:
            progress.message(f"{cfg.world_size} workers ({infos[0]['n_params']:,} parameters, "
                             f"backend {group.infos[0]['backend']}) training {cfg.train.steps} steps")
        resumed = infos[0]["resumed_step"]
        if resumed is not None and self.recovery is None:
            result.steps = resumed
            progress.message(f"resumed from {cfg.checkpoint.resume_from} at step {resumed}")
            metrics.log({"step": resumed, "event": "resume", "from": cfg.checkpoint.resume_from})
        elif self.recovery is not None:
            self.recovery.restored_step = resumed
        self.state = RunState.RUNNING
        reporters = [info["rank"] for info in infos if info["reports_loss"]]
        try:
            finals = self._stream_training(group, reporters, result, progress, metrics)
        except RayError:  # a rank's own error, e.g. a collective that timed out: show where every rank was
            self._write_stacks(group, progress)
            raise
        if self.keepers is not None:
            self.keepers.commit_final(result.steps)
            result.checkpoint = self.keepers.persisted
            metrics.log({"step": result.steps, "event": "keeper_memory", "nodes": self.keepers.memory()})
        else:
            result.checkpoint = finals[0]["ckpt_l2"]
        if result.checkpoint is not None:
            progress.message(f"checkpoint: step {result.checkpoint} committed in {cfg.checkpoint.dir}")
        if cfg.train.eval_batches > 0:
            losses = [x for x in group.run("evaluate", cfg.train.eval_batches) if x is not None]
            result.eval_loss = sum(losses) / len(losses)
            metrics.log({"step": result.steps, "eval_loss": result.eval_loss})
            progress.message(f"eval loss {result.eval_loss:.4f}")
        self.state = RunState.FINISHED

    def _write_stacks(self, group: WorkerGroup, progress: ProgressLine) -> Path:
        """Every rank's threads now, into ``stacks/rank-N.txt`` of the run dir: after a collective timed out in one
        rank, the file of the rank it waited for shows where that one was."""
        directory = Path(self.cfg.run.dir) / "stacks"
        directory.mkdir(exist_ok=True)
        for rank, text in group.stacks().items():
            (directory / f"rank-{rank}.txt").write_text(text)
        progress.message(f"every rank's threads when the run failed: {directory}")
        return directory

    def _offer_level_one(self, step: int, reports: list[StepReport]) -> KeeperProgress:
        """Offer the keepers the newest version every rank handed over (not newer than ``step``, which is about to
        be logged); their progress goes into the step's record."""
        handed = [r.checkpoint.handed for r in reports]
        if all(h is not None for h in handed):
            self.keepers.offer(min(min(handed), step))
        return KeeperProgress(self.keepers.committed, self.keepers.persisted, self.keepers.last_commit_s)

    def _setup_calls(self, group: WorkerGroup, gang_cfg: Config, plan: Optional[RecoveryPlan]) -> list:
        """Each rank gets its node's keeper (level 1 on) and, after a recovery from memory, where the state of the
        version to restore comes from (recovery.py)."""
        import ray

        check_node_faults(gang_cfg, [info["node_id"] for info in group.infos],
                          ray.get_runtime_context().get_node_id())
        refs = []
        for rank, actor in enumerate(group.actors):
            keeper = self.keepers.keeper_on(group.infos[rank]["node_id"]) if self.keepers else None
            restore = plan.sources.get(rank) if plan is not None and plan.disk is None else None
            if restore is not None and restore[0] == "replica":
                restore = ("replica", restore[1], group.actors[restore[2]])
            refs.append(actor.setup.remote(gang_cfg, keeper, restore))
        return refs

    def _gather_setup(self, group: WorkerGroup, refs: list, progress: ProgressLine) -> list:
        """Every rank's setup call, remembered until they finish (a recovery waits for a surviving rank's running
        call before it asks what the rank holds). Ranks still in setup after ``cluster.setup_timeout_s`` fail the
        run, their threads written out."""
        import ray

        self._busy = dict(enumerate(refs))
        timeout_s = self.cfg.cluster.setup_timeout_s
        try:
            return group.gather(refs, timeout_s)
        except GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            missing = [rank for rank, ref in enumerate(refs) if ref not in ready]
            directory = self._write_stacks(group, progress)
            raise SetupTimeout(f"rank{'s' if len(missing) > 1 else ''} {rank_ranges(missing)} still in setup after "
                               f"cluster.setup_timeout_s={timeout_s:g}; where each rank was: {directory}; raise "
                               f"the setting if setup is only slow (a large checkpoint to restore)") from None

    def _attach_arenas(self, group: WorkerGroup, ranks: Optional[list[int]] = None) -> None:
        """Every rank (or ``ranks``) gets an arena in shared memory from its node's keeper, checked for space
        before training starts, and snapshots into it from then on."""
        ranks = list(range(group.world_size)) if ranks is None else ranks
        by_node: dict[str, dict[int, tuple[int, int]]] = {}
        for rank in ranks:
            by_node.setdefault(group.infos[rank]["node_id"], {})[rank] = self.snapshot_sizes[rank]
        keepers = {rank: self.keepers.keeper_on(group.infos[rank]["node_id"]) for rank in ranks}
        handles = self.keepers.reserve_arenas(by_node)
        group.gather([group.actors[rank].use_keeper.options(concurrency_group="control").remote(
            keepers[rank], handles[rank]) for rank in ranks])
        self._attached_to.update(keepers)

    def _replace_lost_keepers(self, group: WorkerGroup, result: RunResult, progress: ProgressLine,
                              metrics: MetricsLog) -> None:
        """A keeper found lost (checkpoint/keepers/liveness.py) is replaced and its node's ranks told."""
        lost = self.keepers.lost_keepers()
        if not lost and not self._keepers_unsettled:
            return
        before = dict(self.keepers.keepers)
        try:
            self.keepers.refresh()
            # the ranks of a node with a keeper other than theirs (a node without one is going down, or its new
            # keeper did not start: its ranks go on snapshotting into the orphaned arenas, unprotected)
            ranks = [rank for rank, info in enumerate(group.infos)
                     if self.keepers.keepers.get(info["node_id"]) not in (None, self._attached_to.get(rank))]
            self._attach_arenas(group, ranks)
        except (RayError, WorkerGroupError) as err:
            # more is dying (a keeper or a rank on a node going down): the rank failure starts a recovery, which
            # replaces the keepers; else the next look tries again
            self._keepers_unsettled = True
            log.warning("replacing the keeper of node(s) %s failed: %s", ", ".join(n[:8] for n in lost) or "-",
                        str(err).strip().splitlines()[0])
            return
        self._keepers_unsettled = False
        replaced = [node for node in lost if self.keepers.keepers.get(node) is not before.get(node)]
        if not replaced and not ranks:
            return  # slow, not lost: they answered the refresh's longer wait
        parts = [f"keeper of node(s) {', '.join(n[:8] for n in replaced)} lost"] if replaced else []
        if ranks:
            nodes = sorted({group.infos[rank]["node_id"][:8] for rank in ranks})
            parts.append(f"new keeper on node(s) {', '.join(nodes)}, ranks {ranks} hand over to it")
        progress.message("; ".join(parts))
        metrics.log({"step": result.steps, "event": "keeper_replaced", "ranks": ranks})

    def _log_interrupted_recovery(self, err: Exception, result: RunResult, metrics: MetricsLog) -> None:
        recovery, self.recovery = self.recovery, None
        recovery.cut_short(describe_failure(err), time.time())
        metrics.log({"step": result.steps, "recovery": recovery.to_metrics()})
        self.recoveries.append(recovery)

    def _log_recovery(self, step_end: float, progress: ProgressLine, metrics: MetricsLog) -> None:
        """At the first step finished after a recovery (``step_end``, the workers' clock): what failed, the source,
        seconds taken, steps lost."""
        recovery, self.recovery = self.recovery, None
        recovery.finish(step_end)
        metrics.log({"step": recovery.restored_step, "recovery": recovery.to_metrics()})
        self.recoveries.append(recovery)
        progress.message(f"recovered: ranks {recovery.restarted_ranks} started anew, {len(recovery.kept_ranks)} "
                         f"kept, step {recovery.restored_step} restored from {recovery.source} in "
                         f"{recovery.seconds:.1f}s, {recovery.steps_lost} steps redone")

    def _stream_training(self, group: WorkerGroup, reporters: list[int], result: RunResult,
                         progress: ProgressLine, metrics: MetricsLog) -> list[dict]:
        """Stream per-step records until every rank finished; returns what each rank's ``train`` returned."""
        import ray

        tokens_per_step = self.cfg.train.global_batch_size * self.cfg.train.seq_len
        pending_by_step: dict[int, dict[int, StepReport]] = {}
        # with keepers every rank's handover progress decides what can be committed; faults announce themselves
        everyone = self.keepers is not None or self.cfg.fault.planned()
        polled = list(range(group.world_size)) if everyone else sorted({0, *reporters})
        self._streams += 1
        train_refs = group.call_async("train", self.cfg.train.steps, self._streams)
        self._busy = dict(enumerate(train_refs))
        self._last_report = {rank: time.time() for rank in range(group.world_size)}
        unfinished = list(train_refs)
        polls = ReportPolls(group, polled, self._streams)
        while True:
            if self.interrupts is not None and self.interrupts.requested:
                raise self._save_on_interrupt(group, result, progress)
            running = unfinished + polls.outstanding()
            if running:
                ray.wait(running, num_returns=1, timeout=polls.wait_s())
            else:
                time.sleep(polls.wait_s())
            if unfinished:
                _, unfinished = ray.wait(unfinished, num_returns=len(unfinished), timeout=0)
                raise_if_failed(group, train_refs, result.steps)
            try:
                answers = polls.collect()
            except WorkerGroupError:
                raise_if_failed(group, train_refs, result.steps, suspect=True)
                raise
            if self.keepers is not None:
                self._replace_lost_keepers(group, result, progress, metrics)
            for rank, reports in answers:
                for report in reports:
                    self._last_report[rank] = report.time
                    pending_by_step.setdefault(report.step, {})[rank] = report
            for step in sorted(pending_by_step):
                if len(pending_by_step[step]) < len(polled):
                    break
                by_rank = pending_by_step.pop(step)
                reports = [by_rank[r] for r in polled]
                keepers = self._offer_level_one(step, reports) if self.keepers is not None else None
                record = aggregate_step(reports, self.start_time, tokens_per_step, keepers)
                if self.recovery is not None:
                    self._log_recovery(record.time, progress, metrics)
                if record.step <= result.steps:
                    continue  # redone after a recovery: logged already (with the same loss)
                line = record.to_metrics()
                metrics.log(line)
                progress.update(line)
                result.steps, result.final_loss = record.step, record.loss
                if result.first_step_s is None:
                    result.first_step_s = record.wall_time
            if not unfinished and polls.drained and not pending_by_step:
                return ray.get(train_refs)

    def _save_on_interrupt(self, group: WorkerGroup, result: RunResult, progress: ProgressLine) -> RunInterrupted:
        """Ctrl-C or SIGTERM: the newest version every rank holds (not newer than the last logged step) is written
        as a universal checkpoint while the ranks go on; then the run stops."""
        signum = self.interrupts.signum
        progress.message(f"{signal.Signals(signum).name}: saving the newest snapshot before stopping "
                         f"(again to stop at once, without saving)")
        if self.keepers is not None:
            version = self.keepers.save_now(result.steps)
        else:
            version = save_held_versions(group, self.cfg.checkpoint, result.steps, HEALTH_CHECK_TIMEOUT_S)
        return RunInterrupted(signum, self.cfg.checkpoint.dir if version is not None else None, version)
