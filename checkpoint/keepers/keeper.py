"""SnapshotKeeper: one Ray actor per node that owns its ranks' snapshot arenas in node-local shared memory, so a
snapshot outlives the trainer process that wrote it.

Handover without bytes: the keeper creates one arena per local rank (``reserve``; checkpoint/keepers/arena.py) and
returns where it lies; the trainer's checkpoint engine packs every version straight into a free slot of it and
publishes it READY in the arena's header. That copy is level 0, and there is no other: no ``ray.put`` of training
state, no copy into the keeper. The keeper reads the slots when a commit seals a version, when it computes parity
(checkpoint/keepers/group.py: only the chunks other nodes need cross the network), when it writes level 2, and
when a replacement worker restores.

Versions: the trainer writes every version, over its oldest unclaimed one when no slot is free, so the arenas
always hold the newest versions (a process loss restores from them). A commit claims a version (seal: no
trainer overwrites it any more) that every rank holds; committing it frees every older slot, unless a level-2
write still reads it.

Create keepers with ``start_keeper(node_id, shm_dir, slots)``: a threaded actor (group members call each other
while serving calls) with no CPU reservation, pinned to its node.
"""
from __future__ import annotations

import faulthandler
import functools
import gc
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrate.checkpoint.direct_write import write_packed
from orchestrate.checkpoint.keepers.group import GroupMember, NotHeldError
from orchestrate.checkpoint.keepers.arena import (COMMITTED, FREE, HELD, READY, SEALED, TRAINER_STATE_META, WRITING, Arena,
                                  ArenaLayout, ShmSpaceError, free_bytes, human_bytes)
from orchestrate.checkpoint.snapshot_index import SnapshotIndex
from orchestrate.checkpoint.universal import CheckpointError, TrainerState, commit_version, version_dir, wait_for_ranks

log = logging.getLogger(__name__)
KEEPER_NICE = 19  # the keepers' CPU priority: background work, the lowest (Linux nice values run 0..19)

Snapshot = tuple[dict, np.ndarray]  # (index JSON, packed payload)


