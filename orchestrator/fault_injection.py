"""Injected faults (``fault.*``): which are still to fire, which gang gets which, and which fired.

A rank records its fault in the cluster's key-value store (one write to Ray's GCS, a millisecond) right before it
fires, so it dies at once and a recovery that redoes the step does not fire it again. Nothing waits for the
controller's metric polls; the controller reads the record when it recovers (``FaultPlan``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from orchestrate.config import Config, ConfigError, FaultSpec, derive

NAMESPACE = "orchestrate-faults"


def record_fired(run_key: str, spec: FaultSpec) -> None:
    from ray.experimental import internal_kv

    entry = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    internal_kv._internal_kv_put(f"{run_key}|{entry}", b"1", namespace=NAMESPACE)


def fired_faults(run_key: str) -> list[FaultSpec]:
    """The faults of run ``run_key`` recorded so far, in no particular order."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list(f"{run_key}|", namespace=NAMESPACE)
    return [FaultSpec(**json.loads(key.decode().split("|", 1)[1])) for key in keys]


def forget_faults(run_key: str) -> None:
    from ray.experimental import internal_kv

    for key in internal_kv._internal_kv_list(f"{run_key}|", namespace=NAMESPACE):
        internal_kv._internal_kv_del(key, namespace=NAMESPACE)


class FaultPlan:
    """The controller's side: the faults still to fire, and those the ranks recorded as fired."""

    def __init__(self, cfg: Config):
        self.run_key = cfg.run.dir
        self.pending: list[FaultSpec] = cfg.fault.planned()
        self.fired: list[FaultSpec] = []  # in the order the controller learnt of them

    def for_gang(self, cfg: Config, recovering: bool) -> Config:
        """The config a gang gets: the faults still to fire (those during a recovery only when it is one)."""
        pending = [f for f in self.pending if recovering or not f.during_recovery]
        return derive(cfg, {"fault.kill_rank": None, "fault.at_step": None, "fault.schedule": pending})

    def newly_fired(self) -> list[FaultSpec]:
        """Faults the ranks recorded since the last call."""
        new = [spec for spec in fired_faults(self.run_key) if spec not in self.fired]
        self.fired.extend(new)
        return new

    def drop_fired(self, recovering: bool) -> None:
        """A recovering gang redoes the steps of faults that fired: they do not fire again, nor do faults during a
        recovery once one happened."""
        self.pending = [f for f in self.pending if not (f.during_recovery and recovering) and f not in self.fired]

    def drop_ranks_from(self, world_size: int) -> None:
        """A smaller gang (elastic shrink) lacks the ranks from ``world_size`` on: their faults are dropped."""
        self.pending = [f for f in self.pending if f.rank < world_size]

    def forget(self) -> None:
        forget_faults(self.run_key)


def check_node_faults(gang_cfg: Config, node_of_rank: Sequence[str], controller_node: str) -> None:
    """A node fault on the controller's own node would take the controller down with it."""
    for spec in gang_cfg.fault.schedule:
        if spec.kind == "node" and node_of_rank[spec.rank] == controller_node:
            raise ConfigError(f"fault.kind=node: rank {spec.rank} runs on the controller's node; give the head node "
                              f"no worker CPUs or fault another rank")
