import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrate.checkpoint.fragments import load_model, load_optimizer, model_fragments, optimizer_fragments
from orchestrate.checkpoint.reshard import load_slices, plan_load
from orchestrate.checkpoint.universal import (FORMAT_VERSION, MANIFEST_FILE, CheckpointError, FragmentSpec, SliceSpec,
                                  TrainerState, commit_version, committed_versions, discard_uncommitted,
                                  latest_version_dir, read_manifest, version_dir)
from orchestrate.checkpoint.universal_tensors import write_fragments
from orchestrate.parallel.local_ranks import run_ranks

REPO = Path(__file__).resolve().parent.parent


def _row_shards(name, full, parts):
    """``full`` split along dim 0 into ``parts`` blocks (torch.chunk sizes), one per rank."""
    fragments, start = [], 0
    for block in torch.chunk(full, parts, dim=0):
        offsets = (start,) + (0,) * (full.dim() - 1)
        fragments.append(FragmentSpec(name, tuple(full.shape), offsets, block.clone()))
        start += block.shape[0]
    return fragments


def _save(root, version, per_rank, trainer_state=None, keep=2):
    for rank, fragments in enumerate(per_rank):
        write_fragments(version_dir(root, version), rank, fragments)
    state = trainer_state or TrainerState(step=version)
    return commit_version(root, version, state, list(range(len(per_rank))), keep)


@pytest.fixture
def saved(tmp_path):
    """Version 7 of a 2-rank layout: a row-sharded matrix, a bf16 vector and a replicated step scalar."""
    weight = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    bias = torch.arange(6, dtype=torch.bfloat16)
    step = torch.tensor(7.0)
    per_rank = [[row, FragmentSpec.whole("bias", bias, replica_id=rank), FragmentSpec.whole("step", step, rank)]
                for rank, row in enumerate(_row_shards("weight", weight, 2))]
    state = TrainerState(step=7, samples_consumed=56, seed=3, scheduler={"last_epoch": 7},
                         config={"model": {"dim": 6}}, extra={"note": "hi"})
    directory = _save(tmp_path, 7, per_rank, state)
    return directory, {"weight": weight, "bias": bias, "step": step}, state


def _full(tensor):
    return SliceSpec(tuple(tensor.shape), (0,) * tensor.dim(), tuple(tensor.shape))


def test_round_trip_restores_tensors_dtypes_and_trainer_state(saved):
    directory, tensors, state = saved
    assert latest_version_dir(directory.parent) == directory
    manifest = read_manifest(directory)
    assert manifest.version == 7 and manifest.trainer_state == state
    loaded = load_slices(directory, {name: _full(t) for name, t in tensors.items()})
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_dtype_names_and_sizes_match_torch():
    from orchestrate.checkpoint.universal import DTYPES, dtype_name
    from orchestrate.checkpoint.universal_tensors import dtype_from_name

    for name, (nbytes, _) in DTYPES.items():
        assert dtype_name(dtype_from_name(name)) == name and dtype_from_name(name).itemsize == nbytes, name


def test_only_replica_zero_is_written(saved):
    directory, _, _ = saved
    manifest = read_manifest(directory)
    assert [f.file for f in manifest.tensors["bias"].fragments] == ["rank-00000.safetensors"]
    rank1 = json.loads((directory / "rank-00001.json").read_text())
    assert set(rank1["tensors"]) == {"weight"}


def test_reshard_two_row_shards_into_full_and_into_four_column_shards(saved):
    directory, tensors, _ = saved
    weight = tensors["weight"]
    full = load_slices(directory, {"weight": _full(weight)})["weight"]
    assert torch.equal(full, weight)
    start = 0
    for width in (2, 2, 1, 1):  # uneven column blocks
        block = SliceSpec((10, 6), (0, start), (10, width))
        assert torch.equal(load_slices(directory, {"weight": block})["weight"], weight[:, start:start + width])
        start += width


def test_plan_reads_only_overlapping_fragments(saved):
    directory, _, _ = saved
    manifest = read_manifest(directory)
    inside_rank1 = SliceSpec((10, 6), (6, 1), (3, 4))
    plan = plan_load(manifest, {"weight": inside_rank1})
    assert [item.fragment.file for item in plan] == ["rank-00001.safetensors"]
    straddling = SliceSpec((10, 6), (4, 0), (2, 6))
    assert len(plan_load(manifest, {"weight": straddling})) == 2


def _truncate(directory):
    path = directory / "rank-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-9])


