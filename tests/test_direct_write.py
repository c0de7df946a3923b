"""checkpoint/direct_write.py: a rank's data file written straight from its packed snapshot payload reads back
like the one ``write_fragments`` writes, with O_DIRECT on a disk and buffered where that is refused."""
import errno
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from orchestrate.checkpoint import direct_write
from orchestrate.checkpoint.direct_write import BUFFERED, DIRECT, PAD_PREFIX, PAGE, plan_file, write_packed, write_safetensors
from orchestrate.checkpoint.reshard import load_slices
from orchestrate.checkpoint.keepers.arena import HELD, Arena, ArenaLayout, estimate_meta_capacity
from orchestrate.checkpoint.keepers.arena_writer import write_snapshot
from orchestrate.checkpoint.snapshot_codec import pack_into, plan_index, unpack
from orchestrate.checkpoint.universal import FragmentSpec, SliceSpec, TrainerState, commit_version, version_dir, writes_block
from orchestrate.checkpoint.universal_tensors import write_fragments

SHM = Path("/dev/shm")


def full_tensors():
    generator = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(5, 700, generator=generator),
            "odd": torch.randn(7, generator=generator),  # 28 bytes: an alignment gap follows
            "emb": torch.randn(33, generator=generator).to(torch.bfloat16),
            "step": torch.tensor(12345678901, dtype=torch.int64),
            "big": torch.randn(3000, generator=generator),  # pages of it sit between rank 0's written tensors
            "uneven": torch.arange(4, dtype=torch.float32),
            "nothing": torch.empty(0, 3)}


def rank_fragments(rank):
    """Two ranks that together hold every tensor once as replica 0, with replicas and an empty block besides."""
    full = full_tensors()

    def block(name, start, stop, replica_id=0):
        tensor = full[name]
        return FragmentSpec(name, tuple(tensor.shape), (start,) + (0,) * (tensor.dim() - 1),
                            tensor[start:stop].clone(), replica_id)

    whole = {name: FragmentSpec.whole(name, full[name].clone(), replica_id=rank)
             for name in ("emb", "step")}
    if rank == 0:
        return [block("weight", 0, 2), FragmentSpec.whole("odd", full["odd"].clone()),
                FragmentSpec.whole("big", full["big"].clone(), replica_id=1), block("weight", 2, 4), whole["emb"],
                whole["step"], block("uneven", 4, 4), FragmentSpec.whole("nothing", full["nothing"].clone())]
    return [whole["step"], block("weight", 4, 5), FragmentSpec.whole("big", full["big"].clone()), whole["emb"],
            block("uneven", 0, 4)]


