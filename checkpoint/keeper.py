"""SnapshotKeeper: one Ray actor per node that holds the ranks' level-1 snapshots outside the trainer processes.

Handover is a push: after the engine's L0 copy a worker packs its arena (checkpoint/snapshot_codec.py) and calls
``keeper.put.remote(version, rank, index, payload)`` (``KeeperHandover`` does this as the engine's persister).
Why push and copy, given Ray's ownership rules (shared/research/ecosystem.md section 2): the payload argument is
an object owned by the worker, and the keeper gets a zero-copy read-only view of it. Holding that view would tie
the snapshot to the worker's life (OwnerDiedError once it dies), so ``put`` copies it into memory the keeper
owns before it returns; from the ack on, the snapshot no longer depends on the worker, and the plasma copy is
freed instead of occupying (and spilling from) the object store. A pull (keeper calls a worker method and keeps
the returned ref) would also be owned by the keeper, but would keep every snapshot in plasma and make the keeper
track worker handles.

Versions: at most ``keep`` (>= 2) are held: the newest committed one and the oldest pending ones; a new version
beyond that is refused with KeeperBusyError (the handover skips it) until a commit frees the older ones.

Create keepers with ``start_keeper(node_id)``: a threaded actor (group members call each other while serving
calls) with no CPU reservation, pinned to its node.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from checkpoint.keeper_group import GroupMember, NotHeldError
from checkpoint.snapshot_codec import SnapshotIndex, pack_into, plan_index, unpack
from checkpoint.universal import (CheckpointError, FragmentSpec, TrainerState, commit_version, version_dir,
                                  wait_for_ranks, write_fragments)

log = logging.getLogger(__name__)

TRAINER_STATE_META = "trainer_state"  # snapshot meta key under which the trainer state travels

Snapshot = tuple[dict, np.ndarray]  # (index JSON, packed payload)


class KeeperBusyError(CheckpointError):
    """The keeper already holds ``keep`` versions it may not drop (committed or being committed)."""


@dataclass
class HeldVersion:
    version: int
    snapshots: dict[int, Snapshot] = field(default_factory=dict)  # rank -> snapshot; views of `data` once assembled
    directory: Optional[dict] = None  # set by seal: where each rank sits in `data`; no more puts after it
    data: Optional[np.ndarray] = None  # own data, padded to the group's k * chunk_length
    chunk_length: int = 0
    parity: dict[int, np.ndarray] = field(default_factory=dict)  # stripe -> parity chunk this keeper stores
    directories: Optional[list[dict]] = None  # every member's directory: rebuilding a lost one needs it
    group: Optional[GroupMember] = None  # the group it was encoded in (the group may be re-formed later)
    rebuilt: dict[int, Snapshot] = field(default_factory=dict)  # a lost member's ranks, decoded here for a restore
    committed: bool = False

    @property
    def sealed(self) -> bool:
        return self.directory is not None

    @property
    def encoded(self) -> bool:
        return self.directories is not None

    @property
    def nbytes(self) -> int:
        own = self.data.nbytes if self.data is not None else sum(p.nbytes for _, p in self.snapshots.values())
        return own + sum(chunk.nbytes for chunk in self.parity.values())


def _directory(snapshots: dict[int, Snapshot]) -> dict:
    entries, offset = [], 0
    for rank in sorted(snapshots):
        index, payload = snapshots[rank]
        entries.append({"rank": rank, "offset": offset, "index": index})
        offset += payload.nbytes
    return {"nbytes": offset, "ranks": entries}


def split_by_directory(directory: dict, data: np.ndarray) -> dict[int, Snapshot]:
    """rank -> (index, payload view) of one member's data."""
    return {entry["rank"]: (entry["index"], data[entry["offset"]:entry["offset"] + entry["index"]["nbytes"]])
            for entry in directory["ranks"]}


