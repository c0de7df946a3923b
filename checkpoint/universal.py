"""The on-disk universal checkpoint format: one directory per version, safetensors fragments + JSON metadata.

Layout of a checkpoint root::

    root/
      latest                          text: the directory name of the newest committed version
      step-000000000100/
        rank-00000.safetensors        this rank's fragments (only replica 0 of replicated data is written)
        rank-00000.json               this rank's fragment index; written after its data file is durable
        ...
        manifest.json                 merged indexes + trainer state; written last, by the coordinator

Every tensor has a logical name that does not depend on the parallel layout, a global shape and a dtype. A
fragment is a rectangular block of it (global offsets + local shape). Loading (checkpoint/reshard.py) asks, per
logical name, for the block the new layout needs and reads only the overlapping fragments, so any layout loads
any other.

Commit protocol (no process group needed, only a shared directory):
  1. every rank calls ``write_fragments(version_dir, rank, fragments)`` (checkpoint/universal_tensors.py; or
     a keeper, from a packed snapshot, checkpoint/direct_write.py's ``write_packed``): it writes its data file
     to a temp name, fsyncs, renames, then writes its index the same way. An existing index means "this rank's
     part is durable".
  2. one coordinator (rank 0, or the controller) calls ``commit_version`` once every rank's index exists
     (``wait_for_ranks`` polls for them). It checks that the fragments tile every tensor exactly, writes
     manifest.json (temp + fsync + rename), then atomically replaces ``latest`` and prunes old versions.
A crash at any point before the rename of ``latest`` leaves the previous version as the one that loads; a
version directory without manifest.json is never read. Before restarting training from a committed version,
the coordinator calls ``discard_uncommitted(root)`` so leftovers of a crashed attempt are never merged.

Checksums are xxh3-64 of each fragment's bytes: ~30 GiB/s on one core here (crc32 ~4, sha256 ~1.6), so
verification costs far less than reading the data; the threat is torn or flipped bytes, not an adversary.

This module does not import torch (the SnapshotKeeper actors use it and move only bytes); what takes or makes
tensors is in checkpoint/universal_tensors.py.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from functools import cached_property
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import xxhash

if TYPE_CHECKING:  # torch only in annotations: the keepers import this module and never load torch
    import torch

FORMAT_NAME = "orchestrate.universal"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
VERSION_PREFIX = "step-"

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded; the message names the file and/or tensor."""


# ---------------------------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class SliceSpec:
    """A rectangular block of a logical tensor: where it sits in the global tensor and how big it is."""

    global_shape: Shape
    offsets: Shape
    shape: Shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(d) for d in self.global_shape))
        object.__setattr__(self, "offsets", tuple(int(d) for d in self.offsets))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        dims = {len(self.global_shape), len(self.offsets), len(self.shape)}
        fits = all(0 <= o and o + s <= g for g, o, s in zip(self.global_shape, self.offsets, self.shape))
        if len(dims) != 1 or not fits:
            raise CheckpointError(f"block offsets={self.offsets} shape={self.shape} "
                                  f"does not fit in global shape {self.global_shape}")

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class FragmentSpec:
    """A local tensor and where it sits in its logical tensor. Only replica_id 0 of identical copies is written."""

    name: str
    global_shape: Shape
    offsets: Shape
    tensor: torch.Tensor
    replica_id: int = 0

    def __post_init__(self) -> None:
        try:
            self.slice
        except CheckpointError as error:
            raise CheckpointError(f"tensor {self.name!r}: {error}") from None

    @classmethod
    def whole(cls, name: str, tensor: torch.Tensor, replica_id: int = 0) -> "FragmentSpec":
        return cls(name, tuple(tensor.shape), (0,) * tensor.dim(), tensor, replica_id)

    @property
    def slice(self) -> SliceSpec:
        return SliceSpec(self.global_shape, self.offsets, tuple(self.tensor.shape))

    @cached_property  # read for every fragment on every snapshot: a string built once
    def key(self) -> str:
        """Unique per rank even when a rank holds several blocks of one tensor."""
        return f"{self.name}@{','.join(map(str, self.offsets))}"


@dataclass(frozen=True)
class FragmentRecord:
    """Where one written fragment lives; one entry of a tensor's fragment list in the manifest."""

    file: str
    key: str
    offsets: Shape
    shape: Shape
    checksum: str
    replica: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "key": self.key, "offsets": list(self.offsets), "shape": list(self.shape),
                "checksum": self.checksum, "replica": self.replica}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FragmentRecord":
        return cls(data["file"], data["key"], tuple(data["offsets"]), tuple(data["shape"]),
                   data["checksum"], data.get("replica", 0))


