"""The lazy asynchronous multi-level checkpoint engine (docs/checkpointing.md).

Trainer integration (the training-step contract)::

    loss = forward_backward(batch)          # meanwhile the engine copies version step-1 into the host arena
    sync.before_optimizer(step)
    engine.wait_until_copied()              # blocks only if that copy is unfinished
    optimizer.step(); sync.after_optimizer(step)
    engine.snapshot(step, state_fn, trainer_state)   # cheap: captures references, starts the copy

The lazy contract: ``snapshot`` does not copy. It records the tensors ``state_fn`` returns and a background thread
copies them into the arena. Until ``wait_until_copied`` returns, the caller must not mutate those tensors
(parameters, optimizer moments, sync state); reading them (forward/backward) is fine. This holds naturally when
``wait_until_copied`` sits right before ``optimizer.step()``.

Levels: L0 is the arena: a HostArena in this process, or (keepers on) a slot of this rank's arena in node-local
shared memory that the node's keeper owns (checkpoint/keepers/arena.py); that copy is the only one. Every ``persist_every``-th snapshot is handed to a persister (L2:
``UniversalPersister`` writes the universal format) on another thread, from the arena copy, never from live
tensors. While a persist reads the arena, the next copy waits for it (back-pressure, as a full host pool does in
DataStates-LLM) instead of skipping: every rank then snapshots and persists the same versions, which a
distributed commit needs. A persist that is slower than ``persist_every`` snapshots therefore shows up as
trainer blocked time in ``stats``.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

from orchestrate.checkpoint.arena import HostArena
from orchestrate.checkpoint.identity_memo import IdentityMemo
from orchestrate.checkpoint.universal import (CheckpointError, FragmentSpec, TrainerState, commit_version, version_dir,
                                              wait_for_ranks)
from orchestrate.checkpoint.universal_tensors import write_fragments

StateFn = Callable[[], Iterable[FragmentSpec]]


def check_cadence(every: int, persist_every: int) -> None:
    """The engine's cadence, named by the keys of the ``checkpoint`` config section that set it."""
    for key, value, minimum in (("every", every, 1), ("persist_every", persist_every, 0)):
        if not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"checkpoint.{key}={value!r}: must be an integer >= {minimum}")


class SnapshotTarget(Protocol):
    """Where level 0 lives: a HostArena in this process, or a keeper's shared-memory arena (ArenaWriter)."""

    reported_step: Optional[int]  # the newest step whose report the controller took: a full arena spares it

    def copy_version(self, version: int, fragments: list[FragmentSpec], trainer_state: TrainerState) -> bool: ...

    def copies_little(self, version: int, fragments: list[FragmentSpec]) -> bool:
        """Whether copying ``version`` is so little work (the step wrote the state into its place) that handing
        it to the copy thread would cost the training thread more than doing it."""
        ...


class Persister(Protocol):
    def persist(self, version: int, fragments: list[FragmentSpec], trainer_state: TrainerState) -> None: ...

    def close(self) -> None: ...

    def abandon(self) -> None: ...


@dataclass
class SnapshotStats:
    version: int
    blocked_s: float = 0.0  # trainer time spent in snapshot() plus wait_until_copied() for this version
    persist_wait_s: float = 0.0  # copy thread waiting for the previous persist to release the arena
    copy_s: float = 0.0
    copied: bool = False  # False when the target skipped this version (every shared-memory slot still held)
    persist_s: Optional[float] = None  # None when this version was not persisted (or not yet)


class _StateFreezer:
    """Deep copies of the trainer state taken at snapshot time; the JSON round trip also rejects non-JSON values
    early. The run's config (the largest part) is copied once per config object: it does not change during a
    run, and copying it on every step cost the training thread more than a small model's snapshot."""

    def __init__(self):
        self._config_source: Optional[dict] = None
        self._config_copy: dict = {}

    def __call__(self, trainer_state: TrainerState) -> TrainerState:
        if trainer_state.config is not self._config_source:
            self._config_source = trainer_state.config
            self._config_copy = json.loads(json.dumps(trainer_state.config))
        rest = {f.name: getattr(trainer_state, f.name) for f in fields(trainer_state) if f.name != "config"}
        return TrainerState.from_json({**json.loads(json.dumps(rest)), "config": self._config_copy})


