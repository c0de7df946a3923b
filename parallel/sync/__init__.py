"""Synchronisation strategies across the replica (data-parallel) dimension, selected by ``sync.name``."""
from __future__ import annotations

from typing import Any, Callable, Optional

from parallel.comm import CommCounter
from parallel.sync.base import SyncStrategy
from parallel.sync.ddp import DDPSync

# name -> factory(replica_group, counter, options) ; strategies register here as they land.
STRATEGIES: dict[str, Callable[..., SyncStrategy]] = {
    "ddp": lambda group, counter, options: DDPSync(group, counter),
}


def build_sync(name: str, replica_group, counter: Optional[CommCounter] = None,
               options: Optional[dict[str, Any]] = None) -> SyncStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"sync.name={name}: unknown strategy; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](replica_group, counter or CommCounter(), options or {})


__all__ = ["SyncStrategy", "DDPSync", "build_sync", "STRATEGIES"]
