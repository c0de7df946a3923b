"""The controller: one state machine per run that owns the worker group, the metric stream and the run directory.

STARTING -> RUNNING -> FINISHED | FAILED   (RECOVERING -> RUNNING arrives with in-memory recovery)
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from ray.exceptions import RayError

from checkpoint.universal import CheckpointError, committed_versions, discard_uncommitted, version_dir
from cluster.health import await_lost_nodes, live_node_ids, worker_slots
from cluster.ray_cluster import RayRuntime, local_capacity
from cluster.worker_group import PlacementError, WorkerGroup, WorkerGroupError
from orchestrator.config import Config, ConfigError, FaultConfig, FaultSpec, validate
from orchestrator.keepers import KeeperService, RestorePlan
from orchestrator.metrics import MetricsLog
from orchestrator.progress import ProgressLine
from orchestrator.worker import TrainWorker

POLL_INTERVAL_S = 0.2
DEATH_REPORT_GRACE_S = 3.0
HEALTH_CHECK_TIMEOUT_S = 5.0


def _raises(ref) -> bool:
    import ray

    try:
        ray.get(ref)
        return False
    except Exception:  # noqa: BLE001 - any failure of a rank's call
        return True


class RankDied(WorkerGroupError):
    def __init__(self, message: str, rank: int, step: int, finished_step: int, node_ids: list[str]):
        super().__init__(message, rank)
        self.step = step  # the step during which it died
        # the newest step a surviving rank finished (without gradient all-reduce, survivors may run ahead)
        self.finished_step = finished_step
        self.node_ids = node_ids  # nodes of the ranks that died or stopped answering


def describe_failure(err: WorkerGroupError) -> str:
    """One line: Ray's actor-death text runs over many lines."""
    if isinstance(err, RankDied) or err.rank is None:
        return str(err).strip().splitlines()[0]
    return f"rank {err.rank} died while the gang started or restored"


