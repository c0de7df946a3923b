"""Snapshot arenas in node-local shared memory: level 0 of a rank's training state, written once by the trainer's
background copy straight into memory its node's SnapshotKeeper owns (no second copy, no bytes in a message).

One arena per rank, created by the keeper in ``checkpoint.shm_dir`` (a tmpfs, /dev/shm by default) with
O_TMPFILE: the file never has a name, so no run that ends, fails or is SIGKILLed can leave it behind; its memory
lives while a process holds it open or mapped. The trainer opens it through ``/proc/<keeper pid>/fd/<fd>``. Its
space is reserved with posix_fallocate when it is created: a tmpfs that is too small is a clear error before
training starts, never a SIGBUS in the middle of a step. The slots are reused for every version.

File layout: a header page, then ``slots`` slots, each a metadata area (the snapshot index, which carries the
trainer state, as zlib-compressed JSON: a page or two, where the plain JSON of a model's hundreds of tensors took
64 KiB per slot) followed by a payload area (the packed tensors, checkpoint/snapshot_index.py's layout).
This module does not import torch (the keepers, which only move bytes, use it); the trainer packs its tensors
into a slot through checkpoint/keepers/arena_writer.py.

The header holds three int64 per slot: state, version, metadata length. The handover is the state change, not an
RPC. Who moves a slot between states:
  * the trainer: FREE -> WRITING -> READY (it writes version, payload and metadata before it publishes READY),
    and READY -> WRITING when no slot is FREE: it overwrites its oldest handed-over version that no commit has
    claimed, except the one a recovery would roll back to (the newest whose report the controller took), so the
    newest versions are held and a process loss redoes at most the steps not yet logged;
  * the keeper: READY -> SEALED (a commit claimed it) -> COMMITTED, and any of these -> FREE (a newer version
    was committed, or the version was dropped). A WRITING slot is freed only when its rank attaches again (its
    writer died mid-copy).
Both sides move a slot out of READY only under a POSIX record lock on the header (``lockf``), so a trainer
never overwrites a version the keeper is sealing. Every field is one aligned 8-byte store, written in program
order; on x86-64 (total store order) a keeper that reads READY also sees the payload written before it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from orchestrate.checkpoint.slot_choice import slot_to_overwrite
from orchestrate.checkpoint.snapshot_index import SnapshotIndex
from orchestrate.checkpoint.universal import CheckpointError

FREE, WRITING, READY, SEALED, COMMITTED = range(5)
HELD = (READY, SEALED, COMMITTED)  # states in which a slot holds a complete version
HEADER_BYTES = 4096
TRAINER_STATE_META = "trainer_state"  # snapshot meta key under which the trainer state travels
FIELDS = 3  # state, version, metadata length


class ShmSpaceError(CheckpointError):
    """The shared-memory directory cannot hold the arenas the keepers need."""


def page_align(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def free_bytes(directory: str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


@dataclass(frozen=True)
class ArenaLayout:
    slots: int
    payload_capacity: int  # bytes of the largest snapshot a slot takes
    meta_capacity: int  # bytes of its compressed JSON index

    def __post_init__(self) -> None:
        if self.slots < 2 or FIELDS * 8 * self.slots > HEADER_BYTES:
            raise ValueError(f"arena slots={self.slots}: must be between 2 and {HEADER_BYTES // (FIELDS * 8)}")

    @property
    def slot_bytes(self) -> int:
        # page-aligned areas: a keeper writes a payload to disk with O_DIRECT straight from its pages
        return page_align(self.meta_capacity) + page_align(self.payload_capacity)

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.slots * self.slot_bytes

    def meta_offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes

    def payload_offset(self, slot: int) -> int:
        return self.meta_offset(slot) + page_align(self.meta_capacity)


@dataclass(frozen=True)
class ArenaHandle:
    """Where a rank's arena lies: enough for the trainer on the same node to map it."""

    pid: int
    fd: int
    layout: ArenaLayout

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ArenaHandle":
        return cls(int(data["pid"]), int(data["fd"]), ArenaLayout(**data["layout"]))