@dataclass
class VersionRecord:
    """What the keeper knows of a version beyond its arenas' slots: the commit protocol's state."""

    directory: Optional[dict] = None  # set by seal: where each rank sits in this node's data; no more ranks after
    chunk_length: int = 0
    parity: dict[int, np.ndarray] = field(default_factory=dict)  # stripe -> parity chunk this keeper stores
    directories: Optional[list[dict]] = None  # every member's directory: rebuilding a lost one needs it
    group: Optional[GroupMember] = None  # the group it was encoded in (the group may be re-formed later)
    rebuilt: dict[int, Snapshot] = field(default_factory=dict)  # a lost member's ranks, decoded here for a restore
    committed: bool = False

    @property
    def encoded(self) -> bool:
        return self.directories is not None

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the arenas: parity and decoded ranks."""
        return sum(c.nbytes for c in self.parity.values()) + sum(p.nbytes for _, p in self.rebuilt.values())


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
    """Owns the node's snapshot arenas; erasure-codes committed versions within its group; persists them."""

    def __init__(self, shm_dir: str = "/dev/shm", slots: int = 4, call_timeout_s: float = 60.0, nice: int = 0):
        self.shm_dir, self.slots, self.call_timeout_s = shm_dir, slots, call_timeout_s
        if nice:
            # its work (parity, disk writes) yields the CPU to training on the same node: when every core
            # trains, a version is protected later instead of every step being slower
            os.nice(nice)
        self._arenas: dict[int, Arena] = {}  # rank -> its arena
        self._records: dict[int, VersionRecord] = {}
        self._committed: Optional[int] = None
        self._pinned: set[int] = set()  # versions a level-2 write reads: their slots are not freed
        self._spare_parity: list[np.ndarray] = []  # parity buffers of dropped versions, reused
        self._group: Optional[GroupMember] = None
        self._lock = threading.RLock()
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks to the actor's log, as the controller's
        # Python's full collections walk every object Ray and numpy made at import, and parsing the rank indexes of
        # each level-2 write triggers them: CPU taken from training on this node (~30 ms per write when torch was
        # imported here too). Those objects live as long as the process, so they are left out of every collection.
        gc.freeze()

    # ------------------------------------------------------------------ arenas

    def reserve(self, requests: dict[int, tuple[int, int]]) -> dict[int, dict]:
        """rank -> arena handle for this node's ranks, ``requests``: rank -> (payload bytes, metadata bytes) of
        its largest snapshot. An arena that is large enough is kept (with the versions it holds; a slot its dead
        writer left half-written is freed); arenas of ranks no longer here are released. The whole node's need is
        checked against the free shared memory before anything is allocated."""
        with self._lock:
            for rank in [r for r in self._arenas if r not in requests]:
                self._arenas.pop(rank).close()
            layouts = {rank: ArenaLayout(self.slots, payload, meta) for rank, (payload, meta) in requests.items()}
            new = {rank: layout for rank, layout in layouts.items() if not self._fits(rank, layout)}
            needed = sum(layout.nbytes for layout in new.values())
            available = free_bytes(self.shm_dir) + sum(self._arenas[r].nbytes for r in new if r in self._arenas)
            if needed > available:
                raise ShmSpaceError(
                    f"checkpoint.shm_dir={self.shm_dir}: the keeper of node {self._node()[:8]} needs "
                    f"{human_bytes(needed)} of shared memory ({self.slots} versions of ranks {sorted(new)}), "
                    f"{human_bytes(available)} is free; set checkpoint.shm_dir= to a larger tmpfs, fewer "
                    f"checkpoint.shm_versions, or checkpoint.keepers=false")
            for rank, layout in new.items():
                self._replace_arena(rank, layout)
            for rank in requests:
                self._reclaim_writing(rank)
            return {rank: self._arenas[rank].handle().to_json() for rank in requests}

    def allocate(self, rank: int, payload_nbytes: int, meta_nbytes: int) -> dict:
        """A larger arena for one rank whose snapshot outgrew its slots (its held versions are dropped)."""
        with self._lock:
            layout = ArenaLayout(self.slots, payload_nbytes, meta_nbytes)
            if not self._fits(rank, layout):
                log.warning("rank %d's snapshot outgrew its arena: a new one of %s, its held versions dropped",
                            rank, human_bytes(layout.nbytes))
                self._replace_arena(rank, layout)
            return self._arenas[rank].handle().to_json()

    def _fits(self, rank: int, layout: ArenaLayout) -> bool:
        held = self._arenas.get(rank)
        return held is not None and held.layout.payload_capacity >= layout.payload_capacity and \
            held.layout.meta_capacity >= layout.meta_capacity

    def _replace_arena(self, rank: int, layout: ArenaLayout) -> None:
        old = self._arenas.pop(rank, None)
        if old is not None:
            old.close()
        self._arenas[rank] = Arena.create(self.shm_dir, layout, f"rank {rank}'s arena")

    def _reclaim_writing(self, rank: int) -> None:
        arena = self._arenas[rank]
        for slot in range(arena.layout.slots):
            if arena.state(slot) == WRITING:
                arena.set_state(slot, FREE)

    def close(self) -> None:
        with self._lock:
            for arena in self._arenas.values():
                arena.close()
            self._arenas.clear()

    @staticmethod
    def _node() -> str:
        return ray.get_runtime_context().get_node_id()

    # ------------------------------------------------------------------ what is held; restore

    def _snapshots(self, version: int, states: Sequence[int] = HELD) -> dict[int, Snapshot]:
        """rank -> (index, payload view) of the slots holding ``version`` (under the lock)."""
        found = {}
        for rank, arena in self._arenas.items():
            slot = arena.slots_in(states).get(version)
            if slot is not None:
                found[rank] = arena.read(slot)
        return found

    def get(self, version: int, rank: int) -> Snapshot:
        """One rank's snapshot (a copy): from its arena, or decoded here by ``restore_member``."""
        with self._lock:
            record = self._records.get(version)
            snapshots = {**(record.rebuilt if record else {}), **self._snapshots(version)}
            if rank not in snapshots:
                raise NotHeldError(f"keeper holds ranks {sorted(snapshots)} of version {version}, not rank {rank}")
            index, payload = snapshots[rank]
            return index, payload.copy()

    def get_all(self, version: int) -> dict[int, Snapshot]:
        with self._lock:
            return {rank: (index, payload.copy()) for rank, (index, payload) in self._snapshots(version).items()}

    def held_ranks(self) -> dict[int, list[int]]:
        """version -> ranks whose complete snapshot this keeper's arenas hold."""
        held: dict[int, list[int]] = {}
        with self._lock:
            for rank, arena in sorted(self._arenas.items()):
                for version in arena.slots_in(HELD):
                    held.setdefault(version, []).append(rank)
        return held

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(set(self.held_ranks()) | set(self._records))

    def committed_version(self) -> Optional[int]:
        return self._committed

    def held_bytes(self) -> int:
        """Shared memory of the arenas plus parity and decoded ranks held."""
        with self._lock:
            return sum(a.nbytes for a in self._arenas.values()) + sum(r.extra_bytes for r in self._records.values())

    def memory(self) -> dict[str, int]:
        """Arena, parity and resident bytes of this keeper, and the bytes of one version of its ranks' state."""
        with self._lock:
            state = sum(a.layout.payload_capacity for a in self._arenas.values())
            parity = sum(c.nbytes for r in self._records.values() for c in r.parity.values())
            return {"arena_bytes": sum(a.nbytes for a in self._arenas.values()), "parity_bytes": parity,
                    "state_bytes": state, "slots": self.slots, "rss_bytes": psutil.Process().memory_info().rss}

    def ping(self) -> str:
        return self._node()

    # ------------------------------------------------------------------ group protocol (driven by keeper_group)

    def join_group(self, index: int, members: Sequence, parity: int) -> None:
        self._group = GroupMember(index, members, parity, self.call_timeout_s)

    def seal(self, version: int) -> dict:
        """Freeze the ranks of ``version`` (a node may hold none) and return where each sits in this node's data."""
        with self._lock:
            record = self._records.setdefault(version, VersionRecord())
            if record.directory is None:
                for arena in self._arenas.values():
                    arena.claim(version, READY, SEALED)
                record.directory = _directory(self._snapshots(version, (SEALED, COMMITTED)))
            return record.directory

    def encode(self, version: int, chunk_length: int, directories: list[dict]) -> int:
        """Compute the parity this keeper stores for ``version``; returns the bytes it holds for it."""
        group = self._require_group()
        with self._lock:
            record = self._sealed(version)
            if record.directory["nbytes"] > chunk_length * group.layout.data_members:
                raise CheckpointError(f"version {version}: {record.directory['nbytes']} bytes do not fit in "
                                      f"{group.layout.data_members} chunks of {chunk_length}")
            record.chunk_length = chunk_length
        if not record.encoded:
            parity = group.encode_parity(version, chunk_length, self._parity_buffer)
            with self._lock:
                record.parity, record.directories, record.group = parity, list(directories), group
        return record.directory["nbytes"] + record.extra_bytes

    def _parity_buffer(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, spare in enumerate(self._spare_parity):
                if spare.nbytes == nbytes:
                    return self._spare_parity.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def shard(self, version: int, stripe: int, chunk_length: Optional[int] = None) -> np.ndarray:
        """This keeper's shard of a stripe: a chunk of its own data (read from the arenas), or parity it stores."""
        group = self._group_of(version)
        shard = group.layout.shard_of(group.index, stripe)
        with self._lock:
            record = self._sealed(version)
            if shard >= group.layout.data_members:
                chunk = record.parity.get(stripe)
                if chunk is None:
                    raise NotHeldError(f"version {version}: parity of stripe {stripe} is not encoded here")
                return chunk
            return self._data_chunk(version, record, shard, chunk_length or record.chunk_length)

    def _data_chunk(self, version: int, record: VersionRecord, chunk: int, length: int) -> np.ndarray:
        """Bytes [chunk * length, (chunk + 1) * length) of this node's data: its sealed ranks' payloads one after
        the other, zero-padded. A view when the chunk lies inside one payload, else a copy of just the chunk."""
        start, end = chunk * length, (chunk + 1) * length
        snapshots = self._snapshots(version, (SEALED, COMMITTED))
        out = None
        for entry in record.directory["ranks"]:
            payload = snapshots[entry["rank"]][1]
            lo, hi = max(start, entry["offset"]), min(end, entry["offset"] + payload.nbytes)
            if lo >= hi:
                continue
            piece = payload[lo - entry["offset"]:hi - entry["offset"]]
            if lo == start and hi == end:
                return piece
            if out is None:
                out = np.zeros(length, dtype=np.uint8)
            out[lo - start:hi - start] = piece
        return out if out is not None else np.zeros(length, dtype=np.uint8)

    def mark_committed(self, version: int, pin: bool = False) -> None:
        """``version`` is L1-committed everywhere: older versions are freed. ``pin``: a level-2 write of it follows,
        so its slots stay until ``persist`` is done with them."""
        with self._lock:
            record = self._records.get(version)
            if record is None or not record.encoded:
                raise CheckpointError(f"version {version} cannot be committed: it is not encoded on this keeper")
            record.committed = True
            if pin:
                self._pinned.add(version)
            for arena in self._arenas.values():
                arena.claim(version, SEALED, COMMITTED)
            self._committed = version if self._committed is None else max(self._committed, version)
            self._free_older_than(self._committed)

    def discard(self, version: int) -> None:
        """Drop a version whose commit failed or that can no longer complete (a committed version is kept)."""
        with self._lock:
            record = self._records.get(version)
            if (record is not None and record.committed) or version in self._pinned:
                return
            self._drop(version)

    def _free_older_than(self, version: int) -> None:
        stale = {v for arena in self._arenas.values() for v in arena.slots_in(HELD)} | set(self._records)
        for old in stale:
            if old < version and old not in self._pinned:
                self._drop(old)

    def _drop(self, version: int) -> None:
        for arena in self._arenas.values():
            arena.release(version)
        record = self._records.pop(version, None)
        if record is not None:
            self._spare_parity.extend(record.parity.values())
            del self._spare_parity[:-2 * max(1, len(record.parity))]

    def rebuild(self, version: int, lost: int) -> dict[int, Snapshot]:
        """rank -> snapshot of lost member ``lost``, decoded from this and the other surviving members."""
        with self._lock:
            record = self._records.get(version)
        if record is None or not record.encoded:
            raise NotHeldError(f"version {version} is not encoded on this keeper")
        data = record.group.decode_member(version, lost, record.chunk_length,
                                          lambda stripe: self.shard(version, stripe))
        return split_by_directory(record.directories[lost], data)

    def restore_member(self, version: int, lost: int) -> list[int]:
        """Decode lost member ``lost``'s ranks of ``version`` and hold them here, so replacement workers read
        them with ``get`` (the data stays in keepers, never passes through the controller); returns those ranks."""
        rebuilt = self.rebuild(version, lost)
        with self._lock:
            self._records[version].rebuilt.update(rebuilt)
        return sorted(rebuilt)

    def _group_of(self, version: int) -> GroupMember:
        """The group a version was encoded in; the current one while it is being encoded."""
        with self._lock:
            record = self._records.get(version)
            if record is not None and record.group is not None:
                return record.group
        return self._require_group()

    def _require_group(self) -> GroupMember:
        if self._group is None:
            raise CheckpointError("keeper is not in a group (KeeperGroup(keepers, parity) joins it)")
        return self._group

    def _sealed(self, version: int) -> VersionRecord:
        record = self._records.get(version)
        if record is None or record.directory is None:
            raise NotHeldError(f"version {version} is not sealed on this keeper")
        return record

    # ------------------------------------------------------------------ level 2

    def persist(self, version: int, root: str, world_ranks: Optional[Sequence[int]] = None, keep: int = 2,
                timeout_s: float = 600.0) -> list[int]:
        """Write the held ranks of ``version`` in the universal format under ``root``; returns those ranks.

        With ``world_ranks`` this keeper is the coordinator: it then waits until every rank's part is written
        (by whichever keeper holds it) and commits the version, with the trainer state its snapshots carry.
        The slots are read in place; ``mark_committed(version, pin=True)`` kept them from being freed."""
        try:
            with self._lock:
                self._pinned.add(version)
                snapshots = self._snapshots(version)
            directory = version_dir(root, version)
            for rank, (index, payload) in sorted(snapshots.items()):
                write_packed(directory, rank, index, payload)
            if world_ranks is not None:
                wait_for_ranks(directory, world_ranks, timeout_s)
                commit_version(root, version, _trainer_state(version, snapshots), world_ranks, keep)
            return sorted(snapshots)
        finally:
            with self._lock:
                self._pinned.discard(version)
                if self._committed is not None:
                    self._free_older_than(self._committed)


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


def start_keeper(node_id: str, shm_dir: str = "/dev/shm", slots: int = 4, call_timeout_s: float = 60.0,
                 nice: int = KEEPER_NICE, **options):
    """A SnapshotKeeper actor on node ``node_id``, at CPU priority ``nice`` (see ``KEEPER_NICE``)."""
    return _remote_keeper_class().options(**{**keeper_actor_options(node_id), **options}).remote(
        shm_dir, slots, call_timeout_s, nice)