@dataclass(frozen=True)
class TensorRecord:
    dtype: str
    global_shape: Shape
    fragments: tuple[FragmentRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "global_shape": list(self.global_shape),
                "fragments": [f.to_json() for f in self.fragments]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorRecord":
        return cls(data["dtype"], tuple(data["global_shape"]),
                   tuple(FragmentRecord.from_json(f) for f in data["fragments"]))


@dataclass
class TrainerState:
    """The non-tensor state a resume needs. ``config`` is the resolved run config; ``extra`` is free JSON."""

    step: int
    samples_consumed: int = 0
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Its fields as they are (``asdict`` would deep-copy the config on every commit)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainerState":
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    directory: Path
    version: int
    trainer_state: TrainerState
    world_ranks: tuple[int, ...]
    file_bytes: dict[str, int]
    tensors: dict[str, TensorRecord]


# ---------------------------------------------------------------------------------------------- small helpers


def version_dir(root: str | os.PathLike, version: int) -> Path:
    return Path(root) / f"{VERSION_PREFIX}{version:012d}"


def _rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def _rank_index_path(directory: Path, rank: int) -> Path:
    return directory / f"{_rank_stem(rank)}.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {  # every dtype name a checkpoint may hold (dtype_name of a torch dtype) -> (bytes per element, its
    # dtype in a safetensors header)
    "float64": (8, "F64"), "float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"), "float8_e4m3fnuz": (1, "F8_E4M3FNUZ"), "float8_e5m2": (1, "F8_E5M2"),
    "float8_e5m2fnuz": (1, "F8_E5M2FNUZ"), "complex64": (8, "C64"), "bool": (1, "BOOL"),
    "int64": (8, "I64"), "int32": (4, "I32"), "int16": (2, "I16"), "int8": (1, "I8"),
    "uint64": (8, "U64"), "uint32": (4, "U32"), "uint16": (2, "U16"), "uint8": (1, "U8"),
}


def element_bytes(name: str) -> int:
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}")
    return DTYPES[name][0]


def checksum_bytes(data: np.ndarray) -> str:
    """The checksum of a fragment's bytes (a contiguous uint8 array)."""
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


def _fsync(path: Path) -> None:
    """fsync a file, or a directory so that renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """Readers see either the old file or the complete new one, and the new one survives a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({error})") from None


def _check_format(path: Path, data: Mapping[str, Any]) -> None:
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an {FORMAT_NAME} file (format={data.get('format')!r})")
    found = data.get("format_version")
    if not isinstance(found, int) or found > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {found!r} is newer than the supported version "
                              f"{FORMAT_VERSION}; load it with a newer orchestrate")


# ---------------------------------------------------------------------------------------------- writing


def writes_block(replica_id: int, block: SliceSpec) -> bool:
    """Whether a rank writes this block: only replica 0 of identical copies, and no empty block of a non-empty
    tensor (uneven sharding leaves some ranks one)."""
    empty_block = block.numel == 0 and prod(block.global_shape) > 0
    return replica_id == 0 and not empty_block


class RankIndex:
    """One rank's part of a version being written: the records of the fragments in its data file, by logical
    tensor, and the protocol that makes the data file and then this index durable. Shared by every writer of the
    data file (``write_fragments``; checkpoint/direct_write.py's ``write_packed``)."""

    def __init__(self, directory: str | os.PathLike, rank: int):
        self.directory, self.rank = Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_name = f"{_rank_stem(rank)}.safetensors"
        self.tensors: dict[str, dict[str, Any]] = {}
        self._keys: set[str] = set()

    def add(self, name: str, key: str, block: SliceSpec, dtype: str, digest: str) -> None:
        """Record fragment ``key`` (block ``block`` of tensor ``name``, whose bytes have checksum ``digest``)."""
        if key in self._keys:
            raise CheckpointError(f"rank {self.rank}: fragment {key!r} given twice")
        self._keys.add(key)
        entry = self.tensors.setdefault(name, {"dtype": dtype, "global_shape": list(block.global_shape),
                                               "fragments": []})
        if entry["dtype"] != dtype or tuple(entry["global_shape"]) != block.global_shape:
            raise CheckpointError(f"rank {self.rank}: fragments of tensor {name!r} disagree on dtype/shape")
        entry["fragments"].append(FragmentRecord(self.data_name, key, block.offsets, block.shape, digest).to_json())

    def commit(self, write_data: Callable[[Path], Any]) -> Path:
        """``write_data(path)`` writes the data file under a temp name; it is made durable and renamed, then this
        index is written the same way. Returns the index path."""
        data_path = self.directory / self.data_name
        tmp = data_path.with_name(self.data_name + ".tmp")
        write_data(tmp)
        _fsync(tmp)
        os.replace(tmp, data_path)
        index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "checksum": CHECKSUM_ALGORITHM,
                 "rank": self.rank, "files": {self.data_name: data_path.stat().st_size}, "tensors": self.tensors}
        index_path = _rank_index_path(self.directory, self.rank)
        _atomic_write_text(index_path, json.dumps(index))
        return index_path