def _flip_last_byte(directory):
    path = directory / "rank-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_fragment(directory):
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["tensors"]["weight"]["fragments"].pop()
    path.write_text(json.dumps(manifest))


def _delete_file(directory):
    (directory / "rank-00001.safetensors").unlink()


def _newer_format(directory):
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"rank-00001\.safetensors: truncated"),
    (_flip_last_byte, r"rank-00001\.safetensors: checksum mismatch in fragment 'weight@5,0' of tensor 'weight'"),
    (_drop_fragment, r"tensor 'weight' .*cover 30 of 60 elements \(missing fragment\)"),
    (_delete_file, r"rank-00001\.safetensors: fragment file is missing"),
    (_newer_format, r"manifest\.json: format_version 2 is newer than the supported version 1"),
])
def test_damaged_checkpoint_names_the_file_or_tensor(saved, damage, message):
    directory, tensors, _ = saved
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        load_slices(directory, {"weight": _full(tensors["weight"])})


def test_model_with_a_different_shape_is_rejected(saved):
    directory, _, _ = saved
    with pytest.raises(CheckpointError, match=r"tensor 'weight' has global shape \[10, 6\] in the checkpoint "
                                              r"but \[12, 6\] in the model"):
        load_slices(directory, {"weight": SliceSpec((12, 6), (0, 0), (12, 6))})
    with pytest.raises(CheckpointError, match="tensor 'missing' is not in the checkpoint"):
        load_slices(directory, {"missing": SliceSpec((1,), (0,), (1,))})


def test_commit_refuses_an_incomplete_version(tmp_path):
    weight = torch.ones(4, 2)
    rows = _row_shards("weight", weight, 2)
    write_fragments(version_dir(tmp_path, 1), 0, [rows[0]])
    with pytest.raises(CheckpointError, match=r"ranks \[1\] have not written their part"):
        commit_version(tmp_path, 1, TrainerState(step=1), [0, 1])
    write_fragments(version_dir(tmp_path, 1), 1, [])  # rank 1 forgot its block
    with pytest.raises(CheckpointError, match=r"tensor 'weight' fragments cover 4 of 8 elements"):
        commit_version(tmp_path, 1, TrainerState(step=1), [0, 1])
    write_fragments(version_dir(tmp_path, 1), 1, [FragmentSpec("weight", (4, 2), (1, 0), torch.ones(3, 2))])
    with pytest.raises(CheckpointError, match=r"tensor 'weight' has overlapping fragments 'weight@0,0' "
                                              r"\(rank-00000.safetensors\) and 'weight@1,0'"):
        commit_version(tmp_path, 1, TrainerState(step=1), [0, 1])
    assert latest_version_dir(tmp_path) is None


def test_keep_prunes_old_versions_and_discard_removes_uncommitted(tmp_path):
    for version in range(1, 6):
        _save(tmp_path, version, [[FragmentSpec.whole("x", torch.full((3,), float(version)))]], keep=2)
    assert committed_versions(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [version_dir(tmp_path, v).name for v in (4, 5)]
    write_fragments(version_dir(tmp_path, 6), 0, [FragmentSpec.whole("x", torch.zeros(3))])
    assert discard_uncommitted(tmp_path) == [6]
    assert latest_version_dir(tmp_path) == version_dir(tmp_path, 5)


CRASHING_WRITER = """
import sys, torch
from orchestrate.checkpoint.universal import FragmentSpec, TrainerState, commit_version, version_dir
from orchestrate.checkpoint.universal_tensors import write_fragments
root, n = sys.argv[1], 4 * 1024 * 1024

def fragments(version, rank):
    return [FragmentSpec(f"w{i}", (2 * n,), (rank * n,), torch.full((n,), float(version))) for i in range(8)]

for rank in (0, 1):
    write_fragments(version_dir(root, 1), rank, fragments(1, rank)[:1])
commit_version(root, 1, TrainerState(step=1), [0, 1])
print("committed 1", flush=True)
write_fragments(version_dir(root, 2), 0, fragments(2, 0))
print("rank 0 of version 2 written", flush=True)
sys.stdin.readline()  # the test kills this process by here at the latest
write_fragments(version_dir(root, 2), 1, fragments(2, 1))
commit_version(root, 2, TrainerState(step=2), [0, 1])
print("committed 2", flush=True)
"""


def test_writer_killed_while_persisting_leaves_previous_version_loadable(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "committed 1"
        partial = version_dir(tmp_path, 2) / "rank-00000.safetensors.tmp"
        # kill mid-file if we catch it; otherwise the writer is parked before rank 1's part of version 2
        while writer.poll() is None and not (partial.exists() and partial.stat().st_size > 0):
            if (version_dir(tmp_path, 2) / "rank-00000.json").exists():
                break
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == -signal.SIGKILL
    latest = latest_version_dir(tmp_path)
    assert latest == version_dir(tmp_path, 1) and committed_versions(tmp_path) == [1]
    loaded = load_slices(latest, {"w0": SliceSpec((2 * 4 * 1024 * 1024,), (0,), (2 * 4 * 1024 * 1024,))})
    assert torch.all(loaded["w0"] == 1.0)
    with pytest.raises(CheckpointError, match="no manifest, the version is incomplete"):
        read_manifest(version_dir(tmp_path, 2))
    assert discard_uncommitted(tmp_path) == [2]
    _save(tmp_path, 2, [[FragmentSpec.whole("w0", torch.full((4,), 2.0))]])
    assert latest_version_dir(tmp_path) == version_dir(tmp_path, 2)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))