def page_aligned_bytes(nbytes, shift=0):
    """A uint8 array in an anonymous mapping, starting ``shift`` bytes past a page boundary."""
    mapping = mmap.mmap(-1, -(-(nbytes + shift) // PAGE) * PAGE)
    return np.frombuffer(mapping, dtype=np.uint8)[shift:shift + nbytes]


def packed(rank, shift=0):
    fragments = rank_fragments(rank)
    index = plan_index(fragments)
    return index, pack_into(index, fragments, page_aligned_bytes(index.nbytes, shift))


def read_all(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def rank_index(directory, rank):
    return json.loads((Path(directory) / f"rank-{rank:05d}.json").read_text())


def without_file_size(index):
    """A rank index with its data files' sizes left out: the padded file is larger, all else is the same."""
    return {**index, "files": sorted(index["files"])}


@pytest.fixture
def record_writes(monkeypatch):
    """How each data file was written (DIRECT or BUFFERED), in order."""
    modes = []

    def recording(path, layout, payload):
        modes.append(write_safetensors(path, layout, payload))
        return modes[-1]

    monkeypatch.setattr(direct_write, "write_safetensors", recording)
    return modes


@pytest.fixture
def disk(tmp_path):
    """pytest's tmp_path, where the tests expect O_DIRECT to be taken: skipped where its filesystem refuses it."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as error:
        pytest.skip(f"{tmp_path} refuses O_DIRECT ({error})")
    (tmp_path / "probe").unlink()
    return tmp_path


@pytest.fixture
def shm_dir():
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir=SHM) as directory:
        yield Path(directory)


# ---------------------------------------------------------------------------------------------- round trip


def test_packed_rank_matches_write_fragments_and_loads_back(disk, record_writes):
    for rank in (0, 1):
        index, payload = packed(rank)
        write_packed(version_dir(disk / "direct", 3), rank, index.to_json(), payload)
        write_fragments(disk / "saved", rank, unpack(index, payload))
    assert record_writes == [DIRECT, DIRECT]
    assert packed(0)[0].nbytes % PAGE, "rank 0's payload should end mid-page (the buffered tail)"

    for rank in (0, 1):
        direct, saved = rank_index(version_dir(disk / "direct", 3), rank), rank_index(disk / "saved", rank)
        data_file = version_dir(disk / "direct", 3) / f"rank-{rank:05d}.safetensors"
        assert direct["files"] == {data_file.name: data_file.stat().st_size}
        assert without_file_size(direct) == without_file_size(saved)
        written, expected = read_all(data_file), read_all(disk / "saved" / data_file.name)
        assert {k for k in written if not k.startswith(PAD_PREFIX)} == set(expected)
        for key, tensor in expected.items():
            assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key

    commit_version(disk / "direct", 3, TrainerState(step=3), [0, 1])
    full = full_tensors()
    wanted = {name: SliceSpec(tuple(t.shape), (0,) * t.dim(), tuple(t.shape)) for name, t in full.items()}
    loaded = load_slices(version_dir(disk / "direct", 3), wanted)  # verifies every checksum on the way
    for name, tensor in full.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_data_section_starts_on_a_page_and_entries_tile_it(tmp_path):
    index, payload = packed(0)
    write_packed(tmp_path, 0, index, payload)
    raw = (tmp_path / "rank-00000.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert (8 + length) % PAGE == 0 and raw[8:8 + length].rstrip(b" ").endswith(b"}")
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values() if entry["data_offsets"][1] >
                   entry["data_offsets"][0])
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    written = [e for e in index.tensors if writes_block(e.replica_id, SliceSpec(e.global_shape, e.offsets, e.shape))]
    assert len(header) > len(written) and set(header) >= {e.key for e in written}
    assert len(raw) - 8 - length == index.nbytes - 2 * PAGE  # the 2 pages wholly inside replica 1's "big"


def test_a_keeper_arena_slot_is_written_with_o_direct(shm_dir, disk, record_writes):
    fragments = rank_fragments(0)
    index = plan_index(fragments)
    arena = Arena.create(str(shm_dir), ArenaLayout(2, index.nbytes, estimate_meta_capacity(index)), "test arena")
    try:
        assert write_snapshot(arena, 5, index, fragments)
        slot_index, payload = arena.read(arena.slots_in(HELD)[5])
        assert payload.ctypes.data % PAGE == 0
        write_packed(disk / "keeper", 0, slot_index, payload)
        del payload
    finally:
        arena.close()
    write_fragments(disk / "saved", 0, fragments)
    assert record_writes == [DIRECT]
    assert without_file_size(rank_index(disk / "keeper", 0)) == without_file_size(rank_index(disk / "saved", 0))


# ---------------------------------------------------------------------------------------------- the write paths


def written_layout(index):
    return plan_file([e for e in index.tensors if e.replica_id == 0 and e.nbytes], index.nbytes)


def refuse_o_direct(monkeypatch):
    """From now on opening with O_DIRECT fails with EINVAL, as on a filesystem without it (tmpfs before 6.6)."""
    real_open = os.open

    def open_without_o_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(direct_write.os, "open", open_without_o_direct)


def test_a_filesystem_refusing_o_direct_gets_the_same_bytes_buffered(disk, monkeypatch):
    monkeypatch.setattr(direct_write, "CHUNK_BYTES", PAGE)  # many write calls per extent
    index, payload = packed(0)
    layout = written_layout(index)
    assert write_safetensors(disk / "direct.safetensors", layout, payload) == DIRECT
    refuse_o_direct(monkeypatch)
    assert write_safetensors(disk / "refused.safetensors", layout, payload) == BUFFERED
    direct = (disk / "direct.safetensors").read_bytes()
    assert len(direct) == layout.nbytes and direct == (disk / "refused.safetensors").read_bytes()


def test_packed_rank_on_tmpfs_on_disk_and_without_o_direct_is_the_same_file(shm_dir, disk, monkeypatch,
                                                                           record_writes):
    index, payload = packed(1)
    write_packed(shm_dir, 1, index, payload)  # tmpfs takes O_DIRECT since Linux 6.6, refuses it before
    write_packed(disk / "direct", 1, index, payload)
    refuse_o_direct(monkeypatch)
    write_packed(disk / "refused", 1, index, payload)
    assert record_writes[0] in (DIRECT, BUFFERED) and record_writes[1:] == [DIRECT, BUFFERED]
    name = "rank-00001.safetensors"
    for other in (disk / "direct", disk / "refused"):
        assert (other / name).read_bytes() == (shm_dir / name).read_bytes()
        assert rank_index(other, 1) == rank_index(shm_dir, 1)
    assert read_all(shm_dir / name).keys() >= {f.key for f in rank_fragments(1) if f.replica_id == 0}


def test_payload_off_a_page_boundary_is_written_buffered(disk, record_writes):
    index, payload = packed(0, shift=64)
    assert payload.ctypes.data % PAGE == 64
    write_packed(disk / "shifted", 0, index, payload)
    aligned_index, aligned = packed(0)
    write_packed(disk / "aligned", 0, aligned_index, aligned)
    assert record_writes == [BUFFERED, DIRECT]
    name = "rank-00000.safetensors"
    assert (disk / "shifted" / name).read_bytes() == (disk / "aligned" / name).read_bytes()
    assert rank_index(disk / "shifted", 0) == rank_index(disk / "aligned", 0)


def test_o_direct_refused_mid_file_is_rewritten_buffered(disk, monkeypatch):
    index, payload = packed(1)
    layout = written_layout(index)
    real_pwrite, calls = os.pwrite, []

    def refuse_second_direct_write(fd, data, position):
        calls.append(position)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(direct_write.os, "pwrite", refuse_second_direct_write)
    assert write_safetensors(disk / "a.safetensors", layout, payload) == BUFFERED
    monkeypatch.undo()
    assert write_safetensors(disk / "b.safetensors", layout, payload) == DIRECT
    assert (disk / "a.safetensors").read_bytes() == (disk / "b.safetensors").read_bytes()