class SnapshotKeeper:
    """Holds packed snapshots per (version, rank); erasure-codes them within its group; persists them to disk."""

    def __init__(self, keep: int = 2, call_timeout_s: float = 60.0):
        if keep < 2:
            raise ValueError(f"keeper keep={keep}: must be >= 2 (the committed version plus the next one)")
        self.keep, self.call_timeout_s = keep, call_timeout_s
        self._versions: dict[int, HeldVersion] = {}
        self._committed: Optional[int] = None
        self._group: Optional[GroupMember] = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ handover and restore

    def put(self, version: int, rank: int, index: dict, payload: np.ndarray) -> int:
        """Copy one rank's packed snapshot into keeper-owned memory; returns the bytes held (the ack)."""
        source = np.asarray(payload)
        expected = SnapshotIndex.from_json(index).nbytes
        if source.dtype != np.uint8 or source.ndim != 1 or source.nbytes != expected:
            raise CheckpointError(f"put(version={version}, rank={rank}): payload must be a 1-D uint8 array of "
                                  f"{expected} bytes, got {source.dtype}{list(source.shape)}")
        with self._lock:
            self._admit_for_put(version, rank)  # a refused version is refused before it is copied
        owned = np.empty(source.nbytes, dtype=np.uint8)
        owned[:] = source
        with self._lock:
            self._admit_for_put(version, rank).snapshots[rank] = (dict(index), owned)
        return owned.nbytes

    def get(self, version: int, rank: int) -> Snapshot:
        """One rank's snapshot: handed over to this keeper, or decoded here by ``restore_member``."""
        with self._lock:
            held = self._held(version)
            snapshots = {**held.rebuilt, **held.snapshots}
        if rank not in snapshots:
            raise NotHeldError(f"keeper holds ranks {sorted(snapshots)} of version {version}, not rank {rank}")
        return snapshots[rank]

    def held_ranks(self) -> dict[int, list[int]]:
        """version -> ranks handed over to this keeper (what a restore can read without decoding)."""
        with self._lock:
            return {version: sorted(held.snapshots) for version, held in self._versions.items()}

    def get_all(self, version: int) -> dict[int, Snapshot]:
        with self._lock:
            return dict(self._held(version).snapshots)

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def committed_version(self) -> Optional[int]:
        return self._committed

    def held_bytes(self) -> int:
        """Bytes of snapshot data and parity this keeper holds, over all versions."""
        with self._lock:
            return sum(held.nbytes for held in self._versions.values())

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # ------------------------------------------------------------------ version bookkeeping (under the lock)

    def _held(self, version: int) -> HeldVersion:
        held = self._versions.get(version)
        if held is None:
            raise NotHeldError(f"keeper holds versions {sorted(self._versions)}, not {version}")
        return held

    def _admit_for_put(self, version: int, rank: int) -> HeldVersion:
        held = self._admit(version)
        if held.sealed:
            raise CheckpointError(f"put(version={version}, rank={rank}): the version is already being committed; "
                                  f"this rank's part came too late")
        return held

    def _admit(self, version: int) -> HeldVersion:
        if version in self._versions:
            return self._versions[version]
        if self._committed is not None and version <= self._committed:
            raise CheckpointError(f"version {version} is not newer than the committed version {self._committed}")
        if len(self._versions) >= self.keep:
            # Refuse rather than evict: every keeper then holds the same oldest versions after the committed one
            # (handovers arrive in version order), so a commit that lags behind still finds one they all hold.
            # Evicting made keepers keep different versions, and commits starved for many steps.
            raise KeeperBusyError(f"keeper holds versions {sorted(self._versions)} (committed {self._committed}); "
                                  f"version {version} skipped until one of them is committed")
        held = self._versions[version] = HeldVersion(version)
        return held

    # ------------------------------------------------------------------ group protocol (driven by keeper_group)

    def join_group(self, index: int, members: Sequence, parity: int) -> None:
        self._group = GroupMember(index, members, parity, self.call_timeout_s)

    def seal(self, version: int) -> dict:
        """Freeze the set of ranks of ``version`` (a node may hold none) and return where each sits in own data."""
        with self._lock:
            # a node without ranks still holds parity for the others: it seals an empty version (as does one
            # that evicted the version; then the commit fails on the rank count and discards it everywhere)
            held = self._versions.get(version)
            if held is None:  # empty: costs no memory, so it does not count against ``keep``
                held = self._versions[version] = HeldVersion(version)
            if not held.sealed:
                held.directory = _directory(held.snapshots)
            return held.directory

    def encode(self, version: int, chunk_length: int, directories: list[dict]) -> int:
        """Lay out own data in k chunks and compute the parity this keeper stores; returns bytes held for it."""
        group = self._require_group()
        held = self._assemble(version, chunk_length)
        if not held.encoded:
            parity = group.encode_parity(version, chunk_length)
            with self._lock:
                held.parity, held.directories, held.group = parity, list(directories), group
        return held.nbytes

    def shard(self, version: int, stripe: int, chunk_length: Optional[int] = None) -> np.ndarray:
        """This keeper's shard of a stripe: one of its own data chunks, or a parity chunk it stores."""
        group = self._group_of(version)
        shard = group.layout.shard_of(group.index, stripe)
        if shard >= group.layout.data_members:
            with self._lock:
                chunk = self._held(version).parity.get(stripe)
            if chunk is None:
                raise NotHeldError(f"version {version}: parity of stripe {stripe} is not encoded here")
            return chunk
        held = self._assemble(version, chunk_length) if chunk_length is not None else self._assembled(version)
        return held.data[shard * held.chunk_length:(shard + 1) * held.chunk_length]

    def mark_committed(self, version: int) -> None:
        with self._lock:
            held = self._held(version)
            if not held.encoded:
                raise CheckpointError(f"version {version} cannot be committed: it is not encoded on this keeper")
            held.committed = True
            self._committed = version if self._committed is None else max(self._committed, version)
            for stale in [v for v in self._versions if v < self._committed]:  # only the newest committed stays
                del self._versions[stale]

    def discard(self, version: int) -> None:
        """Drop a version whose commit failed (a committed version is kept)."""
        with self._lock:
            if version in self._versions and not self._versions[version].committed:
                del self._versions[version]

    def rebuild(self, version: int, lost: int) -> dict[int, Snapshot]:
        """rank -> snapshot of lost member ``lost``, decoded from this and the other surviving members."""
        held = self._assembled(version)
        if not held.encoded:
            raise NotHeldError(f"version {version} is not encoded on this keeper")
        data = held.group.decode_member(version, lost, held.chunk_length,
                                        lambda stripe: self.shard(version, stripe))
        return split_by_directory(held.directories[lost], data)

    def restore_member(self, version: int, lost: int) -> list[int]:
        """Decode lost member ``lost``'s ranks of ``version`` and hold them here, so replacement workers read
        them with ``get`` (the data stays in keepers, never passes through the controller); returns those ranks."""
        rebuilt = self.rebuild(version, lost)
        with self._lock:
            self._held(version).rebuilt.update(rebuilt)
        return sorted(rebuilt)

    def _group_of(self, version: int) -> GroupMember:
        """The group a version was encoded in; the current one while it is being encoded."""
        with self._lock:
            held = self._versions.get(version)
            if held is not None and held.group is not None:
                return held.group
        return self._require_group()

    def _require_group(self) -> GroupMember:
        if self._group is None:
            raise CheckpointError("keeper is not in a group (KeeperGroup(keepers, parity) joins it)")
        return self._group

    def _assembled(self, version: int) -> HeldVersion:
        with self._lock:
            held = self._held(version)
            if held.data is None:
                raise NotHeldError(f"version {version} is not laid out in chunks on this keeper")
            return held

    def _assemble(self, version: int, chunk_length: int) -> HeldVersion:
        """Copy the sealed snapshots into one zero-padded buffer of k chunks (once; peers may ask first)."""
        with self._lock:
            held = self._held(version)
            if not held.sealed:
                raise NotHeldError(f"version {version} is not sealed on this keeper")
            if held.data is not None:
                if held.chunk_length != chunk_length:
                    raise CheckpointError(f"version {version} was laid out in chunks of {held.chunk_length} "
                                          f"bytes, not {chunk_length}")
                return held
            length = chunk_length * self._require_group().layout.data_members
            if length < held.directory["nbytes"]:
                raise CheckpointError(f"version {version}: {held.directory['nbytes']} bytes do not fit in "
                                      f"{length}")
            data = np.empty(length, dtype=np.uint8)
            for entry in held.directory["ranks"]:
                payload = held.snapshots[entry["rank"]][1]
                data[entry["offset"]:entry["offset"] + payload.nbytes] = payload
            data[held.directory["nbytes"]:] = 0
            held.data, held.chunk_length = data, chunk_length
            held.snapshots = split_by_directory(held.directory, data)
            return held

    # ------------------------------------------------------------------ level 2

    def persist(self, version: int, root: str, world_ranks: Optional[Sequence[int]] = None, keep: int = 2,
                timeout_s: float = 600.0) -> list[int]:
        """Write the held ranks of ``version`` in the universal format under ``root``; returns those ranks.

        With ``world_ranks`` this keeper is the coordinator: it then waits until every rank's part is written
        (by whichever keeper holds it) and commits the version, with the trainer state its snapshots carry."""
        snapshots = self.get_all(version)  # references: eviction cannot free them while they are written
        directory = version_dir(root, version)
        for rank, (index, payload) in sorted(snapshots.items()):
            write_fragments(directory, rank, unpack(index, payload))
        if world_ranks is not None:
            wait_for_ranks(directory, world_ranks, timeout_s)
            commit_version(root, version, _trainer_state(version, snapshots), world_ranks, keep)
        return sorted(snapshots)


