"""Writing a rank's part of a universal-checkpoint version (checkpoint/universal.py) straight from its packed
snapshot payload (checkpoint/snapshot_codec.py), with O_DIRECT.

Why by hand: safetensors has no API that writes a file from an existing buffer with O_DIRECT; ``save_file``
writes through the page cache. On a node whose cores all train, copying a GiB into the page cache and writing it
back costs the training ~2 s of compute even at nice 19; with O_DIRECT the disk reads the arena's pages by DMA
and the training loses ~0.26 s. So the keeper writes the payload's own bytes, and only a short header is made.

The data file is an ordinary safetensors file, read by fragment key like the one ``write_fragments`` makes (same
keys, dtypes, shapes and bytes, so the same checksums and the same rank index apart from the file's size)::

    [8 bytes: N, little-endian][N bytes: JSON header, padded with spaces so that 8 + N is a multiple of 4096]
    [extent 1][extent 2]...                  the data section

An extent is a page-aligned byte range of the payload, copied as it is: the pages that hold the tensors the rank
writes (replica 0, no empty block of a non-empty tensor; ``writes_block``), touching or overlapping ranges merged.
Each written tensor is listed under its fragment key at its place in the data section. safetensors requires the
entries to tile the data section exactly, so every other byte (alignment gaps, bytes of a tensor not written, the
rounding to pages) is covered by U8 entries named ``__pad__.<i>``: fragment keys always contain "@", so they never
collide, and readers (checkpoint/reshard.py) look up only the keys the manifest lists.

O_DIRECT needs the buffer address, file offset and length of every write to be multiples of the logical block
size (4096 covers the usual 512 and 4096). The header block comes from an anonymous mapping (page aligned), the
extents from the payload, whose start is page aligned in the keeper's arena (checkpoint/keepers/arena.py). Only the
last extent can end mid-page (where the payload ends): that tail is written after O_DIRECT is cleared. Where
O_DIRECT is refused (EINVAL: e.g. tmpfs before Linux 6.6) or the payload is not page aligned, the same bytes
are written buffered.
"""
from __future__ import annotations

import bisect
import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from orchestrate.checkpoint.snapshot_index import PackedTensor, SnapshotIndex, entry_bytes
from orchestrate.checkpoint.universal import DTYPES, CheckpointError, RankIndex, SliceSpec, checksum_bytes, writes_block

log = logging.getLogger(__name__)

PAGE = 4096  # O_DIRECT alignment of addresses, offsets and lengths
CHUNK_BYTES = 64 << 20  # bytes per write call
PAD_PREFIX = "__pad__."  # names of the filler entries; a fragment key always contains "@"
DIRECT, BUFFERED = "O_DIRECT", "buffered"  # how a file was written
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: always buffered


Extent = tuple[int, int]  # [start, end) bytes of the payload


def floor_page(nbytes: int) -> int:
    return nbytes // PAGE * PAGE


