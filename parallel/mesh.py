"""ParallelDims: the degrees of each kind of parallelism, their validation, and the named DeviceMesh.

Mesh dimensions are always ("pp", "dp", "cp", "tp"), outermost to innermost, including degrees of 1, so code can
slice ``mesh["dp"]`` without asking whether data parallelism is on. tp is innermost because it communicates most.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "cp", "tp")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the config key and the valid choices."""


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def validate(self, world_size: int | None = None) -> None:
        for name in MESH_DIMS:
            degree = getattr(self, name)
            if degree < 1:
                raise ParallelConfigError(f"parallel.{name}={degree}: must be a positive integer")
        if world_size is not None and world_size != self.world_size:
            raise ParallelConfigError(
                f"cluster.num_workers={world_size}: must equal parallel.dp*tp*pp*cp = "
                f"{self.dp}*{self.tp}*{self.pp}*{self.cp} = {self.world_size}"
            )

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension (row-major over MESH_DIMS, as DeviceMesh lays it out)."""
        coords = {}
        for name in reversed(MESH_DIMS):
            degree = getattr(self, name)
            coords[name] = rank % degree
            rank //= degree
        return {name: coords[name] for name in MESH_DIMS}


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """Needs an initialised default process group of dims.world_size ranks."""
    if torch.distributed.get_world_size() != dims.world_size:
        raise ParallelConfigError(
            f"world size {torch.distributed.get_world_size()} != parallel.dp*tp*pp*cp = {dims.world_size}"
        )
    return init_device_mesh(device_type, dims.shape, mesh_dim_names=MESH_DIMS)


def replica_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks that hold the same parameters: dp flattened with cp (cp ranks see other tokens of a sample)."""
    return mesh["dp", "cp"]._flatten("dp_cp")


def replica_group(mesh: DeviceMesh):
    return replica_mesh(mesh).get_group()
