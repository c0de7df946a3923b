"""What the keepers need to know of a run: their own settings type, so the keepers' code depends on nothing above
it (the run's config section is translated into it by the controller)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeeperSettings:
    dir: str  # the level-2 root the keepers write committed versions to
    every: int  # steps between snapshots
    persist_every: int  # every K-th snapshot goes to disk; 0: never
    keep: int  # committed versions kept on disk
    shm_dir: str  # the tmpfs the arenas live in
    slots: int  # versions each rank's arena holds
    group_size: int = 0  # keepers per erasure-coded group; 0: all nodes in one group
    parity: int = 1  # members a group may lose (capped at group size - 1)
    commit_share: float = 0.25  # most of the wall time level-1 commits may take

    @property
    def disk_cadence(self) -> int:
        """Steps between versions due on disk; 0: none."""
        return self.every * self.persist_every
