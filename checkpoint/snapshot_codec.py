"""One rank's snapshot as ONE flat uint8 buffer plus a JSON-able index, and back (JSON and raw tensor bytes only:
no Python-object serialization).

A snapshot is the list of FragmentSpec a rank's engine copies into its arena (checkpoint/engine.py). To hand it to
a SnapshotKeeper in another process it is packed: every tensor's bytes at an aligned offset of one buffer, and an
index that records, per tensor, its logical name, global shape and offsets (the universal-format block), local
shape, dtype, replica id, byte offset and length. Unpacking returns tensors that are views of the buffer.

Every block starts on a 64-byte boundary and the payload length is a multiple of 64: ``Tensor.view(dtype)`` needs
element-aligned offsets, and keepers concatenate payloads and cut them into erasure-coding chunks, which stay
aligned that way. The index and the payload's layout are in checkpoint/snapshot_index.py, which does not import
torch (the keepers use it); this module is the tensors' side.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from orchestrate.checkpoint.background_copy import copy_tensor
from orchestrate.checkpoint.snapshot_index import PackedTensor, SnapshotIndex, align, check_layout, zero_gaps
from orchestrate.checkpoint.universal import CheckpointError, FragmentSpec, dtype_name
from orchestrate.checkpoint.universal_tensors import dtype_from_name


def plan_index(fragments: Sequence[FragmentSpec], meta: Optional[Mapping[str, Any]] = None) -> SnapshotIndex:
    """The layout the fragments would be packed into; nothing is copied."""
    packed, offset, keys = [], 0, set()
    for fragment in fragments:
        if fragment.key in keys:
            raise CheckpointError(f"snapshot: fragment {fragment.key!r} given twice")
        keys.add(fragment.key)
        tensor = fragment.tensor
        nbytes = tensor.numel() * tensor.element_size()
        packed.append(PackedTensor(fragment.name, fragment.global_shape, fragment.offsets, tuple(tensor.shape),
                                   dtype_name(tensor.dtype), fragment.replica_id, offset, nbytes))
        offset = align(offset + nbytes)
    return SnapshotIndex(tuple(packed), offset, dict(meta or {}))


def pack(fragments: Sequence[FragmentSpec], meta: Optional[Mapping[str, Any]] = None
         ) -> tuple[SnapshotIndex, np.ndarray]:
    """The fragments copied into one new uint8 buffer (to reuse a buffer across versions, see ``pack_into``)."""
    index = plan_index(fragments, meta)
    return index, pack_into(index, fragments, np.empty(index.nbytes, dtype=np.uint8))


def pack_into(index: SnapshotIndex, fragments: Sequence[FragmentSpec], out: np.ndarray) -> np.ndarray:
    """Copy the fragments (laid out by ``plan_index``) into ``out[:index.nbytes]``, returned. Reusing ``out`` across
    versions avoids a page fault per page of fresh memory. Sources may live on any device."""
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.writeable or out.nbytes < index.nbytes:
        raise CheckpointError(f"pack: out must be a writable 1-D uint8 array of at least {index.nbytes} bytes")
    if len(fragments) != len(index.tensors):
        raise CheckpointError(f"pack: {len(fragments)} fragments for an index of {len(index.tensors)}")
    payload = out[:index.nbytes]
    zero_gaps(index, payload)
    for fragment, view in zip(fragments, tensor_views(index, payload)):
        copy_tensor(view, fragment.tensor)
    return payload


def tensor_views(index: SnapshotIndex, payload) -> list[torch.Tensor]:
    """One tensor per index entry, each a view of the payload (no copy).

    A read-only payload (e.g. from ``ray.get``) gives read-only memory: copy out of these tensors, never into them.
    """
    array = check_layout(index, payload)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    views = []
    for entry in index.tensors:
        raw = flat[entry.byte_offset:entry.byte_offset + entry.nbytes]
        views.append(raw.view(dtype_from_name(entry.dtype)).reshape(entry.shape))
    return views


def unpack(index: SnapshotIndex | Mapping[str, Any], payload) -> list[FragmentSpec]:
    """The fragments of a packed snapshot; their tensors are views of ``payload`` (see ``tensor_views``)."""
    index = index if isinstance(index, SnapshotIndex) else SnapshotIndex.from_json(index)
    return [FragmentSpec(entry.name, entry.global_shape, entry.offsets, view, entry.replica_id)
            for entry, view in zip(index.tensors, tensor_views(index, payload))]


def copy_into(targets: Iterable[FragmentSpec], index: SnapshotIndex | Mapping[str, Any], payload) -> None:
    """Restore live tensors (same layout as when packed) in place, matched by fragment key."""
    held = {fragment.key: fragment for fragment in unpack(index, payload)}
    targets = list(targets)
    missing = [target.key for target in targets if target.key not in held]
    if missing:
        raise CheckpointError(f"snapshot lacks fragments {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                              f"the layout changed, restore from disk (reshard on load) instead")
    with torch.no_grad():
        for target in targets:
            source = held[target.key].tensor
            if tuple(source.shape) != tuple(target.tensor.shape):
                raise CheckpointError(f"snapshot: fragment {target.key!r} has shape {list(source.shape)}, "
                                      f"the live tensor {list(target.tensor.shape)}")
            target.tensor.copy_(source)
