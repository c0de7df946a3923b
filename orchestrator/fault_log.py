"""Which injected faults (``fault.*``) fired: a rank records its fault in the cluster's key-value store (one
write to Ray's GCS, a millisecond) right before it fires, so it dies at once and a recovery that redoes the step
does not fire it again. Nothing waits for the controller's metric polls."""
from __future__ import annotations

import dataclasses
import json

from orchestrate.config import FaultSpec

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
