"""Where every rank of a recovering gang gets the state it rolls back to, fastest source first (docs/recovery.md
section 3): a surviving data-parallel replica -> the lost rank's own keeper -> parity decoded in its group ->
disk. Surviving ranks keep their processes and roll back to their own snapshot in memory; only lost ranks are
started anew. Plain decisions over what the controller gathered, so they are tested without a cluster.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from orchestrate.checkpoint.universal import committed_versions, version_dir
from orchestrate.config import Config, ConfigError, FaultConfig, derive, validate


@dataclass
class RecoveryPlan:
    """``sources``: rank -> how it restores ``version``: ``("own", v)`` (a survivor's own snapshot in memory),
    ``("replica", v, rank)`` (that surviving replica sends its snapshot) or ``("keeper", v, keeper)``. With
    ``disk`` set, every rank (survivors too) loads that universal checkpoint instead."""

    source: str  # "replica", "keeper", "parity" or "disk": where the lost ranks' state comes from
    version: Optional[int] = None
    sources: dict[int, tuple] = field(default_factory=dict)
    disk: Optional[Path] = None
    decoded_ranks: list[int] = field(default_factory=list)


def replica_of(rank: int, coords: list[dict[str, int]], survivors: list[int]) -> Optional[int]:
    """A surviving rank holding the same state as ``rank`` when replicas are identical: the same pipeline stage
    and tensor-parallel shard (data- and context-parallel ranks of DDP hold the same parameters)."""
    same = [r for r in survivors if (coords[r]["pp"], coords[r]["tp"]) == (coords[rank]["pp"], coords[rank]["tp"])]
    return min(same) if same else None


def versions_held_by_all(held: Iterable[list[int]], logged_step: int) -> list[int]:
    """Versions (ascending) that every holder in ``held`` has, not newer than the last logged step (the steps
    after it are redone, so their metrics are logged once, whole)."""
    sets = [set(versions) for versions in held]
    return sorted(v for v in set.intersection(*sets) if v <= logged_step) if sets else []


def plan_from_replicas(lost: list[int], held: dict[int, list[int]], coords: list[dict[str, int]],
                       logged_step: int) -> Optional[RecoveryPlan]:
    """Every lost rank takes a surviving replica's snapshot of the newest version all survivors hold that is not
    newer than the last logged step (the steps after it are redone, so their metrics are logged once, whole)."""
    survivors = sorted(held)
    replicas = {rank: replica_of(rank, coords, survivors) for rank in lost}
    if not survivors or None in replicas.values():
        return None
    usable = versions_held_by_all(held.values(), logged_step)
    if not usable:
        return None
    version = usable[-1]
    sources = {rank: ("own", version) for rank in survivors}
    sources.update({rank: ("replica", version, replicas[rank]) for rank in lost})
    return RecoveryPlan("replica", version, sources)


def plan_from_keepers(keeper_plan, held: dict[int, list[int]], world_size: int) -> RecoveryPlan:
    """The keepers' plan (``KeeperService.plan_restore``): survivors still read their own memory when it holds
    the version (it is the very arena the keeper owns), the others read from the keeper that holds their part."""
    version = keeper_plan.version
    sources = {rank: ("own", version) if version in held.get(rank, []) else
               ("keeper", version, keeper_plan.holders[rank]) for rank in range(world_size)}
    return RecoveryPlan(keeper_plan.source, version, sources, decoded_ranks=list(keeper_plan.decoded_ranks))


def plan_recovery(lost: list[int], held: dict[int, list[int]], coords: list[dict[str, int]], logged_step: int,
                  heals_from_replicas: bool, keeper_plan: Callable[[], Any],
                  disk_source: Callable[[], Optional[Path]]) -> Optional[RecoveryPlan]:
    """The fastest plan that restores every rank to one version, or None (nothing to restore from).
    ``held``: surviving rank -> versions in its own memory. ``keeper_plan()`` and ``disk_source()`` are asked
    only when the faster sources cannot serve (asking the keepers may decode a lost node's ranks)."""
    if heals_from_replicas:
        plan = plan_from_replicas(lost, held, coords, logged_step)
        if plan is not None:
            return plan
    from_keepers = keeper_plan()
    if from_keepers is not None:
        return plan_from_keepers(from_keepers, held, len(coords))
    disk = disk_source()
    return RecoveryPlan("disk", disk=disk) if disk is not None else None


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


def plan_after_failure(checkpoint_dir: str, lost: list[int], held: dict[int, list[int]], logged_step: int,
                       elastic: bool, setup_infos: list[dict],
                       keeper_plan: Optional[Callable[[int], Any]]) -> Optional[RecoveryPlan]:
    """``plan_recovery`` for the gang the controller started (``setup_infos``: what each rank's setup returned;
    ``keeper_plan``: the keepers' ``plan_restore``, None without keepers). ``elastic``: the gang restarts on
    another layout, which only the universal checkpoints on disk can restore."""
    def from_disk():
        return recovery_source(checkpoint_dir, logged_step)

    if elastic:
        disk = from_disk()
        return RecoveryPlan("disk", disk=disk) if disk else None
    coords = [info["coords"] for info in setup_infos]
    heals = bool(setup_infos) and all(info["heals_from_replicas"] for info in setup_infos)
    return plan_recovery(lost, held, coords, logged_step, heals,
                         lambda: keeper_plan(logged_step) if keeper_plan else None, from_disk)


@dataclass
class RecoveryRecord:
    """One recovery, as metrics.jsonl records it (``recovery``) at the first step finished after it, or when
    another fault cut it short (``interrupted_by``)."""

    failed_rank: Optional[int]
    restarted_ranks: list[int]  # started anew
    kept_ranks: list[int]  # survivors that kept their processes
    lost_nodes: list[str]
    source: str  # "replica", "keeper", "parity" or "disk"
    version: Union[int, str, None]  # the version restored from memory, or the version directory on disk
    decoded_ranks: list[int]
    detected_at: float  # when the controller attributed the failure
    started: float  # when the failure happened, as near as known (not logged: ``seconds`` counts from it)
    last_step: int  # the newest step finished before the failure (not logged: ``steps_lost`` counts to it)
    restored_step: Optional[int] = None
    elastic: Optional[dict] = None  # a smaller data-parallel degree: {"dp_from", "dp_to"}
    seconds: Optional[float] = None  # from the failure to the end of the first step after the recovery
    resumed_at: Optional[float] = None
    steps_lost: Optional[int] = None  # steps redone
    interrupted_by: Optional[str] = None

    def finish(self, step_end: float) -> None:
        """At the end of the first step finished after the recovery (the workers' clock)."""
        self.seconds = round(step_end - self.started, 3)
        self.resumed_at = step_end
        self.steps_lost = self.last_step - self.restored_step

    def cut_short(self, by: str, now: float) -> None:
        self.seconds = round(now - self.started, 3)
        self.interrupted_by = by

    def to_metrics(self) -> dict:
        optional = ("restored_step", "elastic", "seconds", "resumed_at", "steps_lost", "interrupted_by")
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("started", "last_step") and not (k in optional and v is None)}


def failure_time(last_reports: dict[int, float], lost: list[int], detected: float) -> float:
    """When the failure happened, as near as the controller can tell: the end of the newest step a lost rank
    reported (the kill came after it), not later than the moment it was detected."""
    reported = [last_reports[r] for r in lost if r in last_reports]
    return min(detected, max(reported)) if reported else detected


def data_parallel_that_fits(cfg: Config, slots: int) -> Optional[int]:
    """Elastic shrink after a node loss: the largest data-parallel degree below ``cfg``'s whose gang fits in
    ``slots`` workers and is a valid layout; None if there is none."""
    for dp in range(cfg.parallel.dp - 1, 0, -1):
        # faults of ranks the smaller gang lacks are dropped, not invalid
        candidate = derive(cfg, {"parallel.dp": dp, "cluster.num_workers": None, "fault": FaultConfig()})
        try:
            validate(candidate)
        except ConfigError:
            continue
        if candidate.world_size <= slots:
            return dp
    return None