class Arena:
    """A mapped arena; the keeper creates it (``create``), the trainer attaches to it (``attach``)."""

    def __init__(self, fd: int, layout: ArenaLayout, owner: bool):
        self.fd, self.layout, self.owner = fd, layout, owner
        # the trainer maps every page now, before training: faulting them in during the first snapshots would
        # stall those steps (the keeper reads only what it needs)
        flags = mmap.MAP_SHARED | (0 if owner else getattr(mmap, "MAP_POPULATE", 0))
        self._map = mmap.mmap(fd, layout.nbytes, flags=flags)
        self.header = np.frombuffer(self._map, dtype=np.int64, count=FIELDS * layout.slots).reshape(
            layout.slots, FIELDS)

    @classmethod
    def create(cls, directory: str, layout: ArenaLayout, what: str) -> "Arena":
        """A new zeroed arena (every slot FREE) in ``directory``; ``what`` names it in a space error."""
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except FileNotFoundError:
            raise ShmSpaceError(f"checkpoint.shm_dir={directory}: no such directory") from None
        try:
            os.posix_fallocate(fd, 0, layout.nbytes)  # reserve now: running out later would be a SIGBUS
        except OSError as err:
            os.close(fd)
            raise ShmSpaceError(f"checkpoint.shm_dir={directory}: {what} needs {human_bytes(layout.nbytes)} of "
                                f"shared memory, {human_bytes(free_bytes(directory))} is free ({err.strerror}); "
                                f"set checkpoint.shm_dir= to a larger tmpfs, fewer checkpoint.shm_versions, or "
                                f"checkpoint.keepers=false") from None
        return cls(fd, layout, owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle) -> "Arena":
        fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDWR)
        return cls(fd, handle.layout, owner=False)

    def handle(self) -> ArenaHandle:
        return ArenaHandle(os.getpid(), self.fd, self.layout)

    def close(self) -> None:
        self.header = None
        try:
            self._map.close()
        except BufferError:  # views still exported (a snapshot being read): the mapping goes with them
            pass
        os.close(self.fd)

    # ------------------------------------------------------------------ slots

    def state(self, slot: int) -> int:
        return int(self.header[slot, 0])

    def version(self, slot: int) -> int:
        return int(self.header[slot, 1])

    def set_state(self, slot: int, state: int) -> None:
        self.header[slot, 0] = state

    @contextlib.contextmanager
    def header_lock(self):
        """Exclusive across processes (threads of one process must also exclude each other: the keeper holds
        its own lock around this)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER_BYTES, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER_BYTES, 0)

    def claim(self, version: int, from_state: int, to_state: int) -> bool:
        """Move the slot holding ``version`` from ``from_state`` to ``to_state`` under the header lock."""
        with self.header_lock():
            slot = self.slots_in((from_state,)).get(version)
            if slot is None:
                return False
            self.set_state(slot, to_state)
            return True

    def release(self, version: int) -> None:
        """The keeper frees the slot holding ``version`` (any held state)."""
        with self.header_lock():
            slot = self.slots_in(HELD).get(version)
            if slot is not None:
                self.set_state(slot, FREE)

    def slots_in(self, states: Sequence[int]) -> dict[int, int]:
        """version -> slot of every slot in one of ``states``."""
        return {self.version(s): s for s in range(self.layout.slots) if self.state(s) in states}

    def payload(self, slot: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=self.layout.payload_offset(slot))

    def read(self, slot: int) -> tuple[dict, np.ndarray]:
        """(index JSON, payload view) of a slot that holds a version."""
        length = int(self.header[slot, 2])
        start = self.layout.meta_offset(slot)
        index = json.loads(unpack_meta(self._map[start:start + length]))
        return index, self.payload(slot, int(index["nbytes"]))

    # ------------------------------------------------------------------ trainer side

    def publish(self, version: int, nbytes: int, meta: bytes, fill: Callable[[int], None], keep_every: int = 0
                ) -> bool:
        """Take a FREE slot, else the oldest READY one, ``fill(slot)`` its payload, write ``meta`` (an index packed
        by ``pack_meta``) and publish it READY; False when every slot is claimed by the keeper (committed, being
        committed or written to disk): skipped. A READY version that is a multiple of ``keep_every`` (one the
        keepers will write to disk) is not overwritten."""
        self.check_fits(version, nbytes, meta)
        slot = self.take_slot(version, keep_every)
        if slot is None:
            return False
        fill(slot)
        self.publish_slot(slot, meta)
        return True

    def fits(self, nbytes: int, meta: bytes) -> bool:
        return nbytes <= self.layout.payload_capacity and len(meta) <= self.layout.meta_capacity

    def check_fits(self, version: int, nbytes: int, meta: bytes) -> None:
        if not self.fits(nbytes, meta):
            raise CheckpointError(f"snapshot of version {version} ({nbytes} bytes, index {len(meta)}) does not fit "
                                  f"the arena's slots ({self.layout.payload_capacity}, {self.layout.meta_capacity})")

    def publish_slot(self, slot: int, meta: bytes) -> None:
        """Write ``meta`` (packed by ``pack_meta``) into a slot taken with ``take_slot`` whose payload is written,
        and publish it READY."""
        start = self.layout.meta_offset(slot)
        self._map[start:start + len(meta)] = meta
        self.header[slot, 2] = len(meta)
        self.set_state(slot, READY)

    def take_slot(self, version: int, keep_every: int, reported: Optional[int] = None) -> Optional[int]:
        """A slot for ``version``, now WRITING (see ``publish``); None when every slot is claimed. A FREE one, else
        a READY one: the oldest, sparing the newest (with zero copy the trainer's very memory) and the one a
        recovery would roll back to (``slot_to_overwrite``; ``reported``: the newest step whose report the
        controller took)."""
        free = [s for s in range(self.layout.slots) if self.state(s) == FREE]
        if free:  # only this trainer moves a slot out of FREE
            slot = free[0]
        else:
            with self.header_lock():
                ready = {v: s for v, s in self.slots_in((READY,)).items() if not (keep_every and v % keep_every == 0)}
                if not ready:
                    return None
                slot = slot_to_overwrite(ready, self.slots_in(HELD), reported)
                self.set_state(slot, WRITING)
        self.header[slot, 1] = version
        self.set_state(slot, WRITING)
        return slot

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def pack_meta(index_json: bytes) -> bytes:
    """(Part of) a slot's metadata as stored: JSON compressed at the fastest level. A slot's metadata is one or
    more such streams, one after the other, whose JSON joined is the index: a trainer packs the part that does not
    change between versions (the tensors) once."""
    return zlib.compress(index_json, 1)


def unpack_meta(packed: bytes) -> bytes:
    """The index JSON of a slot's metadata: its streams decompressed and joined."""
    parts = []
    while packed:
        stream = zlib.decompressobj()
        parts.append(stream.decompress(packed))
        if not stream.eof:
            raise CheckpointError("a snapshot index in shared memory is cut short")
        packed = stream.unused_data
    return b"".join(parts)


def estimate_meta_capacity(index: SnapshotIndex) -> int:
    """Room for a slot's packed index: twice today's size (the trainer state varies a little), at least a page.
    A version whose index outgrows it gets a larger arena (checkpoint/keepers/arena_writer.py)."""
    return max(mmap.PAGESIZE, 2 * len(pack_meta(json.dumps(index.to_json()).encode())))
