"""Tensor helpers the synchronisation strategies share: a parameter's local shard, the trainable parameters, FSDP2
units back to their shards, the dtype outer updates run in, named shards seen as one flat vector, and copying named state in."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter; in-place writes reach the parameter."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def parameters_holding(named: Iterable[tuple[str, nn.Parameter]], values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block each named parameter's local shard holds ``values[name]`` (those not named, or named with
    the parameter itself, keep theirs); the live values are put back, bit for bit, on the way out. ValueError,
    before anything changes, when a name in ``values`` is no parameter's: its parameter would keep its live value
    unnoticed."""
    named = list(named)
    unmatched = sorted(set(values) - {name for name, _ in named})
    if unmatched:
        raise ValueError(f"{len(unmatched)} values name no parameter, e.g. {unmatched[:3]}")
    saved = []
    with torch.no_grad():
        for name, param in named:
            value, local = values.get(name), local_tensor(param)
            if value is None or value is param or value is local:
                continue
            saved.append((local, local.clone()))
            local.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for local, live in saved:
                local.copy_(live)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (its parameters are the shards again)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def outer_dtype(params: list[nn.Parameter]) -> torch.dtype:
    """fp32 for low-precision params (Delta must be computed in fp32), float64 stays float64."""
    dtype = torch.float32
    for param in params:
        dtype = torch.promote_types(dtype, param.dtype)
    return dtype


class FlatParams:
    """Named parameters' local shards seen as one flat vector, in a fixed order."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.dtype = outer_dtype(self.params)
        shapes = [local_tensor(p).shape for p in self.params]
        self.numels = [shape.numel() for shape in shapes]
        self.shapes = shapes
        self.numel = sum(self.numels)

    @torch.no_grad()
    def flatten(self) -> torch.Tensor:
        """A fresh contiguous copy of the live values in ``self.dtype``."""
        if not self.params:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat([local_tensor(p).detach().reshape(-1).to(self.dtype) for p in self.params])

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the live parameters (cast to their dtype)."""
        for param, view in zip(self.params, self._split(flat)):
            local_tensor(param).copy_(view)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of ``flat`` shaped like that parameter's local shard."""
        return dict(zip(self.names, self._split(flat)))

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.numels), self.shapes)]


@torch.no_grad()
def copy_named_state(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """Copy ``state[key]`` into every target. False, copying nothing, when no key is present (a state written by
    another strategy); KeyError when only some are."""
    present = [key for key in targets if key in state]
    if not present:
        return False
    missing = sorted(set(targets) - set(present))
    if missing:
        raise KeyError(f"sync state is missing {len(missing)} entries, e.g. {missing[:3]}")
    for key, target in targets.items():
        target.copy_(state[key])
    return True