def _train_step(model, optimizer, seed):
    inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    model(inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_model_and_adamw_state_resume_to_identical_training(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for seed in range(3):
        _train_step(model, optimizer, seed)
    _save(tmp_path, 3, [model_fragments(model) + optimizer_fragments(model, optimizer)])

    resumed = _mlp()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    latest = latest_version_dir(tmp_path)
    load_model(latest, resumed)
    load_optimizer(latest, resumed, resumed_optimizer)
    _train_step(model, optimizer, 3)
    _train_step(resumed, resumed_optimizer, 3)
    for (name, expected), actual in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(expected, actual), name


def _save_tp_sharded(rank, world, root):
    """A 2-rank tensor-parallel MLP after one AdamW step, saved by both ranks; rank 0 commits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from orchestrate.checkpoint.fragments import _shard_block, tensor_fragment
    from orchestrate.checkpoint.universal import wait_for_ranks

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = _mlp()
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train_step(model, optimizer, 0)
    for _, param in model.named_parameters():  # the fallback matches torch's own computation
        assert _shard_block(param) == _local_and_offsets(param)
    with pytest.raises(CheckpointError, match="tensor 'pending': placement P.* is not a rectangular block"):
        tensor_fragment("pending", DTensor.from_local(torch.ones(2), mesh, [Partial()]))
    odd = distribute_tensor(torch.arange(15.0).reshape(5, 3), mesh, [Shard(0)])  # uneven: 3 + 2 rows
    shared = distribute_tensor(torch.arange(4.0), mesh, [Replicate()])
    fragments = (model_fragments(model) + optimizer_fragments(model, optimizer)
                 + [tensor_fragment("odd", odd), tensor_fragment("shared", shared)])
    directory = version_dir(root, 1)
    write_fragments(directory, rank, fragments)
    if rank == 0:
        wait_for_ranks(directory, range(world), timeout_s=60)
        commit_version(root, 1, TrainerState(step=1), list(range(world)))
    full = {name: param.detach().full_tensor() for name, param in model.named_parameters()}
    full.update({f"optim.exp_avg.{name}": optimizer.state[param]["exp_avg"].full_tensor()
                 for name, param in model.named_parameters()})
    return full


def _local_and_offsets(param):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


def test_tensor_parallel_dtensor_checkpoint_loads_into_one_process(tmp_path):
    expected = run_ranks(2, _save_tp_sharded, str(tmp_path))[0]
    latest = latest_version_dir(tmp_path)
    manifest = read_manifest(latest)
    assert len(manifest.tensors["shared"].fragments) == 1  # replicated: rank 0 only
    assert [f.shape for f in manifest.tensors["odd"].fragments] == [(3, 3), (2, 3)]
    assert [f.shape for f in manifest.tensors["0.weight"].fragments] == [(3, 8), (3, 8)]  # colwise
    assert [f.shape for f in manifest.tensors["2.weight"].fragments] == [(4, 3), (4, 3)]  # rowwise
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    load_model(latest, model, manifest)
    load_optimizer(latest, model, optimizer, manifest)
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name
        assert torch.equal(optimizer.state[param]["exp_avg"], expected[f"optim.exp_avg.{name}"]), name
        assert optimizer.state[param]["step"].item() == 1.0
    assert torch.equal(load_slices(latest, {"odd": SliceSpec((5, 3), (0, 0), (5, 3))})["odd"],
                       torch.arange(15.0).reshape(5, 3))
