"""ParallelDims: the degrees of each kind of parallelism, their validation, and the named DeviceMesh.

Mesh dimensions are always ("pp", "dp", "cp", "tp"), outermost to innermost, including degrees of 1, so code can
slice ``mesh["dp"]`` without asking whether data parallelism is on. tp is innermost because it communicates most.

Sharded replicas (``dp_shard`` S > 1): the dp ranks form dp/S replicas of S consecutive ranks each; a replica's
parameters, gradients and optimizer state are sharded over its S ranks (FSDP2), and each shard has a counterpart
in every other replica. ``split_data_parallel`` unflattens dp into ("dp_replicate", "dp_shard") for that.
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
    dp_shard: int = 1  # ranks each replica's state is sharded over (FSDP2); 1: replicas are not sharded

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: groups of ranks that each hold a whole copy of the model's state."""
        return self.dp // self.dp_shard

    def replica_of(self, coords: dict[str, int]) -> int:
        """The replica a rank belongs to, counting context-parallel ranks as replicas of their own (they hold the
        same parameters and see other tokens)."""
        return (coords["dp"] // self.dp_shard) * self.cp + coords["cp"]

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
        if self.dp_shard < 1 or self.dp % self.dp_shard:
            valid = ", ".join(map(str, divisors(self.dp)))
            raise ParallelConfigError(f"parallel.dp_shard={self.dp_shard}: must divide parallel.dp={self.dp} "
                                      f"(valid: true, false, or a divisor of {self.dp}: {valid})")
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


def split_data_parallel(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The dp ranks as a 2-D mesh ("dp_replicate", "dp_shard"): ``["dp_shard"]`` is the ranks of this rank's
    replica (FSDP2 shards over them), ``["dp_replicate"]`` this shard's counterparts in the other replicas."""
    return mesh["dp"]._unflatten(0, (dims.replicas, dims.dp_shard), ("dp_replicate", "dp_shard"))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
