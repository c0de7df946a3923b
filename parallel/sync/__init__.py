"""Synchronisation strategies across the replica (data-parallel) dimension, selected by ``sync.name``.

``STRATEGIES`` is the one list of them: the config's ``sync.*`` sections, the valid ``sync.name`` values and what
each composes with all come from it, so a new strategy is a module here plus its entry below (and a recipe).
``build_sync`` decides, from the layout, how a strategy meets the other dimensions: DDP or FSDP2 over dp x cp,
or a strategy across replicas after each replica's own gradient mean (cp) or FSDP2 shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from orchestrate.parallel.comm import CommCounter
from orchestrate.parallel.mesh import ParallelDims, replica_mesh, split_data_parallel
from orchestrate.parallel.sync.base import SyncStrategy
from orchestrate.parallel.sync.ddp import DDPSync
from orchestrate.parallel.sync.diloco import DiLoCoConfig, DiLoCoSync
from orchestrate.parallel.sync.fsdp import FSDPSync
from orchestrate.parallel.sync.noloco import NoLoCoConfig, NoLoCoSync
from orchestrate.parallel.sync.onebit_adam import OneBitAdamConfig, OneBitAdamSync
from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig, StreamingDiLoCoSync
from orchestrate.parallel.sync.within_replica import context_mean, sharded_replicas
from orchestrate.parallel.sync.zero_one_adam import ZeroOneAdamConfig, ZeroOneAdamSync


@dataclass(frozen=True)
class Strategy:
    build: Callable[..., SyncStrategy]  # (replica_group, counter, hyper-parameters or None) -> strategy
    hyper: Optional[type] = None  # its hyper-parameters: the config section sync.<name> (None: it has none)
    sharded_replicas: bool = False  # runs across replicas that FSDP2 shards (parallel.dp_shard)
    pipeline_with_tp: bool = False  # runs with parallel.pp and parallel.tp both > 1
    # (hyper-parameters, blocks of the model a rank holds) -> ValueError naming the hyper-parameter when the
    # strategy cannot run that way (None: any number of blocks will do)
    blocks_check: Optional[Callable[[Any, int], None]] = None

    def hyper_parameters(self, options: Optional[dict[str, Any]] = None) -> Any:
        return self.hyper(**(options or {})) if self.hyper is not None else None

    def check_blocks(self, options: Optional[dict[str, Any]], blocks: int) -> None:
        if self.blocks_check is not None:
            self.blocks_check(self.hyper_parameters(options), blocks)

    def __call__(self, replica_group, counter: Optional[CommCounter] = None,
                 options: Optional[dict[str, Any]] = None) -> SyncStrategy:
        return self.build(replica_group, counter or CommCounter(), self.hyper_parameters(options))


# 1-bit and 0/1 Adam replace the optimizer, which FSDP2 would shard: not over sharded replicas
STRATEGIES: dict[str, Strategy] = {
    "ddp": Strategy(lambda group, counter, _: DDPSync(group, counter), sharded_replicas=True, pipeline_with_tp=True),
    "diloco": Strategy(DiLoCoSync, DiLoCoConfig, sharded_replicas=True),
    "streaming_diloco": Strategy(StreamingDiLoCoSync, StreamingDiLoCoConfig, sharded_replicas=True,
                                 blocks_check=StreamingDiLoCoConfig.check_blocks),
    "noloco": Strategy(NoLoCoSync, NoLoCoConfig, sharded_replicas=True),
    "onebit_adam": Strategy(OneBitAdamSync, OneBitAdamConfig),
    "zero_one_adam": Strategy(ZeroOneAdamSync, ZeroOneAdamConfig),
}


def strategy_named(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"sync.name={name}: unknown strategy; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def build_strategy(name: str, replica_group, counter: Optional[CommCounter] = None,
                   options: Optional[dict[str, Any]] = None) -> SyncStrategy:
    """The strategy alone, across ``replica_group`` (one rank per replica, or every data-parallel rank for DDP)."""
    return strategy_named(name)(replica_group, counter, options)


def build_sync(name: str, mesh, dims: ParallelDims, options: Optional[dict[str, Any]] = None,
               stages_driven_by_schedule: bool = False) -> SyncStrategy:
    """This rank's sync for the layout. DDP and FSDP2 average gradients over dp x cp (HSDP when replicas are
    sharded over fewer ranks than dp); the other strategies act across replicas, after what a replica's ranks do
    together every step (a cp gradient mean, or FSDP2 over a sharded replica). ``stages_driven_by_schedule``:
    pipeline stages, which torch's DDP wrapper cannot drive (gradients are averaged by hand instead)."""
    strategy_named(name)
    if name == "ddp":
        if dims.dp_shard == 1:
            return DDPSync(replica_mesh(mesh).get_group(), CommCounter(), use_torch_ddp=not stages_driven_by_schedule)
        return FSDPSync(replica_mesh(mesh) if dims.replicas == 1 else split_data_parallel(mesh, dims), CommCounter())
    if dims.dp_shard > 1:
        split = split_data_parallel(mesh, dims)
        return sharded_replicas(build_strategy(name, split["dp_replicate"].get_group(), options=options),
                                split["dp_shard"])
    strategy = build_strategy(name, mesh["dp"].get_group(), options=options)
    return strategy if dims.cp == 1 else context_mean(strategy, mesh["cp"].get_group())


__all__ = ["SyncStrategy", "DDPSync", "STRATEGIES", "Strategy", "build_strategy", "build_sync", "strategy_named"]