def ceil_page(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


@dataclass(frozen=True)
class FileLayout:
    """A data file: its header block (length prefix + padded JSON, whole pages), then the extents' bytes."""

    header: bytes
    extents: tuple[Extent, ...]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(end - start for start, end in self.extents)


# ---------------------------------------------------------------------------------------------- writing a rank


def write_packed(directory: str | os.PathLike, rank: int, index: SnapshotIndex | Mapping[str, Any],
                 payload: np.ndarray) -> Path:
    """What ``write_fragments(directory, rank, unpack(index, payload))`` writes, the data file written from the
    payload's own pages (O_DIRECT where the filesystem allows). Returns the rank's index path."""
    index = index if isinstance(index, SnapshotIndex) else SnapshotIndex.from_json(index)
    rank_index = RankIndex(directory, rank)
    entries = []
    for entry, data in zip(index.tensors, entry_bytes(index, payload)):  # entry_bytes checks the layout
        block = SliceSpec(entry.global_shape, entry.offsets, entry.shape)
        if writes_block(entry.replica_id, block):
            rank_index.add(entry.name, entry.key, block, entry.dtype, checksum_bytes(data))
            entries.append(entry)
    layout = plan_file(entries, index.nbytes)
    return rank_index.commit(lambda tmp: _timed_write(tmp, layout, np.asarray(payload)))


def _timed_write(path: Path, layout: FileLayout, payload: np.ndarray) -> None:
    started = time.perf_counter()
    how = write_safetensors(path, layout, payload)
    log.debug("%s: %d bytes written %s in %.3f s", path, layout.nbytes, how, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- the file's layout


def plan_file(entries: Sequence[PackedTensor], payload_nbytes: int) -> FileLayout:
    """The data file holding ``entries`` (tensors of a payload of ``payload_nbytes`` bytes)."""
    extents = plan_extents(entries, payload_nbytes)
    return FileLayout(encode_header(header_entries(entries, extents)), tuple(extents))


def plan_extents(entries: Iterable[PackedTensor], payload_nbytes: int) -> list[Extent]:
    """The pages holding the entries' bytes, in payload order, touching or overlapping ranges merged."""
    extents: list[Extent] = []
    for entry in sorted(entries, key=lambda e: e.byte_offset):
        if entry.nbytes == 0:
            continue
        start = floor_page(entry.byte_offset)
        end = min(ceil_page(entry.byte_offset + entry.nbytes), payload_nbytes)
        if extents and start <= extents[-1][1]:
            extents[-1] = (extents[-1][0], max(extents[-1][1], end))
        else:
            extents.append((start, end))
    return extents


def header_entries(entries: Sequence[PackedTensor], extents: Sequence[Extent]) -> dict[str, dict[str, Any]]:
    """The safetensors header: each entry at its place in the data section, padding entries for the rest."""
    starts = [start for start, _ in extents]
    bases = np.cumsum([0] + [end - start for start, end in extents]).tolist()  # data offset of each extent
    tensors, spans = {}, []
    for entry in entries:
        begin = 0  # an empty tensor may sit anywhere; it takes no bytes
        if entry.nbytes:
            extent = bisect.bisect_right(starts, entry.byte_offset) - 1
            begin = bases[extent] + entry.byte_offset - starts[extent]
            spans.append((begin, begin + entry.nbytes))
        tensors[entry.key] = {"dtype": safetensors_dtype(entry), "shape": list(entry.shape),
                              "data_offsets": [begin, begin + entry.nbytes]}
    return {**tensors, **padding_entries(spans, bases[-1])}


def padding_entries(spans: Iterable[Extent], data_nbytes: int) -> dict[str, dict[str, Any]]:
    """U8 entries covering the bytes of the data section that no span covers."""
    pads: dict[str, dict[str, Any]] = {}
    covered = 0
    for begin, end in sorted(spans) + [(data_nbytes, data_nbytes)]:
        if begin < covered:
            raise CheckpointError(f"snapshot: tensors overlap at byte {begin} of the data section")
        if begin > covered:
            pads[f"{PAD_PREFIX}{len(pads)}"] = {"dtype": "U8", "shape": [begin - covered],
                                                "data_offsets": [covered, begin]}
        covered = end
    return pads


def safetensors_dtype(entry: PackedTensor) -> str:
    try:
        return DTYPES[entry.dtype][1]
    except KeyError:
        raise CheckpointError(f"snapshot: tensor {entry.key!r} has dtype {entry.dtype}, which safetensors "
                              f"cannot store") from None


def encode_header(tensors: Mapping[str, Any]) -> bytes:
    """Length prefix + JSON, padded with spaces to whole pages so that the data section starts page aligned."""
    text = json.dumps(tensors, separators=(",", ":")).encode()
    length = ceil_page(8 + len(text)) - 8
    return struct.pack("<Q", length) + text.ljust(length, b" ")


# ---------------------------------------------------------------------------------------------- the writes


def write_safetensors(path: str | os.PathLike, layout: FileLayout, payload: np.ndarray) -> str:
    """Write the file ``layout`` describes from ``payload`` (not synced); returns how: DIRECT or BUFFERED."""
    if O_DIRECT and payload.ctypes.data % PAGE == 0:
        try:
            _write_file(path, layout, payload, O_DIRECT)
            return DIRECT
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: O_DIRECT or its alignment refused here
                raise
            log.debug("%s: O_DIRECT refused (%s), writing through the page cache", path, error)
    _write_file(path, layout, payload, 0)
    return BUFFERED


def _write_file(path: str | os.PathLike, layout: FileLayout, payload: np.ndarray, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        position = _write_header(fd, layout.header)
        data = memoryview(payload).cast("B")
        for start, end in layout.extents:
            position = _write_extent(fd, data[start:end], position)
    finally:
        os.close(fd)


def _write_header(fd: int, header: bytes) -> int:
    with mmap.mmap(-1, len(header)) as block:  # an anonymous mapping: page-aligned memory, as O_DIRECT needs
        block[:] = header
        with memoryview(block) as view:
            return _write_all(fd, view, 0)


def _write_extent(fd: int, data: memoryview, position: int) -> int:
    """Whole pages as they are; a tail shorter than a page (the payload's end) after clearing O_DIRECT."""
    body = floor_page(len(data))
    position = _write_all(fd, data[:body], position)
    if body < len(data):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
        position = _write_all(fd, data[body:], position)
    return position


def _write_all(fd: int, data: memoryview, position: int) -> int:
    """``data`` at file offset ``position`` in chunks; returns the offset after it."""
    for begin in range(0, len(data), CHUNK_BYTES):
        chunk = data[begin:begin + CHUNK_BYTES]
        while len(chunk):
            written = os.pwrite(fd, chunk, position)
            if written == 0:
                raise OSError(errno.EIO, f"write of {len(chunk)} bytes at offset {position} wrote nothing")
            chunk, position = chunk[written:], position + written
    return position
