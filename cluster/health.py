"""Is a node still there? Ray declares a node dead only after its health checks fail for a while
(``RAY_health_check_period_ms`` x ``RAY_health_check_failure_threshold``, about 15 s by default); until then it may
still be offered to new placement groups. A recovering controller asks the node itself first."""
from __future__ import annotations

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, max_retries=0)
def _here() -> str:
    return ray.get_runtime_context().get_node_id()


def live_node_ids() -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]


def node_answers(node_id: str, timeout_s: float = 5.0) -> bool:
    """Whether a task pinned to ``node_id`` runs there within ``timeout_s`` (its raylet is alive)."""
    if node_id not in live_node_ids():
        return False
    ref = _here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        return ray.get(ref, timeout=timeout_s) == node_id
    except Exception:  # noqa: BLE001 - unschedulable, timed out, or the node died meanwhile
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        return False


def await_lost_nodes(node_ids: list[str], timeout_s: float = 60.0) -> list[str]:
    """The nodes of ``node_ids`` that are gone; waits (bounded) until Ray no longer offers them for placement."""
    lost = [node for node in dict.fromkeys(node_ids) if not node_answers(node)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not set(live_node_ids()).intersection(lost):
            break
        time.sleep(0.2)
    return lost


def worker_slots(cpus_per_worker: float, gpus_per_worker: float = 0.0) -> int:
    """How many workers of that size the live nodes can hold (each worker fits on one node)."""
    slots = 0
    for node in ray.nodes():
        if node["Alive"]:
            resources = node["Resources"]
            fit = int(resources.get("CPU", 0) / cpus_per_worker + 1e-9)
            if gpus_per_worker:
                fit = min(fit, int(resources.get("GPU", 0) / gpus_per_worker + 1e-9))
            slots += fit
    return slots
