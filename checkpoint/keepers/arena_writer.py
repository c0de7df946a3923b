"""The trainer's side of its arena in the keeper's shared memory (checkpoint/keepers/arena.py): each version of
the rank's training state packed straight into a slot and published. The keeper's side, arena.py, does not import
torch; this module does."""
from __future__ import annotations

import json
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from orchestrate.checkpoint.background_copy import copy_tensors
from orchestrate.checkpoint.identity_memo import IdentityMemo
from orchestrate.checkpoint.keepers.arena import HELD, TRAINER_STATE_META, Arena, ArenaHandle, pack_meta
from orchestrate.checkpoint.snapshot_codec import pack_into, plan_index, tensor_views
from orchestrate.checkpoint.snapshot_index import SnapshotIndex, zero_gaps
from orchestrate.checkpoint.universal import CheckpointError, FragmentSpec, TrainerState

INLINE_COPY_BYTES = 1 << 20  # a version whose step left at most this much to copy is copied on the trainer's thread


def write_snapshot(arena: Arena, version: int, index: SnapshotIndex, fragments: Sequence[FragmentSpec],
                   keep_every: int = 0) -> bool:
    """Pack ``fragments`` (laid out by ``index``) into ``arena`` as ``version``; see ``Arena.publish``."""
    meta = pack_meta(json.dumps(index.to_json()).encode())
    return arena.publish(version, index.nbytes, meta,
                         lambda slot: pack_into(index, fragments, arena.payload(slot, index.nbytes)), keep_every)