class CheckpointEngine:
    def __init__(self, arena: SnapshotTarget, every: int = 1, persist_every: int = 0,
                 persister: Optional[Persister] = None, history: int = 1024):
        check_cadence(every, persist_every)
        if persist_every and persister is None:
            raise CheckpointError("checkpoint.persist_every > 0 needs a persister")
        if persist_every and not isinstance(arena, HostArena):
            raise CheckpointError("the engine persists from a HostArena; a keeper's arena is persisted by the keeper")
        self.arena = arena
        self.every = every
        self.persist_every = persist_every
        self.persister = persister
        self.stats: deque[SnapshotStats] = deque(maxlen=history)
        self.copied_version: Optional[int] = None
        self.persisted_version: Optional[int] = None
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="ckpt-copy")
        self._freeze = _StateFreezer()
        self._checked = IdentityMemo()  # lists of fragments whose keys were found distinct
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckpt-persist")
        self._copy: Optional[Future] = None
        self._persist: Optional[Future] = None

    # ------------------------------------------------------------------ trainer-thread API

    def is_due(self, step: int) -> bool:
        return step % self.every == 0

    def will_persist(self, step: int) -> bool:
        """Decided from the step alone so that every rank persists the same versions."""
        return bool(self.persist_every) and step % (self.every * self.persist_every) == 0

    def snapshot(self, step: int, state_fn: StateFn, trainer_state: Optional[TrainerState] = None) -> bool:
        """Mark version ``step`` and start copying it in the background; False when no snapshot is due.

        ``state_fn`` runs here, on the trainer thread, and must only collect references (no copies)."""
        if not self.is_due(step):
            return False
        started = time.perf_counter()
        self.wait_until_copied()
        fragments = list(state_fn())
        if self._checked.get(fragments) is None:  # the caller reuses its fragments: each list is checked once
            if len({fragment.key for fragment in fragments}) != len(fragments):
                raise CheckpointError(f"snapshot {step}: state_fn returned the same fragment key twice")
            self._checked.put(fragments, True)
        stats = SnapshotStats(step)
        self.stats.append(stats)
        state = self._freeze(trainer_state if trainer_state is not None else TrainerState(step=step))
        job = (stats, fragments, state, self.will_persist(step))
        if self.arena.copies_little(step, fragments):
            # a thread's wake-up and its turns at the GIL cost the training thread more than a few step counts
            self._copy_job(*job)
        else:
            self._copy = self._copier.submit(self._copy_job, *job)
        stats.blocked_s += time.perf_counter() - started
        return True

    def wait_until_copied(self) -> None:
        """Return once the last snapshot is in the arena; re-raises a failed copy or persist."""
        if self._copy is None:
            return
        started = time.perf_counter()
        try:
            self._copy.result()
        finally:
            self._copy = None
            self.stats[-1].blocked_s += time.perf_counter() - started

    def close(self) -> None:
        """Finish the outstanding copy and persist, then close the persister."""
        try:
            self.wait_until_copied()
            if self._persist is not None:
                self._persist.result()
        finally:
            self._copier.shutdown(wait=True)
            self._writer.shutdown(wait=True)
            if self.persister is not None:
                self.persister.close()

    def abandon(self) -> None:
        """Stop after a failure elsewhere in the gang: finish the running copy (the arena then holds a whole
        version), let a running disk write end, and give up a commit still waiting for other ranks' parts."""
        try:
            self.wait_until_copied()
        except Exception:  # noqa: BLE001 - a failed copy leaves an older version in the arena: still usable
            pass
        if self.persister is not None:
            self.persister.abandon()
        self._copier.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def __enter__(self) -> "CheckpointEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ background threads

    def _copy_job(self, stats: SnapshotStats, fragments: list[FragmentSpec], state: TrainerState,
                  persist: bool) -> None:
        started = time.perf_counter()
        self._release_arena()
        copied = time.perf_counter()
        stats.persist_wait_s = copied - started
        stats.copied = self.arena.copy_version(stats.version, fragments, state)
        stats.copy_s = time.perf_counter() - copied
        if not stats.copied:
            return
        self.copied_version = stats.version
        if persist:
            held = [replace(fragment, tensor=self.arena.buffers[fragment.key]) for fragment in fragments]
            self._persist = self._writer.submit(self._persist_job, stats, held, state)

    def _release_arena(self) -> None:
        """Wait until the previous persist no longer reads the arena; its failure surfaces here."""
        if self._persist is None:
            return
        try:
            self._persist.result()
        finally:
            self._persist = None

    def _persist_job(self, stats: SnapshotStats, fragments: list[FragmentSpec], state: TrainerState) -> None:
        started = time.perf_counter()
        self.persister.persist(stats.version, fragments, state)
        stats.persist_s = time.perf_counter() - started
        self.persisted_version = stats.version


class UniversalPersister:
    """L2: writes this rank's part of a version in the universal format; the coordinator commits it.

    The coordinator (by default the lowest rank) commits on its own thread once every rank's index exists, so
    waiting for slower ranks never holds the arena. Without a shared directory, or when a controller owns
    commits, pass ``coordinator=False`` everywhere and call ``universal.commit_version`` from the controller."""

    def __init__(self, root: str | Path, rank: int = 0, world_ranks: Sequence[int] = (0,), keep: int = 2,
                 coordinator: Optional[bool] = None, commit_timeout_s: float = 600.0):
        self.root = Path(root)
        self.rank = rank
        self.world_ranks = tuple(world_ranks)
        self.keep = keep
        self.coordinator = rank == min(self.world_ranks) if coordinator is None else coordinator
        self.commit_timeout_s = commit_timeout_s
        self.committed_version: Optional[int] = None
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit") if self.coordinator else None
        self._commits: list[Future] = []
        self._abandoned = threading.Event()

    def persist(self, version: int, fragments: list[FragmentSpec], trainer_state: TrainerState) -> None:
        self._raise_failed_commits()
        write_fragments(version_dir(self.root, version), self.rank, fragments)
        if self._committer is not None:
            self._commits.append(self._committer.submit(self._commit, version, trainer_state))

    def _commit(self, version: int, trainer_state: TrainerState) -> None:
        wait_for_ranks(version_dir(self.root, version), self.world_ranks, self.commit_timeout_s,
                       stop=self._abandoned.is_set)
        commit_version(self.root, version, trainer_state, self.world_ranks, self.keep)
        self.committed_version = version

    def _raise_failed_commits(self) -> None:
        done = [future for future in self._commits if future.done()]
        self._commits = [future for future in self._commits if not future.done()]
        for future in done:
            future.result()

    def abandon(self) -> None:
        """Give up commits that wait for parts of ranks that died; the versions stay uncommitted."""
        self._abandoned.set()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._commits = []

    def close(self) -> None:
        try:
            for future in self._commits:
                future.result()
        finally:
            self._commits = []
            if self._committer is not None:
                self._committer.shutdown(wait=True)