class RunState(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"


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


def aggregate_step(reports: list[dict], run_start: float, tokens_per_step: int) -> dict:
    """One metrics.jsonl record from the per-rank reports of a step, rank 0's first (in rank order, so sums are
    deterministic). Rank 0 coordinates checkpoint commits, so its checkpoint versions are the committed ones."""
    losses = [r["loss"] for r in reports if r["loss"] is not None]
    step_time = max(r["step_time"] for r in reports)
    return {
        "step": reports[0]["step"],
        "loss": sum(losses) / len(losses) if losses else None,
        "lr": reports[0]["lr"],
        "tokens": reports[0]["tokens"],
        "tokens_per_s": tokens_per_step / step_time,
        "step_time": step_time,
        "comm_bytes": reports[0]["comm_bytes"],
        "comm_peak_bytes": reports[0]["comm_peak_bytes"],
        "wall_time": max(r["time"] for r in reports) - run_start,
        "time": max(r["time"] for r in reports),
        "ckpt_l0": reports[0].get("ckpt_l0"),
        "ckpt_l2": reports[0].get("ckpt_l2"),
        **loss_rank_timing(reports),
    }


def loss_rank_timing(reports: list[dict]) -> dict[str, float]:
    """Pipeline compute/wait split as the last stage (the first rank that has the loss) saw it."""
    return next((r["timing"] for r in reports if r["loss"] is not None and r.get("timing")), {})


def recovery_source(checkpoint_dir: str, logged_step: int) -> Optional[Path]:
    """The newest committed version not newer than the last logged step, so that the steps whose metrics died
    with a rank are computed (and logged) again; else the newest committed version."""
    if not Path(checkpoint_dir).exists():
        return None
    versions = committed_versions(checkpoint_dir)
    if not versions:
        return None
    usable = [v for v in versions if v <= logged_step] or versions
    return version_dir(checkpoint_dir, usable[-1])


class Controller:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.state = RunState.STARTING
        self.start_time = time.time()
        self.recovery: Optional[dict] = None  # the recovery in progress, logged at its first finished step
        self.recoveries: list[dict] = []
        self.fired: list[FaultSpec] = []  # injected faults the ranks announced before firing them
        self.keepers: Optional[KeeperService] = None
        self.restore_plan: Optional[RestorePlan] = None  # where a recovering gang reads its snapshots
        self.snapshot_sizes: dict[int, tuple[int, int]] = {}  # rank -> (payload, metadata) bytes of a snapshot

    def preflight(self) -> None:
        """Checks that need to know the cluster; for the embedded cluster they run before anything starts."""
        if self.cfg.cluster.address is None:
            capacity = local_capacity(self.cfg.cluster.num_cpus)
            check_capacity(self.cfg, capacity.cpus, capacity.gpus, "this machine's local cluster")

    def run(self) -> RunResult:
        self.preflight()
        cfg = self.cfg
        run_dir = (Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.run.dir = str(run_dir)
        cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir or run_dir / "checkpoints").resolve())
        if Path(cfg.checkpoint.dir).exists():
            discard_uncommitted(cfg.checkpoint.dir)  # debris of a crashed attempt must never be merged
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        result = RunResult(RunState.STARTING, run_dir)
        progress = ProgressLine(cfg.train.steps, cfg.logging.progress, cfg.logging.log_every)
        metrics = MetricsLog(run_dir, cfg.logging.wandb, cfg.run.name, resolved)
        try:
            with RayRuntime(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.object_store_mb) as runtime:
                if cfg.cluster.address is not None:
                    res = runtime.resources()
                    check_capacity(cfg, res.cpus, res.gpus, f"the cluster at {cfg.cluster.address}")
                self.keepers = KeeperService(cfg.checkpoint, cfg.world_size) if cfg.checkpoint.keepers_on else None
                try:
                    self._run_group(resolved, result, progress, metrics)
                finally:
                    if self.keepers is not None:
                        self.keepers.shutdown()
        except RayError as err:
            if isinstance(err, CheckpointError):  # a bad checkpoint met by the workers: bad input, exit 2
                raise ConfigError(str(err).strip().splitlines()[-1]) from None
            cause = getattr(err, "cause", None) or err  # a rank's own exception, not Ray's wrapper
            result.error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause) else ''}"
            self.state = RunState.FAILED
        except WorkerGroupError as err:
            cause = getattr(err, "cause", None) or err  # a rank's own exception, not Ray's wrapper
            result.error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause) else ''}"
            self.state = RunState.FAILED
        finally:
            progress.close()
            metrics.close()
        result.state = self.state
        return result

    def _run_group(self, resolved: dict, result: RunResult, progress: ProgressLine, metrics: MetricsLog) -> None:
        """Run the gang; when a rank or node dies, RECOVERING: a new gang restores the newest version it can
        from the fastest source (keepers as handed over, keepers decoding a lost node's ranks, disk)."""
        restarts, faults, recovering = 0, self.cfg.fault.planned(), False
        while True:
            try:
                self._run_once(self._with_faults(resolved, faults, recovering), result, progress, metrics)
                return
            except WorkerGroupError as err:
                faults = [f for f in faults if not (f.during_recovery and recovering) and f not in self.fired]
                lost_nodes = await_lost_nodes(getattr(err, "node_ids", []))
                smaller_dp = self._data_parallel_that_fits(err) if lost_nodes else None
                # a smaller layout restores from the universal format: only disk versions reshard
                plan = self.keepers.plan_restore(result.steps) if self.keepers and not smaller_dp else None
                disk = recovery_source(self.cfg.checkpoint.dir, result.steps) if plan is None else None
                if restarts >= self.cfg.fault.max_restarts or (plan is None and disk is None):
                    reason = f"fault.max_restarts={self.cfg.fault.max_restarts} used up" if plan or disk else \
                        "no committed checkpoint to restore"
                    raise WorkerGroupError(f"{describe_failure(err)} ({reason})", rank=err.rank) from None
                if self.recovery is not None:  # the previous recovery failed before a step finished
                    self._log_interrupted_recovery(err, result, metrics)
                restarts, recovering = restarts + 1, True
                self.state = RunState.RECOVERING
                source = f"{plan.source} version {plan.version}" if plan else f"disk {disk.name}"
                lost = f", node {', '.join(n[:8] for n in lost_nodes)} lost" if lost_nodes else ""
                progress.message(f"{describe_failure(err)}{lost}; recovering (restart {restarts}/"
                                 f"{self.cfg.fault.max_restarts}) from {source}")
                self.recovery = {"failed_rank": err.rank, "lost_nodes": lost_nodes,
                                 "source": plan.source if plan else "disk",
                                 "version": plan.version if plan else str(disk),
                                 "decoded_ranks": plan.decoded_ranks if plan else [],
                                 "started": time.time(),
                                 "last_step": max(result.steps, getattr(err, "finished_step", 0))}
                self.restore_plan = plan
                if smaller_dp:
                    resolved = self._shrink_data_parallel(resolved, smaller_dp, progress)
                    faults = [f for f in faults if f.rank < self.cfg.world_size]
                if self.keepers is not None:
                    if plan is None:  # the disk version is older than what they hold: start afresh
                        self.keepers.reset(self.cfg.world_size)
                    else:
                        self.keepers.forget_after(plan.version)
                        self.keepers.refresh()
                resolved = {**resolved, "checkpoint": {**resolved["checkpoint"],
                                                       "resume_from": None if plan else str(disk)}}

    def _data_parallel_that_fits(self, err: WorkerGroupError) -> Optional[int]:
        """After a node loss: None if the layout still fits the cluster, else the largest smaller data-parallel
        degree that does and is a valid layout."""
        c = self.cfg.cluster
        slots = worker_slots(c.cpus_per_worker, c.gpus_per_worker)
        if slots >= self.cfg.world_size:
            return None
        for dp in range(self.cfg.parallel.dp - 1, 0, -1):
            candidate = copy.deepcopy(self.cfg)
            candidate.parallel.dp, candidate.cluster.num_workers = dp, None
            candidate.fault = FaultConfig()  # faults of ranks the smaller gang lacks are dropped, not invalid
            try:
                validate(candidate)
            except ConfigError:
                continue
            if candidate.world_size <= slots:
                return dp
        raise WorkerGroupError(f"{describe_failure(err)}; the cluster has room for {slots} workers, too few for any "
                               f"data-parallel degree of this layout", rank=err.rank)

    def _shrink_data_parallel(self, resolved: dict, dp: int, progress: ProgressLine) -> dict:
        progress.message(f"the cluster has no room for parallel.dp={self.cfg.parallel.dp} any more: resuming "
                         f"elastically with parallel.dp={dp} from the universal checkpoint")
        self.recovery["elastic"] = {"dp_from": self.cfg.parallel.dp, "dp_to": dp}
        self.cfg.parallel.dp, self.cfg.cluster.num_workers = dp, None
        return {**resolved, "parallel": {**resolved["parallel"], "dp": dp},
                "cluster": {**resolved["cluster"], "num_workers": None}}

    @staticmethod
    def _with_faults(resolved: dict, faults: list[FaultSpec], recovering: bool) -> dict:
        """The config a gang gets: the faults still to fire (those during a recovery only when it is one)."""
        pending = [dataclasses.asdict(f) for f in faults if recovering or not f.during_recovery]
        return {**resolved, "fault": {**resolved["fault"], "kill_rank": None, "at_step": None,
                                      "schedule": pending}}

    def _run_once(self, resolved: dict, result: RunResult, progress: ProgressLine, metrics: MetricsLog) -> None:
        cfg, c = self.cfg, self.cfg.cluster
        try:
            group = WorkerGroup(TrainWorker, cfg.world_size, c.cpus_per_worker, c.gpus_per_worker,
                                c.start_timeout_s, c.collective_timeout_s)
        except PlacementError as err:
            raise ConfigError(f"cluster.cpus_per_worker={c.cpus_per_worker}: {err}") from None
        try:
            try:
                infos = group.gather(self._setup_calls(group, resolved))
            except RayError as err:  # a layout the component rejects once built (e.g. fragments vs sync_every)
                if isinstance(err, ValueError) and not isinstance(err, CheckpointError):
                    raise ConfigError(str(err).strip().splitlines()[-1]) from None
                raise
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
                self.recovery["restored_step"] = resumed
            self.state = RunState.RUNNING
            reporters = [info["rank"] for info in infos if info["reports_loss"]]
            finals = self._stream_training(group, reporters, result, progress, metrics)
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
        finally:
            group.shutdown()

    def _offer_level_one(self, record: dict, reports: list[dict]) -> None:
        handed = [r.get("ckpt_handed") for r in reports]
        if all(h is not None for h in handed):
            self.keepers.offer(min(min(handed), record["step"]))
        record["ckpt_l1"], record["ckpt_l2"] = self.keepers.committed, self.keepers.persisted
        record["ckpt_l1_s"] = self.keepers.last_commit_s

    def _setup_calls(self, group: WorkerGroup, resolved: dict) -> list:
        """Each rank gets its node's keeper (level 1 on) and, after a recovery from memory, the keeper that holds
        its snapshot of the version to restore."""
        self._check_node_faults(group, resolved)
        if self.keepers is None:
            return group.call_async("setup", resolved)
        plan, self.restore_plan = self.restore_plan, None
        refs = []
        for rank, actor in enumerate(group.actors):
            keeper = self.keepers.keeper_on(group.infos[rank]["node_id"])
            restore = (plan.version, plan.holders[rank]) if plan is not None else None
            refs.append(actor.setup.remote(resolved, keeper, restore))
        return refs

    @staticmethod
    def _check_node_faults(group: WorkerGroup, resolved: dict) -> None:
        """A node fault on the controller's own node would take the controller down with it."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        for spec in resolved["fault"]["schedule"]:
            if spec["kind"] == "node" and group.infos[spec["rank"]]["node_id"] == here:
                raise ConfigError(f"fault.kind=node: rank {spec['rank']} runs on the controller's node; give the "
                                  f"head node no worker CPUs or fault another rank")

    def _attach_arenas(self, group: WorkerGroup, ranks: Optional[list[int]] = None) -> None:
        """Every rank (or ``ranks``) gets an arena in shared memory from its node's keeper, checked for space
        before training starts, and snapshots into it from then on."""
        ranks = list(range(group.world_size)) if ranks is None else ranks
        by_node: dict[str, dict[int, tuple[int, int]]] = {}
        for rank in ranks:
            by_node.setdefault(group.infos[rank]["node_id"], {})[rank] = self.snapshot_sizes[rank]
        handles = self.keepers.reserve_arenas(by_node)
        group.gather([group.actors[rank].use_keeper.options(concurrency_group="control").remote(
            self.keepers.keeper_on(group.infos[rank]["node_id"]), handles[rank]) for rank in ranks])

    def _replace_lost_keepers(self, group: WorkerGroup, result: RunResult, progress: ProgressLine,
                              metrics: MetricsLog) -> None:
        """After a failed L1 commit: a keeper that died (its node still up) is replaced and its ranks told."""
        if not self.keepers.lost_keepers():
            return
        started = set(self.keepers.refresh())
        ranks = [rank for rank, info in enumerate(group.infos) if info["node_id"] in started]
        self._attach_arenas(group, ranks)
        message = f"keeper of node(s) {', '.join(n[:8] for n in sorted(started))} lost; replaced, ranks {ranks} " \
                  f"hand over to the new one"
        progress.message(message)
        metrics.log({"step": result.steps, "event": "keeper_replaced", "ranks": ranks})

    def _log_interrupted_recovery(self, err: Exception, result: RunResult, metrics: MetricsLog) -> None:
        recovery, self.recovery = self.recovery, None
        recovery["seconds"] = round(time.time() - recovery.pop("started"), 3)
        recovery.pop("last_step")
        recovery["interrupted_by"] = describe_failure(err)
        metrics.log({"step": result.steps, "recovery": recovery})
        self.recoveries.append(recovery)

    def _fault_fired(self, report: dict, progress: ProgressLine, metrics: MetricsLog) -> None:
        spec = FaultSpec(**report["fault"])
        self.fired.append(spec)
        progress.message(f"fault injected: {spec.kind} of rank {spec.rank} before step {spec.at_step}")
        metrics.log({"step": report["step"], "event": "fault", "fault": report["fault"]})

    def _faults_announced_before_failing(self, poll_refs: list, progress: ProgressLine,
                                         metrics: MetricsLog) -> None:
        """The ranks that answered a poll that failed elsewhere may have announced a fault: count it as fired,
        or the recovered gang would fire it again."""
        import ray

        for ref in poll_refs:
            try:
                reports = ray.get(ref, timeout=1.0)
            except Exception:  # noqa: BLE001 - this rank is the one that failed (or is failing)
                continue
            for report in reports:
                if "fault" in report:
                    self._fault_fired(report, progress, metrics)

    def _log_recovery(self, record: dict, progress: ProgressLine, metrics: MetricsLog) -> None:
        """At the first step finished after a recovery: what failed, the source, seconds taken, steps lost."""
        recovery, self.recovery = self.recovery, None
        recovery["seconds"] = round(time.time() - recovery.pop("started"), 3)
        recovery["steps_lost"] = recovery.pop("last_step") - recovery["restored_step"]
        metrics.log({"step": recovery["restored_step"], "recovery": recovery})
        self.recoveries.append(recovery)
        progress.message(f"recovered: rank {recovery['failed_rank']} replaced, step {recovery['restored_step']} "
                         f"restored from {recovery['source']} in {recovery['seconds']:.1f}s, "
                         f"{recovery['steps_lost']} steps redone")

    def _stream_training(self, group: WorkerGroup, reporters: list[int], result: RunResult,
                         progress: ProgressLine, metrics: MetricsLog) -> list[dict]:
        """Stream per-step records until every rank finished; returns what each rank's ``train`` returned."""
        import ray

        tokens_per_step = self.cfg.train.global_batch_size * self.cfg.train.seq_len
        pending_by_step: dict[int, dict[int, dict]] = {}
        # with keepers every rank's handover progress decides what can be committed; faults announce themselves
        everyone = self.keepers is not None or self.cfg.fault.planned()
        polled = list(range(group.world_size)) if everyone else sorted({0, *reporters})
        train_refs = group.call_async("train", self.cfg.train.steps)
        unfinished = list(train_refs)
        while True:
            if unfinished:
                _, unfinished = ray.wait(unfinished, num_returns=len(unfinished), timeout=POLL_INTERVAL_S)
                self._raise_if_failed(group, train_refs, result)
            poll_refs = group.call_async("poll_metrics", ranks=polled, control=True)
            try:
                polls = group.gather(poll_refs)
            except WorkerGroupError:
                self._faults_announced_before_failing(poll_refs, progress, metrics)
                self._raise_if_failed(group, train_refs, result, suspect=True)
                raise
            if self.keepers is not None:
                self._replace_lost_keepers(group, result, progress, metrics)
            for rank, reports in zip(polled, polls):
                for report in reports:
                    if "fault" in report:
                        self._fault_fired(report, progress, metrics)
                        continue
                    pending_by_step.setdefault(report["step"], {})[rank] = report
            for step in sorted(pending_by_step):
                if len(pending_by_step[step]) < len(polled):
                    break
                by_rank = pending_by_step.pop(step)
                reports = [by_rank[r] for r in polled]
                record = aggregate_step(reports, self.start_time, tokens_per_step)
                if self.keepers is not None:
                    self._offer_level_one(record, reports)
                if self.recovery is not None:
                    self._log_recovery(record, progress, metrics)
                if record["step"] <= result.steps:
                    continue  # redone after a recovery: logged already (with the same loss)
                metrics.log(record)
                progress.update(record)
                result.steps, result.final_loss = record["step"], record["loss"]
                if result.first_step_s is None:
                    result.first_step_s = record["wall_time"]
            if not unfinished and not pending_by_step:
                return ray.get(train_refs)

    def _raise_if_failed(self, group: WorkerGroup, train_refs: list, result: RunResult,
                         suspect: bool = False) -> None:
        """A dead rank is the root cause to report; its neighbours' collective errors are only symptoms.
        ``suspect``: another call already saw a dead actor, so wait for its training call to report it."""
        import ray

        failed = [ref for ref in train_refs if ray.wait([ref], timeout=0)[0] and _raises(ref)]
        if not failed and not suspect:
            return
        deadline = time.monotonic() + DEATH_REPORT_GRACE_S
        while (rank := group.rank_of_failure(train_refs)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # a lost node's actors are declared dead only once Ray notices the node is gone: ask every rank
        reported, unresponsive = group.probe(HEALTH_CHECK_TIMEOUT_S)
        dead = sorted({rank} - {None} | set(reported) | set(unresponsive))
        if dead:
            finished, newest = self._survivor_progress(group, dead) or (result.steps, result.steps)
            alive = set(live_node_ids())  # a rank Ray reports dead on a live node lost its process, not its node
            suspect_nodes = [group.infos[r]["node_id"] for r in dead
                             if r in unresponsive or group.infos[r]["node_id"] not in alive]
            raise RankDied(f"rank {dead[0]} died during step {finished + 1}", rank=dead[0], step=finished + 1,
                           finished_step=newest, node_ids=suspect_nodes)
        if failed:
            ray.get(failed[0])  # an application error in a rank: surface its message

    def _survivor_progress(self, group: WorkerGroup, dead_ranks: list[int]) -> Optional[tuple[int, int]]:
        """(newest step every survivor finished, newest step one finished); survivors wait for the dead ranks.
        None when no rank survived or answered."""
        survivors = [r for r in range(group.world_size) if r not in dead_ranks]
        try:
            finished = group.gather(group.call_async("finished_steps", ranks=survivors, control=True), 10.0)
        except Exception:  # noqa: BLE001 - best effort: more ranks may be dying
            return None
        return (min(finished), max(finished)) if finished else None
