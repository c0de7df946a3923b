"""Synchronisation strategies across the replica (data-parallel) dimension, selected by ``sync.name``."""
from __future__ import annotations

from typing import Any, Callable, Optional

from parallel.comm import CommCounter
from parallel.sync.base import SyncStrategy
from parallel.sync.ddp import DDPSync
from parallel.sync.diloco import DiLoCoConfig, DiLoCoSync
from parallel.sync.noloco import NoLoCoConfig, NoLoCoSync
from parallel.sync.onebit_adam import OneBitAdamConfig, OneBitAdamSync
from parallel.sync.streaming_diloco import StreamingDiLoCoConfig, StreamingDiLoCoSync
from parallel.sync.zero_one_adam import ZeroOneAdamConfig, ZeroOneAdamSync

# name -> factory(replica_group, counter, options) ; strategies register here as they land.
STRATEGIES: dict[str, Callable[..., SyncStrategy]] = {
    "ddp": lambda group, counter, options: DDPSync(group, counter),
    "diloco": lambda group, counter, options: DiLoCoSync(group, counter, DiLoCoConfig(**options)),
    "streaming_diloco": lambda group, counter, options: StreamingDiLoCoSync(
        group, counter, StreamingDiLoCoConfig(**options)),
    "noloco": lambda group, counter, options: NoLoCoSync(group, counter, NoLoCoConfig(**options)),
    "onebit_adam": lambda group, counter, options: OneBitAdamSync(group, counter, OneBitAdamConfig(**options)),
    "zero_one_adam": lambda group, counter, options: ZeroOneAdamSync(group, counter, ZeroOneAdamConfig(**options)),
}


def build_sync(name: str, replica_group, counter: Optional[CommCounter] = None,
               options: Optional[dict[str, Any]] = None) -> SyncStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"sync.name={name}: unknown strategy; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](replica_group, counter or CommCounter(), options or {})


__all__ = ["SyncStrategy", "DDPSync", "build_sync", "STRATEGIES"]
