"""Reshard on load: which parts of which saved fragments fill the blocks a new layout asks for, and reading them.

Any rectangular layout loads any other: each requested block is filled from the fragments that overlap it, each
overlapping fragment is read once and its checksum verified, and fragments that do not overlap are not read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

from orchestrate.checkpoint.universal import (CheckpointError, FragmentRecord, FragmentSpec, Manifest, SliceSpec,
                                              block_overlap, read_manifest)
from orchestrate.checkpoint.universal_tensors import checksum, dtype_from_name


@dataclass(frozen=True)
class ReadItem:
    """Copy ``fragment[source]`` into ``output[target]`` of logical tensor ``name``."""

    name: str
    fragment: FragmentRecord
    source: tuple[slice, ...]
    target: tuple[slice, ...]


def plan_load(manifest: Manifest, wanted: Mapping[str, SliceSpec]) -> list[ReadItem]:
    """For each wanted block, the parts of the overlapping fragments that fill it. Checks full coverage."""
    items = []
    for name, block in wanted.items():
        record = manifest.tensors.get(name)
        if record is None:
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} is not in the checkpoint")
        if record.global_shape != block.global_shape:
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} has global shape "
                                  f"{list(record.global_shape)} in the checkpoint but {list(block.global_shape)} "
                                  f"in the model")
        covered = 0
        for fragment in record.fragments:
            overlap = block_overlap(fragment.offsets, fragment.shape, block.offsets, block.shape)
            if overlap is None:
                continue
            starts, shape = overlap
            source = tuple(slice(s - o, s - o + n) for s, o, n in zip(starts, fragment.offsets, shape))
            target = tuple(slice(s - o, s - o + n) for s, o, n in zip(starts, block.offsets, shape))
            items.append(ReadItem(name, fragment, source, target))
            covered += prod(shape)
        if covered != block.numel:
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} block offsets={list(block.offsets)} "
                                  f"shape={list(block.shape)}: fragments cover {covered} of {block.numel} "
                                  f"elements (missing fragment)")
    return items


def _read_verified(path: Path, handle, fragment: FragmentRecord, name: str) -> torch.Tensor:
    try:
        tensor = handle.get_tensor(fragment.key)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: cannot read fragment {fragment.key!r} of tensor {name!r} "
                              f"({error})") from None
    if tuple(tensor.shape) != fragment.shape:
        raise CheckpointError(f"{path}: fragment {fragment.key!r} of tensor {name!r} has shape "
                              f"{list(tensor.shape)}, manifest says {list(fragment.shape)}")
    if checksum(tensor) != fragment.checksum:
        raise CheckpointError(f"{path}: checksum mismatch in fragment {fragment.key!r} of tensor {name!r}")
    return tensor


def _open_checked(manifest: Manifest, file: str):
    path = manifest.directory / file
    expected = manifest.file_bytes.get(file)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: fragment file is missing") from None
    if expected is not None and size != expected:
        raise CheckpointError(f"{path}: truncated or altered, {size} bytes on disk, manifest says {expected}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def load_slices(directory: str | os.PathLike, wanted: Mapping[str, SliceSpec],
                manifest: Optional[Manifest] = None) -> dict[str, torch.Tensor]:
    """Read the wanted blocks (in the dtype they were saved in). Each overlapping fragment is read once."""
    manifest = manifest or read_manifest(directory)
    plan = plan_load(manifest, wanted)
    outputs = {name: torch.empty(block.shape, dtype=dtype_from_name(manifest.tensors[name].dtype))
               for name, block in wanted.items()}
    by_file: dict[str, dict[str, list[ReadItem]]] = {}
    for item in plan:
        by_file.setdefault(item.fragment.file, {}).setdefault(item.fragment.key, []).append(item)
    for file, by_key in by_file.items():
        with _open_checked(manifest, file) as handle:
            for items in by_key.values():  # one fragment in memory at a time
                fragment = _read_verified(manifest.directory / file, handle, items[0].fragment, items[0].name)
                for item in items:
                    outputs[item.name][item.target] = fragment[item.source]
    return outputs


def load_into(directory: str | os.PathLike, targets: Iterable[FragmentSpec],
              manifest: Optional[Manifest] = None) -> Manifest:
    """Fill each target's tensor in place (casting dtype if needed) with its block of the saved tensor.

    Every replica loads; replica_id only matters when writing."""
    manifest = manifest or read_manifest(directory)
    by_name = {}
    for target in targets:
        if target.name in by_name:
            raise CheckpointError(f"load_into: tensor {target.name!r} requested twice")
        by_name[target.name] = target
    loaded = load_slices(directory, {name: target.slice for name, target in by_name.items()}, manifest)
    with torch.no_grad():
        for name, target in by_name.items():
            target.tensor.copy_(loaded[name])
    return manifest
