"""Torch tensors in the universal format (checkpoint/universal.py): dtype names back to torch dtypes, a tensor's
checksum, and a rank writing its fragments. Apart from universal.py so that the processes that only move bytes
(the SnapshotKeeper actors) never import torch, which costs each of them ~180 MiB and seconds of start-up."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from orchestrate.checkpoint.universal import (CheckpointError, FragmentSpec, RankIndex, checksum_bytes, dtype_name,
                                              writes_block)


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}")
    return dtype


def checksum(tensor: torch.Tensor) -> str:
    return checksum_bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_fragments(directory: str | os.PathLike, rank: int, fragments: Iterable[FragmentSpec]) -> Path:
    """Write this rank's replica-0 fragments and then its index, both durable. Returns the index path."""
    index = RankIndex(directory, rank)
    tensors: dict[str, torch.Tensor] = {}
    for fragment in fragments:
        if not writes_block(fragment.replica_id, fragment.slice):
            continue
        local = fragment.tensor.detach().contiguous()
        index.add(fragment.name, fragment.key, fragment.slice, dtype_name(local.dtype), checksum(local))
        tensors[fragment.key] = local
    return index.commit(lambda tmp: save_file(tensors, str(tmp)))
