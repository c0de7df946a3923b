"""The layout of a packed snapshot (checkpoint/snapshot_codec.py packs and unpacks the tensors): one flat uint8
payload and its JSON-able index, checked and cut into each fragment's bytes without torch, as the SnapshotKeeper
actors do (they hold, encode and write snapshots but never need a tensor, so they never load torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any, Mapping

import numpy as np

from orchestrate.checkpoint.universal import CheckpointError, Shape, element_bytes

FORMAT_NAME = "orchestrate.snapshot"
FORMAT_VERSION = 1
ALIGNMENT = 64


def align(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class PackedTensor:
    """Where one fragment's bytes sit in the payload, and which block of which logical tensor it is."""

    name: str
    global_shape: Shape
    offsets: Shape
    shape: Shape
    dtype: str
    replica_id: int
    byte_offset: int
    nbytes: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PackedTensor":
        return cls(data["name"], tuple(data["global_shape"]), tuple(data["offsets"]), tuple(data["shape"]),
                   data["dtype"], int(data["replica_id"]), int(data["byte_offset"]), int(data["nbytes"]))

    @property
    def key(self) -> str:
        return f"{self.name}@{','.join(map(str, self.offsets))}"


@dataclass(frozen=True)
class SnapshotIndex:
    """The layout of a packed payload. ``meta`` is free JSON that travels with it (e.g. the trainer state)."""

    tensors: tuple[PackedTensor, ...]
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "nbytes": self.nbytes,
                "meta": self.meta, "tensors": [asdict(t) for t in self.tensors]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SnapshotIndex":
        if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"not an {FORMAT_NAME} v{FORMAT_VERSION} index "
                                  f"(format={data.get('format')!r}, version={data.get('format_version')!r})")
        return cls(tuple(PackedTensor.from_json(t) for t in data["tensors"]), int(data["nbytes"]),
                   dict(data.get("meta") or {}))


def zero_gaps(index: SnapshotIndex, payload: np.ndarray) -> None:
    """Alignment padding is zeroed so that equal snapshots are equal byte for byte."""
    ends = [t.byte_offset + t.nbytes for t in index.tensors]
    starts = [t.byte_offset for t in index.tensors[1:]] + [index.nbytes]
    for end, start in zip(ends, starts):
        payload[end:start] = 0


def _as_payload(index: SnapshotIndex, payload) -> np.ndarray:
    array = np.asarray(payload)
    if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
        raise CheckpointError("snapshot payload must be a contiguous 1-D uint8 array")
    if array.nbytes != index.nbytes:
        raise CheckpointError(f"snapshot payload holds {array.nbytes} bytes, its index says {index.nbytes}")
    return array


def check_layout(index: SnapshotIndex, payload) -> np.ndarray:
    """The payload as a 1-D uint8 array, once every entry of the index is checked to fit it."""
    array = _as_payload(index, payload)
    for entry in index.tensors:
        if entry.nbytes != prod(entry.shape) * element_bytes(entry.dtype):
            raise CheckpointError(f"snapshot: tensor {entry.key!r} claims {entry.nbytes} bytes for "
                                  f"{entry.dtype}{list(entry.shape)}")
        if entry.byte_offset % ALIGNMENT or entry.byte_offset + entry.nbytes > array.nbytes:
            raise CheckpointError(f"snapshot: tensor {entry.key!r} at byte {entry.byte_offset} does not fit "
                                  f"the {array.nbytes}-byte payload")
    return array


def entry_bytes(index: SnapshotIndex, payload) -> list[np.ndarray]:
    """Each entry's bytes, a view of the payload (checked with ``check_layout``)."""
    array = check_layout(index, payload)
    return [array[entry.byte_offset:entry.byte_offset + entry.nbytes] for entry in index.tensors]
