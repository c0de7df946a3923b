"""What failed in a gang, and the ranks that did not: the root-cause dead rank of a failed step (its neighbours'
collective errors are only symptoms), the ranks to start anew, and the survivors stopped with what they hold.
The controller (controller.py) decides what to do with these answers (recovery.py plans where the state comes from).
"""
from __future__ import annotations

import time
from typing import Optional

from orchestrate.cluster.health import live_node_ids
from orchestrate.cluster.worker_group import WorkerGroup, WorkerGroupError

DEATH_REPORT_GRACE_S = 3.0
HEALTH_CHECK_TIMEOUT_S = 5.0
# A rank that misses the first ping while its node stays listed is asked again for this long before it counts as
# lost: on a machine whose cores are all busy (many simulated nodes on two cores) a live survivor missed it now
# and then and was started anew with the lost ranks, a needless worker start (about 15 s there).
SLOW_RANK_WAIT_S = 15.0
SURVIVOR_STOP_TIMEOUT_S = 15.0  # a surviving rank still inside its call after this is started anew


class RankDied(WorkerGroupError):
    def __init__(self, message: str, rank: int, step: int, finished_step: int, node_ids: list[str],
                 dead_ranks: list[int]):
        super().__init__(message, rank)
        self.dead_ranks = dead_ranks  # every rank that died or stopped answering
        self.step = step  # the step during which it died
        # the newest step a surviving rank finished (without gradient all-reduce, survivors may run ahead)
        self.finished_step = finished_step
        self.node_ids = node_ids  # nodes of the ranks that died or stopped answering


def describe_failure(err: WorkerGroupError) -> str:
    """One line: Ray's actor-death text runs over many lines."""
    if isinstance(err, RankDied) or err.rank is None:
        return str(err).strip().splitlines()[0]
    return f"rank {err.rank} died while the gang started or restored"


def _raises(ref) -> bool:
    import ray

    try:
        ray.get(ref)
        return False
    except Exception:  # noqa: BLE001 - any failure of a rank's call
        return True


def raise_if_failed(group: WorkerGroup, train_refs: list, steps_logged: int, suspect: bool = False) -> None:
    """Raise ``RankDied`` naming the dead ranks when a rank's call failed because ranks died, or the rank's own
    error when it failed by itself. ``suspect``: another call already saw a dead actor, so wait for its training
    call to report it."""
    import ray

    failed = [ref for ref in train_refs if ray.wait([ref], timeout=0)[0] and _raises(ref)]
    if not failed and not suspect:
        return
    deadline = time.monotonic() + DEATH_REPORT_GRACE_S
    while (rank := group.rank_of_failure(train_refs)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # a lost node's actors are declared dead only once Ray notices the node is gone: ask every rank
    reported, unresponsive = group.probe(HEALTH_CHECK_TIMEOUT_S, SLOW_RANK_WAIT_S)
    dead = sorted({rank} - {None} | set(reported) | set(unresponsive))
    if dead:
        finished, newest = survivor_progress(group, dead) or (steps_logged, steps_logged)
        alive = set(live_node_ids())  # a rank Ray reports dead on a live node lost its process, not its node
        suspect_nodes = [group.infos[r]["node_id"] for r in dead
                         if r in unresponsive or group.infos[r]["node_id"] not in alive]
        raise RankDied(f"rank {dead[0]} died during step {finished + 1}", rank=dead[0], step=finished + 1,
                       finished_step=newest, node_ids=suspect_nodes, dead_ranks=dead)
    if failed:
        ray.get(failed[0])  # an application error in a rank: surface its message


def survivor_progress(group: WorkerGroup, dead_ranks: list[int]) -> Optional[tuple[int, int]]:
    """(newest step every survivor finished, newest step one finished); survivors wait for the dead ranks.
    None when no rank survived or answered."""
    survivors = [r for r in range(group.world_size) if r not in dead_ranks]
    try:
        finished = group.gather(group.call_async("finished_steps", ranks=survivors, control=True), 10.0)
    except Exception:  # noqa: BLE001 - best effort: more ranks may be dying
        return None
    return (min(finished), max(finished)) if finished else None


def dead_ranks(group: Optional[WorkerGroup], err: WorkerGroupError) -> list[int]:
    """The ranks to start anew: those the failure report names, else those that do not answer now."""
    if group is None:
        return []
    if isinstance(err, RankDied):
        return list(err.dead_ranks)
    dead, unresponsive = group.probe(HEALTH_CHECK_TIMEOUT_S, SLOW_RANK_WAIT_S)
    return sorted({*dead, *unresponsive} | ({err.rank} if err.rank is not None else set()))


def stop_survivors(group: Optional[WorkerGroup], survivors: list[int], busy: dict[int, object]) -> dict[int, list[int]]:
    """Surviving rank -> versions its memory holds, once it left its running call (``busy``: rank -> that call;
    training stops at the next step, and a collective with a dead rank fails). A survivor that does not get there
    in time, or dies meanwhile, is left out: it is started anew with the lost ranks."""
    import ray

    if not survivors:
        return {}
    group.call_async("stop_training", ranks=survivors, control=True)
    running = [busy[r] for r in survivors if r in busy]
    ray.wait(running, num_returns=len(running), timeout=SURVIVOR_STOP_TIMEOUT_S)
    held = {}
    for rank, ref in zip(survivors, group.call_async("held_versions", ranks=survivors, control=True)):
        if rank in busy and not ray.wait([busy[rank]], timeout=0)[0]:
            continue  # still inside its call: hung
        try:
            held[rank] = ray.get(ref, timeout=HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - died or hangs: started anew
            continue
    return held