class ArenaWriter:
    """The checkpoint engine's level-0 target when keepers are on: each version is packed straight into a slot of
    this rank's arena. ``reallocate(payload_nbytes, meta_nbytes) -> ArenaHandle`` asks the keeper for a larger
    arena when a snapshot outgrows the slots (state that appears late, e.g. an outer optimizer's momentum, or a
    trainer state whose index no longer fits).
    ``keep_every``: versions that are multiples of it go to disk; they are not overwritten before a commit."""

    def __init__(self, handle: ArenaHandle, reallocate=None, keep_every: int = 0):
        self.arena = Arena.attach(handle)
        self.reallocate, self.keep_every = reallocate, keep_every
        self.handed_version: Optional[int] = None
        self.reported_step: Optional[int] = None  # the newest step whose report the controller took: spared
        self.skipped = 0
        self.copied_bytes = 0  # bytes the last version's copy moved (what the step did not write in place)
        self._lock = threading.Lock()  # the copy thread writes while the control thread may switch arenas
        self._layout: Optional[_CachedLayout] = None
        self._laid_out = IdentityMemo()  # lists of fragments found to have ``_layout``
        self._views: dict[int, list[torch.Tensor]] = {}  # slot -> tensor views of its payload
        self._views_by_key: dict[int, dict[str, torch.Tensor]] = {}  # slot -> fragment key -> its view
        self._pending = IdentityMemo()  # lists of fragments -> {slot: what ``_fill`` copies into it}
        self._begun: Optional[tuple[int, int, _CachedLayout]] = None  # (version, slot, layout) taken by ``begin``

    def replace(self, handle: ArenaHandle) -> None:
        """Write into another arena from the next version on (this node's keeper was replaced)."""
        with self._lock:
            self.arena.close()
            self.arena, self._begun = Arena.attach(handle), None
            self._forget_views()

    def begin(self, version: int, fragments: list[FragmentSpec]) -> Optional[dict[str, torch.Tensor]]:
        """Take the slot ``version`` will be published in before its state exists, laid out for ``fragments`` (the
        state as it is now: the same tensors the step is about to update): fragment key -> tensor view of that
        slot (the same dict each time for a slot and layout: read it, do not change it). A step that writes its
        results into these views makes them the snapshot (``copy_version`` then copies only the other tensors).
        None when a slot is not free or the layout does not fit the arena."""
        layout = self._layout_of(fragments)
        with self._lock:
            if layout.index.nbytes > self.arena.layout.payload_capacity:
                return None
            slot = self.arena.take_slot(version, self.keep_every, self.reported_step)
            if slot is None:
                return None
            self._begun = (version, slot, layout)
            views = self._views_by_key.get(slot)
            if views is None:
                views = self._views_by_key[slot] = dict(zip(layout.keys, self._slot_views(slot, layout.index)))
            return views

    def copies_little(self, version: int, fragments: list[FragmentSpec]) -> bool:
        """Whether the step wrote ``version`` into the slot ``begin`` took for it and left at most
        ``INLINE_COPY_BYTES`` to copy (step counts, small buffers)."""
        layout = self._layout_of(fragments)
        with self._lock:
            begun = self._begun
            if begun is None or begun[0] != version or begun[2] is not layout:
                return False
            pending = self._to_copy(begun[1], layout.index, fragments)
        return sum(view.nbytes for view, _ in pending) <= INLINE_COPY_BYTES

    def copy_version(self, version: int, fragments: list[FragmentSpec], trainer_state: TrainerState) -> bool:
        """Pack ``version`` into a slot (the one ``begin`` took for it, if any); False when it is skipped (every
        slot claimed by the keeper). Fragments that already are the slot's views are not copied."""
        layout = self._layout_of(fragments)
        meta = layout.packed_meta(trainer_state)
        with self._lock:
            begun, self._begun = self._begun, None
            slot = None
            if begun is not None and begun[0] == version:
                if begun[2] is not layout:
                    # the step wrote into the views of a layout this version no longer has
                    raise CheckpointError(f"version {version}: the snapshot's tensors changed after the step began")
                slot = begun[1]
            if not self.arena.fits(layout.index.nbytes, meta) and self.reallocate is not None:
                # a slot ``begin`` took in the old arena is left behind: its tensors (the step's results, still
                # mapped through them) are copied into the new one like any others
                held = self.arena.layout
                handle = self.reallocate(max(layout.index.nbytes, held.payload_capacity),
                                         max(2 * len(meta), held.meta_capacity))
                self.arena.close()
                self.arena, slot = Arena.attach(handle), None
                self._forget_views()
            self.arena.check_fits(version, layout.index.nbytes, meta)
            if slot is None:
                slot = self.arena.take_slot(version, self.keep_every, self.reported_step)
            if slot is not None:
                self._fill(slot, layout.index, fragments)
                self.arena.publish_slot(slot, meta)
        if slot is None:
            self.skipped += 1
            return False
        self.handed_version = version
        return True

    def _layout_of(self, fragments: list[FragmentSpec]) -> "_CachedLayout":
        """The packed layout, planned again only when the tensors' names, shapes or dtypes change: planning and
        JSON-encoding it every step cost more CPU than copying a small model's state."""
        layout = self._laid_out.get(fragments)  # the very same fragments as before (the caller reuses them)
        if layout is not None:
            return layout
        signature = tuple((f.key, f.global_shape, tuple(f.tensor.shape), f.tensor.dtype, f.replica_id)
                          for f in fragments)
        if self._layout is None or self._layout.signature != signature:
            self._layout = _CachedLayout(signature, plan_index(fragments))
            self._laid_out.clear()
            self._forget_views()
        return self._laid_out.put(fragments, self._layout)

    def _forget_views(self) -> None:
        """After the arena or the layout changed: the slots' views, and what was found missing in them."""
        self._views, self._views_by_key = {}, {}
        self._pending.clear()

    def _slot_views(self, slot: int, index: SnapshotIndex) -> list[torch.Tensor]:
        """Tensor views of a slot's payload, made once per slot and layout (alignment gaps zeroed then; the
        tensors' own bytes are all written by each version, so zeroing them too would be a wasted pass)."""
        views = self._views.get(slot)
        if views is None:
            payload = self.arena.payload(slot, index.nbytes)
            zero_gaps(index, payload)
            views = self._views[slot] = tensor_views(index, payload)
        return views

    def _fill(self, slot: int, index: SnapshotIndex, fragments: list[FragmentSpec]) -> None:
        """Copy the tensors into the slot, except those that already are its views (a step wrote them there)."""
        pending = self._to_copy(slot, index, fragments)
        self.copied_bytes = copy_tensors([view for view, _ in pending], [tensor for _, tensor in pending])

    def _to_copy(self, slot: int, index: SnapshotIndex, fragments: list[FragmentSpec]) -> list[tuple]:
        """(view, tensor) of the fragments whose tensor is not already the slot's view of it. Worked out once per
        list of fragments and slot: a fragment's tensor stays where it was when the fragment was made."""
        by_slot = self._pending.get(fragments)
        if by_slot is None:
            by_slot = self._pending.put(fragments, {})
        pending = by_slot.get(slot)
        if pending is None:
            pending = by_slot[slot] = [(view, fragment.tensor) for view, fragment
                                       in zip(self._slot_views(slot, index), fragments)
                                       if view.data_ptr() != fragment.tensor.data_ptr()]
        return pending

    def held_versions(self) -> list[int]:
        """Versions this rank's arena holds complete."""
        return sorted(self.arena.slots_in(HELD))

    def read(self, version: int) -> tuple[dict, np.ndarray]:
        """(index JSON, payload view) of a held version: a surviving rank rolls back to it, or sends it."""
        slot = self.arena.slots_in(HELD).get(version)
        if slot is None:
            raise CheckpointError(f"version {version} is not in this rank's arena (it holds "
                                  f"{self.held_versions()})")
        return self.arena.read(slot)

    def close(self) -> None:
        self.arena.close()


class _CachedLayout:
    """A planned index and its JSON without the per-version meta, spliced around it for each version: the
    tensors' part (most of it: hundreds of entries) is packed once, only the head with the meta every version."""

    def __init__(self, signature: tuple, index: SnapshotIndex):
        self.signature, self.index = signature, index
        self.keys = [entry.key for entry in index.tensors]
        document = index.to_json()
        head = {key: document[key] for key in ("format", "format_version", "nbytes")}
        self._head = json.dumps(head)[:-1]
        self._packed_tail = pack_meta(f', "tensors": {json.dumps(document["tensors"])}}}'.encode())
        self._config: Optional[dict] = None
        self._packed_config = b""

    def packed_meta(self, trainer_state: TrainerState) -> bytes:
        """A slot's metadata for a version with ``trainer_state`` (arena.py's ``pack_meta``). Its config, the
        run's (the largest part, the same all run long), is packed once per config object."""
        state = trainer_state.to_json()
        config = state.pop("config")
        if config is not self._config:
            self._config = config
            self._packed_config = pack_meta(f'"config": {json.dumps(config)}}}}}'.encode())
        head = f'{self._head}, "meta": {{"{TRAINER_STATE_META}": {json.dumps(state)[:-1]}, '
        return pack_meta(head.encode()) + self._packed_config + self._packed_tail
