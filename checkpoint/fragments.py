"""Fragments (universal-format blocks) of a model's parameters and its optimizer state, DTensor-aware.

Logical names: a parameter keeps its ``named_parameters`` name (the model must name layers by global index, as
orchestrator/models does); optimizer state is ``optim.<state key>.<parameter name>``, e.g.
``optim.exp_avg.layers.0.attention.wq.weight`` or ``optim.step.norm.weight``.

Replicas: exactly one holder of each block must get replica_id 0, because only replica 0 is written.
- DTensor: the holders of one block differ only along the mesh dims with a ``Replicate`` placement, and across
  whatever replica group lies outside the DTensor's mesh (DDP/DiLoCo replicas): pass this rank's index in that
  group as ``replica_index``.
- Plain tensors carry no layout, so the caller says who writes them: ``plain_replica_id`` (default
  ``replica_index``) must be 0 on exactly one holder, e.g. the linear index of (dp, cp, tp) inside a pp stage.
- A plain optimizer scalar (AdamW ``step``) of a DTensor parameter is replicated over the parameter's whole mesh.

Loading works for any layout: the same functions describe the blocks the new layout holds, and
``reshard.load_into`` fills them from whichever fragments overlap.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from orchestrate.checkpoint.reshard import load_into
from orchestrate.checkpoint.universal import CheckpointError, FragmentSpec, Manifest, read_manifest
from orchestrate.checkpoint.universal_tensors import dtype_from_name

try:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # older torch: only Shard/Replicate are supported anyway
    compute_local_shape_and_global_offset = None

OPTIM_PREFIX = "optim."


def _linear_index(mesh, dims: Iterable[int]) -> int:
    """This rank's position among the ranks that differ only along ``dims`` of ``mesh``."""
    coordinate = mesh.get_coordinate()
    index = 0
    for dim in dims:
        index = index * mesh.size(dim) + coordinate[dim]
    return index


def _local_block(name: str, tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offsets) of this rank's block; only rectangular layouts are supported."""
    for placement in tensor.placements:
        if not (isinstance(placement, Shard) or placement.is_replicate()):
            raise CheckpointError(f"tensor {name!r}: placement {placement} is not a rectangular block "
                                  f"(Partial must be reduced, _StridedShard redistributed) before checkpointing")
    if compute_local_shape_and_global_offset is not None:
        return compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return _shard_block(tensor)


def _shard_block(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """torch.chunk semantics, as DTensor uses for Shard: ceil-sized chunks, the last ones short or empty."""
    shape, offsets = list(tensor.shape), [0] * tensor.dim()
    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            dim, parts = placement.dim, tensor.device_mesh.size(mesh_dim)
            chunk = -(-shape[dim] // parts)
            start = min(chunk * coordinate[mesh_dim], shape[dim])
            offsets[dim] += start
            shape[dim] = min(chunk, shape[dim] - start)
    return tuple(shape), tuple(offsets)


def tensor_fragment(name: str, tensor: torch.Tensor, replica_index: int = 0,
                    plain_replica_id: Optional[int] = None) -> FragmentSpec:
    """The block of logical tensor ``name`` this rank holds; its ``tensor`` is the live local storage."""
    if not isinstance(tensor, DTensor):
        replica = replica_index if plain_replica_id is None else plain_replica_id
        return FragmentSpec.whole(name, tensor.detach(), replica)
    local_shape, offsets = _local_block(name, tensor)
    with torch.no_grad():
        local = tensor.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise CheckpointError(f"tensor {name!r}: local shape {list(local.shape)} != {list(local_shape)} "
                              f"computed from placements {tensor.placements}")
    mesh = tensor.device_mesh
    replicated = [dim for dim, placement in enumerate(tensor.placements) if placement.is_replicate()]
    copies = 1
    for dim in replicated:
        copies *= mesh.size(dim)
    replica = replica_index * copies + _linear_index(mesh, replicated)
    return FragmentSpec(name, tuple(tensor.shape), tuple(offsets), local, replica)


def _scalar_replica(param: torch.Tensor, replica_index: int, plain_replica_id: Optional[int]) -> int:
    """Replica id of plain optimizer state that every holder of ``param`` keeps a full copy of."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        return replica_index * mesh.size() + _linear_index(mesh, range(mesh.ndim))
    return replica_index if plain_replica_id is None else plain_replica_id


def model_fragments(model: nn.Module, replica_index: int = 0,
                    plain_replica_id: Optional[int] = None) -> list[FragmentSpec]:
    return [tensor_fragment(name, param, replica_index, plain_replica_id)
            for name, param in model.named_parameters()]


def _named_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    names = {param: name for name, param in model.named_parameters()}
    named = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param not in names:
                raise CheckpointError("optimizer holds a parameter that is not in the model")
            named.append((names[param], param))
    return named


def optimizer_fragments(model: nn.Module, optimizer: torch.optim.Optimizer, replica_index: int = 0,
                        plain_replica_id: Optional[int] = None) -> list[FragmentSpec]:
    fragments = []
    for param_name, param in _named_params(model, optimizer):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            name = f"{OPTIM_PREFIX}{key}.{param_name}"
            if not torch.is_tensor(value):
                raise CheckpointError(f"optimizer state {name!r} is a {type(value).__name__}, not a tensor; "
                                      f"keep non-tensor state in TrainerState.extra")
            if isinstance(value, DTensor):
                fragments.append(tensor_fragment(name, value, replica_index))
            else:
                replica = _scalar_replica(param, replica_index, plain_replica_id)
                fragments.append(FragmentSpec.whole(name, value.detach(), replica))
    return fragments


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, manifest: Manifest) -> None:
    """Allocate the optimizer state the checkpoint holds for this rank's parameters, in this rank's layout, so it
    can be loaded into.

    State shaped like its parameter follows the parameter's layout (DTensor stays DTensor); anything else
    (AdamW's step) is a full plain tensor."""
    by_param = dict(_named_params(model, optimizer))
    for name, record in manifest.tensors.items():
        if not name.startswith(OPTIM_PREFIX):
            continue
        key, _, param_name = name[len(OPTIM_PREFIX):].partition(".")
        param = by_param.get(param_name)
        if param is None:  # another pipeline stage's parameter; the caller checks the model against the checkpoint
            continue
        dtype = dtype_from_name(record.dtype)
        if record.global_shape == tuple(param.shape):
            value = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        else:
            value = torch.zeros(record.global_shape, dtype=dtype)
        optimizer.state[param][key] = value


def load_model(directory: str | os.PathLike, model: nn.Module, manifest: Optional[Manifest] = None) -> Manifest:
    """Fill the model's parameters (any layout) from a committed version directory."""
    return load_into(directory, model_fragments(model), manifest)


def load_optimizer(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                   manifest: Optional[Manifest] = None) -> Manifest:
    """Rebuild the optimizer state (any layout) from a committed version directory."""
    manifest = manifest or read_manifest(directory)
    init_optimizer_state(model, optimizer, manifest)
    return load_into(directory, optimizer_fragments(model, optimizer), manifest)