def _trainer_state(version: int, snapshots: dict[int, Snapshot]) -> TrainerState:
    """The state carried in the lowest rank's snapshot meta, else just the step (as the engine defaults)."""
    for rank in sorted(snapshots):
        state = SnapshotIndex.from_json(snapshots[rank][0]).meta.get(TRAINER_STATE_META)
        if state is not None:
            return TrainerState.from_json(state)
    return TrainerState(step=version)


# ---------------------------------------------------------------------------------------------- creation


@functools.lru_cache(maxsize=1)
def _remote_keeper_class():
    return ray.remote(SnapshotKeeper)


def keeper_actor_options(node_id: str, max_concurrency: int = 8) -> dict[str, Any]:
    """Threaded (peers call in while it waits on them), no CPU reserved, pinned to the node, never restarted (a
    restarted keeper would be empty; the group treats it as lost until the next commit)."""
    return {"num_cpus": 0, "max_concurrency": max_concurrency, "max_restarts": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def start_keeper(node_id: str, keep: int = 2, call_timeout_s: float = 60.0, **options):
    """A SnapshotKeeper actor on node ``node_id``."""
    return _remote_keeper_class().options(**{**keeper_actor_options(node_id), **options}).remote(keep,
                                                                                                 call_timeout_s)


# ---------------------------------------------------------------------------------------------- worker side


class KeeperHandover:
    """The engine's persister for level 1: packs each handed-over arena copy and puts it on this node's keeper.

    Plug it into ``CheckpointEngine(arena, every, persist_every=N, persister=KeeperHandover(keeper, rank))``: the
    engine calls ``persist`` on its writer thread after the L0 copy, so training never waits for it unless the
    next snapshot comes before the keeper acked. The pack buffer is reused across versions."""

    def __init__(self, keeper, rank: int, timeout_s: float = 600.0):
        self.keeper, self.rank, self.timeout_s = keeper, rank, timeout_s
        self.handed_version: Optional[int] = None
        self._buffer = np.empty(0, dtype=np.uint8)

    def persist(self, version: int, fragments: list[FragmentSpec], trainer_state: TrainerState) -> None:
        index = plan_index(fragments, {TRAINER_STATE_META: asdict(trainer_state)})
        if self._buffer.nbytes < index.nbytes:
            self._buffer = np.empty(index.nbytes, dtype=np.uint8)
        payload = pack_into(index, fragments, self._buffer)
        try:
            self._put(version, index, payload)
        except KeeperBusyError as error:  # the keeper holds enough uncommitted versions: normal while commits lag
            log.debug("rank %d: level-1 handover of version %d skipped: %s", self.rank, version, error)
            return
        except ray.exceptions.RayActorError as error:
            # a lost keeper costs this version its level-1 copy, not the training step: the controller replaces
            # it (TrainWorker.use_keeper) and the next version is protected again
            log.warning("rank %d: level-1 handover of version %d skipped: %s", self.rank, version, error)
            return
        self.handed_version = version

    def _put(self, version: int, index: SnapshotIndex, payload: np.ndarray, attempts: int = 3) -> None:
        for attempt in range(attempts):  # a keeper on a busy node can be briefly unreachable: try again
            try:
                ray.get(self.keeper.put.remote(version, self.rank, index.to_json(), payload), timeout=self.timeout_s)
                return
            except ray.exceptions.ActorUnavailableError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def close(self) -> None:
        pass