def missing_ranks(directory: str | os.PathLike, world_ranks: Sequence[int]) -> list[int]:
    return [rank for rank in world_ranks if not _rank_index_path(Path(directory), rank).exists()]


def wait_for_ranks(directory: str | os.PathLike, world_ranks: Sequence[int], timeout_s: float,
                   poll_s: float = 0.05, stop: Callable[[], bool] = lambda: False) -> None:
    """Block until every rank's index exists in ``directory``; CheckpointError naming the missing ranks (after
    ``timeout_s``, or once ``stop()`` is true)."""
    deadline = time.monotonic() + timeout_s
    while missing := missing_ranks(directory, world_ranks):
        if stop():
            raise CheckpointError(f"{directory}: commit given up, ranks {missing} did not write their part")
        if time.monotonic() > deadline:
            raise CheckpointError(f"{directory}: ranks {missing} did not write their part within {timeout_s} s")
        time.sleep(poll_s)


def _merge_indexes(directory: Path, world_ranks: Sequence[int]) -> tuple[dict[str, int], dict[str, TensorRecord]]:
    file_bytes: dict[str, int] = {}
    merged: dict[str, TensorRecord] = {}
    for rank in world_ranks:
        path = _rank_index_path(directory, rank)
        index = _read_json(path, f"index of rank {rank}")
        _check_format(path, index)
        file_bytes.update(index["files"])
        for name, data in index["tensors"].items():
            record = TensorRecord.from_json(data)
            known = merged.get(name)
            if known is not None and (known.dtype, known.global_shape) != (record.dtype, record.global_shape):
                raise CheckpointError(f"{path}: tensor {name!r} is {record.dtype}{list(record.global_shape)} "
                                      f"but other ranks wrote {known.dtype}{list(known.global_shape)}")
            fragments = (known.fragments if known else ()) + record.fragments
            merged[name] = TensorRecord(record.dtype, record.global_shape, fragments)
    return file_bytes, merged


def block_overlap(a_offsets: Shape, a_shape: Shape, b_offsets: Shape,
                  b_shape: Shape) -> Optional[tuple[Shape, Shape]]:
    """The intersection of two blocks as (global start, shape), or None if it is empty."""
    starts = tuple(max(ao, bo) for ao, bo in zip(a_offsets, b_offsets))
    ends = tuple(min(ao + asz, bo + bsz) for ao, asz, bo, bsz in zip(a_offsets, a_shape, b_offsets, b_shape))
    shape = tuple(e - s for s, e in zip(starts, ends))
    if any(d <= 0 for d in shape):
        return None
    return starts, shape


def _first_overlap(fragments: Sequence[FragmentRecord]) -> Optional[tuple[FragmentRecord, FragmentRecord]]:
    """Sweep along the dim with the most distinct offsets, so a grid of a x b blocks costs ~n^2/max(a, b)."""
    ndim = len(fragments[0].offsets) if fragments else 0
    if ndim == 0:
        return tuple(fragments[:2]) if len(fragments) > 1 else None
    dim = max(range(ndim), key=lambda d: len({f.offsets[d] for f in fragments}))
    active: list[FragmentRecord] = []
    for fragment in sorted(fragments, key=lambda f: f.offsets[dim]):
        active = [f for f in active if f.offsets[dim] + f.shape[dim] > fragment.offsets[dim]]
        for other in active:
            if block_overlap(other.offsets, other.shape, fragment.offsets, fragment.shape):
                return other, fragment
        active.append(fragment)
    return None


