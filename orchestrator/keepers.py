"""The controller's side of level 1: one SnapshotKeeper per node, erasure-coded groups, commits, and the level-2
writes the keepers make, all off the training loop (a single background thread).

A version is offered once every rank handed it over and its metrics are logged, so a recovery from the newest
L1-committed version never leaves a gap in metrics.jsonl.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import ray

from checkpoint.keeper import start_keeper
from checkpoint.keeper_group import KeeperGroup, L1CommitError, commit_l1, persist_l2
from orchestrator.config import CheckpointConfig

log = logging.getLogger(__name__)
KEEPER_VERSIONS = 4


class KeeperService:
    def __init__(self, cfg: CheckpointConfig, world_size: int):
        self.cfg, self.world_ranks = cfg, list(range(world_size))
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        # Hold a few versions: a version handed over while the previous commit runs must still be there to seal.
        self.keepers = {node: start_keeper(node, keep=KEEPER_VERSIONS) for node in nodes}
        ordered = [self.keepers[node] for node in nodes]
        size = cfg.ec.group_size or len(ordered)
        chunks = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        self.groups = [KeeperGroup(chunk, parity=min(cfg.ec.parity, len(chunk) - 1)) for chunk in chunks]
        self.rank_keeper: dict[int, object] = {}  # the keeper each rank of the current gang hands over to
        self.committed: Optional[int] = None  # newest L1-committed version
        self.persisted: Optional[int] = None  # newest version the keepers committed to disk
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="l1-commit")
        self._job: Optional[Future] = None

    def keeper_on(self, node_id: str):
        return self.keepers[node_id]

    def offer(self, version: int) -> None:
        """Commit ``version`` in the background unless a commit is running or it is not newer."""
        if (self._job is not None and not self._job.done()) or (self.committed or 0) >= version:
            return
        self._job = self._pool.submit(self._commit, version)

    def _commit(self, version: int) -> None:
        try:
            commit_l1(self.groups, version, self.world_ranks)
        except L1CommitError as err:
            log.warning("%s", err)
            return
        previous, self.committed = self.committed or 0, version
        c = self.cfg
        cadence = c.every * c.persist_every
        if cadence and version // cadence > previous // cadence:  # crossed a persist boundary
            keepers = list(self.keepers.values())
            ray.get(persist_l2(keepers, version, c.dir, self.world_ranks, c.keep))
            self.persisted = version

    def holds(self, rank: int) -> bool:
        """Whether the keeper that holds ``rank``'s snapshots still answers (a process died, not its node)."""
        keeper = self.rank_keeper.get(rank)
        if keeper is None:
            return False
        try:
            ray.get(keeper.ping.remote(), timeout=10)
            return True
        except Exception:  # noqa: BLE001 - dead or unreachable: fall back to another source
            return False

    def forget_after(self, version: int) -> None:
        """Before a restored gang hands over again: drop what the failed gang handed over after ``version``."""
        self.drain()
        for keeper in self.keepers.values():
            try:
                newer = [v for v in ray.get(keeper.versions.remote(), timeout=10) if v > version]
                ray.get([keeper.discard.remote(v) for v in newer], timeout=10)
            except Exception as err:  # noqa: BLE001 - a lost keeper holds nothing to forget
                log.warning("keeper unreachable while forgetting versions after %d: %s", version, err)

    def drain(self) -> None:
        if self._job is not None:
            self._job.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        for keeper in self.keepers.values():
            ray.kill(keeper, no_restart=True)
