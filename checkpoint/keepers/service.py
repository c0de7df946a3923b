"""The controller's side of level 1: one SnapshotKeeper per node, erasure-coded groups, commits, the level-2
writes the keepers make (all off the training loop, on one background thread), and restore plans after a failure.

A version is offered once every rank handed it over and its metrics are logged, so a recovery from a version the
keepers hold never leaves a gap in metrics.jsonl.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import ray

from orchestrate.checkpoint.keepers.keeper import start_keeper
from orchestrate.checkpoint.keepers.liveness import PING_TIMEOUT_S, KeeperWatch, keeper_answers
from orchestrate.checkpoint.keepers.group import GroupLostError, KeeperGroup, L1CommitError, commit_l1, persist_l2
from orchestrate.checkpoint.keepers.settings import KeeperSettings

log = logging.getLogger(__name__)
KEEPER_START_TIMEOUT_S = 60.0  # a new actor process: seconds on a busy node


@dataclass
class RestorePlan:
    """Where every rank of a recovering gang reads its snapshot of ``version``."""

    version: int
    source: str  # "keeper": handed-over snapshots, nothing decoded; "parity": lost nodes' ranks decoded
    holders: dict[int, Any]  # rank -> keeper that holds its snapshot
    decoded_ranks: list[int]


class KeeperService:
    def __init__(self, cfg: KeeperSettings, world_size: int, live_nodes: Callable[[], Iterable[str]],
                 node_answers: Callable[[str], bool]):
        """``live_nodes``/``node_answers``: the cluster's view of its nodes (the keepers get one on every live node
        that answers)."""
        self.cfg, self.world_ranks = cfg, list(range(world_size))
        self._live_nodes, self._node_answers = live_nodes, node_answers
        self.keepers: dict[str, Any] = {}  # node id -> keeper
        self.groups: list[KeeperGroup] = []
        self._regroup = False
        # at the start every node Ray lists has just joined: no task probes them (the probe's task leaves an idle
        # Ray worker on each node, which wakes up all run long); a node that is already gone gets no keeper anyway,
        # as its keeper does not answer the first ping in time
        self.refresh(probe_nodes=False)
        self.committed: Optional[int] = None  # newest L1-committed version
        self.committed_groups: list[KeeperGroup] = []  # the groups it was encoded in
        self.persisted: Optional[int] = None  # newest version the keepers committed to disk
        self.last_commit_s: Optional[float] = None  # seconds the newest L1 commit took (seal + encode + mark)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="l1-commit")
        self._job: Optional[Future] = None
        self._wanted: Optional[int] = None  # newest version offered
        self._next_commit_at = 0.0  # monotonic time before which no new commit starts
        self._commit_seconds: deque[float] = deque(maxlen=6)  # durations of the latest commits
        self._watch = KeeperWatch()
        self._persist_pool = ThreadPoolExecutor(1, thread_name_prefix="l2-from-keepers")
        self._persist: Optional[Future] = None
        self._persist_target: Optional[int] = None  # newest version a level-2 write was started for

    # ------------------------------------------------------------------ membership

    def refresh(self, probe_nodes: bool = True) -> list[str]:
        """Drop keepers that do not answer, start one on every live node without one, and re-form the groups if
        that changed anything; returns the nodes that got a new keeper. Versions encoded in earlier groups stay
        decodable (each keeper remembers the group a version was encoded in). ``probe_nodes``: start keepers
        only on nodes that run a task now."""
        self.drain()
        dead = [node for node, keeper in self.keepers.items() if not keeper_answers(keeper)]
        for node in dead:
            ray.kill(self.keepers.pop(node), no_restart=True)
        # a node that is gone but not declared dead yet would leave its keeper pending, and every commit and group
        # that includes it waiting: only nodes that run a task now get one
        missing = [node for node in self._live_nodes() if node not in self.keepers]
        candidates = {node: start_keeper(node, self.cfg.shm_dir, self.cfg.slots)
                      for node in missing if not probe_nodes or self._node_answers(node)}
        started = []
        for node, keeper in candidates.items():
            try:
                ray.get(keeper.ping.remote(), timeout=KEEPER_START_TIMEOUT_S)
                self.keepers[node] = keeper
                started.append(node)
            except ray.exceptions.RayError as err:
                log.warning("no keeper on node %s: it did not start (%s)", node[:8], type(err).__name__)
                ray.kill(keeper, no_restart=True)
        if dead or started or self._regroup:
            self._regroup = True  # until the groups are formed: a member may die while they form
            self._form_groups()
            self._regroup = False
        return sorted(started)

    def _form_groups(self) -> None:
        ordered = [self.keepers[node] for node in sorted(self.keepers)]
        size = self.cfg.group_size or len(ordered)
        chunks = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        self.groups = [KeeperGroup(chunk, parity=min(self.cfg.parity, len(chunk) - 1)) for chunk in chunks]

    def keeper_on(self, node_id: str):
        """The keeper of a worker's node; one that did not start in time (a busy node) gets one more try."""
        if node_id not in self.keepers:
            self.refresh()
        if node_id not in self.keepers:
            raise RuntimeError(f"no snapshot keeper runs on node {node_id[:8]}: it did not answer within "
                               f"{KEEPER_START_TIMEOUT_S:.0f}s of starting, twice; set checkpoint.keepers=false to "
                               f"train without in-memory snapshots")
        return self.keepers[node_id]

    def reserve_arenas(self, sizes_by_node: dict[str, dict[int, tuple[int, int]]]) -> dict[int, dict]:
        """rank -> handle of its shared-memory arena, from the keeper of its node. ``sizes_by_node``: node ->
        rank -> (payload, metadata) bytes of its largest snapshot. A node short of shared memory raises
        ShmSpaceError (one line: needed, free, what to set) before anything is allocated on it."""
        nodes = sorted(sizes_by_node)
        answers = ray.get([self.keepers[node].reserve.remote(sizes_by_node[node]) for node in nodes])
        return {rank: handle for answer in answers for rank, handle in answer.items()}

    def memory(self) -> dict[str, dict]:
        """node -> the keeper's arena, parity, resident and protected-state bytes, of the keepers that answer (a
        report, not worth failing a run for: a node lost after the last step leaves its keeper out)."""
        nodes = sorted(self.keepers)
        refs = [self.keepers[node].memory.remote() for node in nodes]
        answers = {}
        for node, ref in zip(nodes, refs):
            try:
                answers[node] = ray.get(ref, timeout=PING_TIMEOUT_S)
            except ray.exceptions.RayError as err:
                log.warning("the keeper on node %s did not report its memory: %s", node[:8], type(err).__name__)
        return answers

    # ------------------------------------------------------------------ commits

    def offer(self, version: int, now: bool = False) -> None:
        """Commit ``version`` in the background, or the newest version every rank still holds. Commits are spaced
        so that they take at most ``checkpoint.ec.commit_share`` of the wall time (they share CPUs and network with
        training; on steps long enough, every step is committed;
        ``now`` skips the wait, e.g. for the final version). Without parity anywhere (one node, or
        ``checkpoint.ec.parity=0``) a commit protects nothing a handed-over version does not: only versions due
        on disk are committed then."""
        self._wanted = max(self._wanted or 0, version)
        # a version due on disk is not spaced: trainers keep it in a slot until it is committed
        due = now or self._disk_due(version) or (time.monotonic() >= self._next_commit_at and self._protects_nodes)
        if due and (self._job is None or self._job.done()) and (self.committed or 0) < version:
            self._job = self._pool.submit(self._commit_newest)

    @property
    def _protects_nodes(self) -> bool:
        return any(group.layout.parity for group in self.groups)

    def _disk_due(self, version: int) -> bool:
        cadence = self.cfg.disk_cadence
        return bool(cadence) and version // cadence > (self._persist_target or 0) // cadence

    def commit_final(self, version: int, attempts: int = 3) -> None:
        """Commit (and, at a level-2 boundary, persist) the last version of a run before it ends; a version due on
        disk that was not written yet goes first."""
        for _ in range(attempts):
            self.drain()
            if (self.committed or 0) >= version:
                return
            self.offer(version, now=True)
        self.drain()

    def _commit_newest(self) -> None:
        wanted = self._wanted
        if wanted is not None and (self.committed or 0) < wanted:
            version = self._newest_complete(wanted)
            if version is not None:
                self._commit(version)

    def _newest_complete(self, limit: int, disk_due_first: bool = True) -> Optional[int]:
        """The version to commit: the newest up to ``limit`` (offered: handed over and logged) that the keepers
        hold every rank of right now (a trainer overwrites its oldest unclaimed version when its slots are full),
        unless (``disk_due_first``) a version due on disk (a multiple of every * persist_every, which trainers do
        not overwrite) is complete: that one first, so level 2 holds exactly those steps."""
        keepers = [k for group in self.groups for k in group.keepers]
        try:
            holders_of = self._holders(keepers)
        except ray.exceptions.RayError as err:
            log.warning("asking the keepers what they hold failed: %s", err)
            self._watch.check_soon()
            return None
        complete = self._complete(holders_of, (self.committed or 0) + 1, limit)
        cadence = self.cfg.disk_cadence
        due_on_disk = [v for v in complete if cadence and v % cadence == 0 and v > (self._persist_target or 0)]
        return min(due_on_disk) if due_on_disk and disk_due_first else max(complete, default=None)

    @staticmethod
    def _holders(keepers: list, answered: Optional[list] = None) -> dict[int, dict[int, Any]]:
        """version -> rank -> the keeper that holds its handed-over snapshot. With ``answered``, a keeper that
        fails to answer (it died since it was last seen) is left out, and the ones that answered are listed
        there; without it, the failure is raised."""
        holders_of: dict[int, dict[int, Any]] = {}
        refs = [keeper.held_ranks.remote() for keeper in keepers]
        for keeper, ref in zip(keepers, refs):
            try:
                versions = ray.get(ref, timeout=PING_TIMEOUT_S)
            except ray.exceptions.RayError:
                if answered is None:
                    raise
                continue
            if answered is not None:
                answered.append(keeper)
            for version, ranks in versions.items():
                holders_of.setdefault(version, {}).update({rank: keeper for rank in ranks})
        return holders_of

    def _complete(self, holders_of: dict[int, dict[int, Any]], lowest: int, limit: int) -> list[int]:
        """Versions in [lowest, limit] held for every rank."""
        return [v for v, holders in holders_of.items()
                if lowest <= v <= limit and len(holders) == len(self.world_ranks)]

    def save_now(self, logged_step: int) -> Optional[int]:
        """Commit and write to disk the newest version every rank handed over, not newer than ``logged_step``
        (a run interrupted by Ctrl-C or SIGTERM); trainers go on meanwhile. The version on disk, or None."""
        self.drain()
        newest = self._newest_complete(logged_step, disk_due_first=False)
        if newest is not None and newest > (self.committed or 0) and self._commit(newest, persist=True):
            self.drain()
            return self.persisted
        if self.committed is not None and self.committed != self.persisted:
            self._write_l2([keeper for group in self.committed_groups for keeper in group.keepers], self.committed)
        return self.persisted

    def _commit(self, version: int, persist: bool = False) -> bool:
        cadence = self.cfg.disk_cadence
        if cadence and version % cadence == 0 and self._persist is not None:
            # a version due on disk waits (on this background thread; its trainers keep it in a slot) for the
            # previous level-2 write rather than being committed without one: disk holds exactly those steps
            wait([self._persist])
        groups, start = list(self.groups), time.perf_counter()
        persist = persist or self._persist_due(version)
        try:
            commit_l1(groups, version, self.world_ranks, pin=persist)
        except L1CommitError as err:
            log.warning("%s", err)
            self._watch.check_soon()
            return False
        self.committed, self.committed_groups = version, groups
        self.last_commit_s = time.perf_counter() - start
        self._commit_seconds.append(self.last_commit_s)
        if len(self._commit_seconds) > 1:  # the first commit is slow (keepers warm up): not a measure
            typical = statistics.median(list(self._commit_seconds)[1:])
            self._next_commit_at = time.monotonic() + typical * (1 / self.cfg.commit_share - 1)
        if persist:
            self._persist_target = version
            keepers = [keeper for group in groups for keeper in group.keepers]
            self._persist = self._persist_pool.submit(self._write_l2, keepers, version)
        return True

    def _persist_due(self, version: int) -> bool:
        """Whether committing ``version`` crosses a level-2 boundary (every ``every * persist_every`` steps) while
        no level-2 write runs (else the next boundary writes a newer one)."""
        cadence = self.cfg.disk_cadence
        previous = self._persist_target or self.committed or 0
        return bool(cadence) and version // cadence > previous // cadence and (
            self._persist is None or self._persist.done())

    def _write_l2(self, keepers: list, version: int) -> None:
        """Level 2 on its own thread: commits of newer versions go on while the keepers write this one (a
        keeper holds references to what it writes, so a commit that drops the version does not free it)."""
        c = self.cfg
        try:
            ray.get(persist_l2(keepers, version, c.dir, self.world_ranks, c.keep))
            self.persisted = version
        except ray.exceptions.RayError as err:
            log.warning("level-2 write of version %d from the keepers failed: %s", version, err)

    def lost_keepers(self) -> list[str]:
        """Nodes whose keeper stopped answering, without waiting for an answer (liveness.py says why): pinged
        after a failed commit, and every few seconds (a single node commits rarely, so a failed commit would
        come late)."""
        return self._watch.lost(self.keepers)

    # ------------------------------------------------------------------ recovery

    def plan_restore(self, logged_step: int) -> Optional[RestorePlan]:
        """The fastest in-memory source for every rank, or None (restore from disk).

        First the newest version not newer than ``logged_step`` that live keepers hold for every rank as handed
        over (a process died: no decoding, and at most the unlogged steps are redone); else the newest committed
        version, with the ranks of lost keepers decoded by a surviving member of their group."""
        self.drain()
        live: list = []
        holders_of = self._holders([k for k in self.keepers.values() if keeper_answers(k)], answered=live)
        newest = max(self._complete(holders_of, 0, logged_step), default=None)
        if newest is not None:
            return RestorePlan(newest, "keeper", holders_of[newest], [])
        if self.committed is None:
            return None
        return self._decode_plan(self.committed, dict(holders_of.get(self.committed, {})),
                                 {_actor_id(k) for k in live})

    def _decode_plan(self, version: int, holders: dict[int, Any], live_ids: set[str]) -> Optional[RestorePlan]:
        decoded: list[int] = []
        for group in self.committed_groups:
            for member, keeper in enumerate(group.keepers):
                if _actor_id(keeper) in live_ids:
                    continue
                try:
                    survivor, ranks = group.restore(version, member)
                except GroupLostError as err:
                    log.warning("in-memory restore of version %d impossible: %s", version, err)
                    return None
                holders.update({rank: survivor for rank in ranks})
                decoded += ranks
        if sorted(holders) != self.world_ranks:
            log.warning("keepers hold ranks %s of version %d, not all %d", sorted(holders), version,
                        len(self.world_ranks))
            return None
        return RestorePlan(version, "parity", holders, sorted(decoded))

    def forget_after(self, version: int) -> None:
        """Before a restored gang hands over again: drop what the failed gang handed over after ``version``. The
        commit spacing starts afresh (commits that ran into the failure took long and say nothing)."""
        self._wanted, self._next_commit_at = None, 0.0
        self._commit_seconds.clear()
        self.drain()
        for keeper in self.keepers.values():
            try:
                newer = [v for v in ray.get(keeper.versions.remote(), timeout=PING_TIMEOUT_S) if v > version]
                ray.get([keeper.discard.remote(v) for v in newer], timeout=PING_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - a lost keeper holds nothing to forget
                log.warning("keeper unreachable while forgetting versions after %d: %s", version, err)

    def prepare_restore(self, version: Optional[int], world_size: int) -> None:
        """Before a recovering gang starts: the keepers forget what the failed gang handed over after the restored
        ``version`` (None: the run restores from disk a version older than they hold, so they start afresh) and a
        keeper starts on every live node without one."""
        if version is None:
            self.reset(world_size)
        else:
            self.forget_after(version)
            self.refresh()

    def reset(self, world_size: int) -> None:
        """Start over with empty keepers (the run restores from disk a version older than they hold, maybe on a
        smaller layout)."""
        self._wanted, self._next_commit_at = None, 0.0
        self._commit_seconds.clear()
        self.drain()
        self.world_ranks = list(range(world_size))
        for keeper in self.keepers.values():
            ray.kill(keeper, no_restart=True)
        self.keepers, self.committed, self.committed_groups = {}, None, []
        self.refresh()

    def drain(self) -> None:
        """Wait for the running commit and level-2 write."""
        for name in ("_job", "_persist"):  # in this order: a commit may start a level-2 write
            job = getattr(self, name, None)
            if job is not None:
                job.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._persist_pool.shutdown(wait=True)
        for keeper in self.keepers.values():
            ray.kill(keeper, no_restart=True)


def _actor_id(keeper) -> str:
    return keeper._actor_id.hex()