def _check_tiling(directory: Path, name: str, record: TensorRecord) -> None:
    """Fragments must cover the tensor exactly once, or the version is incomplete or mixes two layouts."""
    if pair := _first_overlap(record.fragments):
        first, second = pair
        raise CheckpointError(f"{directory}: tensor {name!r} has overlapping fragments "
                              f"{first.key!r} ({first.file}) and {second.key!r} ({second.file})")
    covered = sum(prod(f.shape) for f in record.fragments)
    if covered != prod(record.global_shape):
        raise CheckpointError(f"{directory}: tensor {name!r} fragments cover {covered} of "
                              f"{prod(record.global_shape)} elements (a rank's part is missing)")


def commit_version(root: str | os.PathLike, version: int, trainer_state: TrainerState,
                   world_ranks: Sequence[int], keep: int = 2) -> Path:
    """Make ``version`` the one ``latest`` loads. Every rank's index must exist (see ``wait_for_ranks``)."""
    root = Path(root)
    directory = version_dir(root, version)
    if missing := missing_ranks(directory, world_ranks):
        raise CheckpointError(f"{directory}: cannot commit version {version}, ranks {missing} have not "
                              f"written their part")
    file_bytes, tensors = _merge_indexes(directory, world_ranks)
    for name, record in tensors.items():
        _check_tiling(directory, name, record)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "checksum": CHECKSUM_ALGORITHM,
                "version": version, "world_ranks": list(world_ranks), "trainer_state": trainer_state.to_json(),
                "files": file_bytes, "tensors": {name: r.to_json() for name, r in sorted(tensors.items())}}
    # no indent: json's C encoder only writes compact text, the pure-Python one takes ~10x longer on the keepers' CPU
    _atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest))
    _atomic_write_text(root / LATEST_FILE, directory.name + "\n")
    prune(root, keep)
    return directory


# ---------------------------------------------------------------------------------------------- versions


def _version_dirs(root: Path) -> dict[int, Path]:
    found = {}
    for path in root.glob(f"{VERSION_PREFIX}*"):
        suffix = path.name[len(VERSION_PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    return found


def committed_versions(root: str | os.PathLike) -> list[int]:
    dirs = _version_dirs(Path(root))
    return sorted(v for v, path in dirs.items() if (path / MANIFEST_FILE).exists())


def prune(root: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` committed versions; drop every version directory older than those."""
    if keep < 1:
        raise CheckpointError(f"checkpoint keep={keep}: must be at least 1")
    root = Path(root)
    kept = committed_versions(root)[-keep:]
    if not kept:
        return
    for version, path in _version_dirs(root).items():
        if version < kept[0]:
            (path / MANIFEST_FILE).unlink(missing_ok=True)  # uncommit first, so a crash mid-delete is harmless
            shutil.rmtree(path, ignore_errors=True)


def discard_uncommitted(root: str | os.PathLike) -> list[int]:
    """Remove version directories newer than ``latest`` (debris of a crashed attempt). Call before resuming."""
    root = Path(root)
    latest = latest_version_dir(root)
    newest = int(latest.name[len(VERSION_PREFIX):]) if latest else -1
    removed = [v for v, path in _version_dirs(root).items() if v > newest]
    for version in removed:
        shutil.rmtree(version_dir(root, version), ignore_errors=True)
    return sorted(removed)


def latest_version_dir(root: str | os.PathLike) -> Optional[Path]:
    """The directory ``latest`` points at, or None when nothing was committed yet."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.exists():
        return None
    directory = Path(root) / pointer.read_text().strip()
    if not (directory / MANIFEST_FILE).exists():
        raise CheckpointError(f"{pointer}: points at {directory.name}, which has no {MANIFEST_FILE}")
    return directory


def resolve_version_dir(path: str | os.PathLike) -> Path:
    """A checkpoint root (follow its ``latest`` pointer) or one version directory -> the version to read."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    latest = latest_version_dir(path)
    if latest is not None:
        return latest
    if (path / MANIFEST_FILE).exists():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint root with a committed version ('{LATEST_FILE}') nor a "
                          f"version directory with {MANIFEST_FILE}")


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(directory: str | os.PathLike) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no manifest, the version is incomplete or was never committed")
    data = _read_json(path, "manifest")
    _check_format(path, data)
    if data.get("checksum") != CHECKSUM_ALGORITHM:
        raise CheckpointError(f"{path}: unsupported checksum algorithm {data.get('checksum')!r}")
    try:
        return Manifest(directory, data["version"], TrainerState.from_json(data["trainer_state"]),
                        tuple(data["world_ranks"]), dict(data["files"]),
                        {name: TensorRecord.from_json(t) for name, t in data["tensors"].items()})
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: malformed manifest ({error!r})") from None
