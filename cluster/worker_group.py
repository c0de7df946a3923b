"""A gang of worker actors: placement group, rendezvous, run-on-all-ranks, health checks, clean shutdown."""
from __future__ import annotations

import time
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrate.cluster.health import live_node_ids

# Control calls (liveness, stop, what a rank holds) run in their own concurrency group so they answer while a
# rank is training; long polls that wait for a rank's results run in another, so a waiting poll delays neither.
CONTROL_GROUP = "control"
REPORTS_GROUP = "reports"


class WorkerGroupError(RuntimeError):
    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


class PlacementError(WorkerGroupError):
    """The cluster cannot place the requested workers."""


class StartTimeout(RuntimeError):
    """Ranks did not start (or join the process group) within the start timeout; not a failure to recover from."""


class SetupTimeout(StartTimeout):
    """Ranks did not finish their setup within the setup timeout: a hang (a lock, a filesystem) that starting them
    again would meet again, so not a failure to recover from either."""


class WorkerGroup:
    def __init__(self, worker_cls: type, world_size: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
                 start_timeout_s: float = 60.0, collective_timeout_s: float = 120.0,
                 worker_args: tuple = ()):
        self.world_size = world_size
        bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        self.placement_group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=start_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise PlacementError(
                f"cannot place {world_size} workers with {bundle} each within {start_timeout_s:.0f}s; "
                f"cluster has {ray.cluster_resources()}")
        self.actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0,
                                    concurrency_groups={CONTROL_GROUP: 1, REPORTS_GROUP: 1})(worker_cls)
        self.worker_args, self.start_timeout_s, self.collective_timeout_s = worker_args, start_timeout_s, \
            collective_timeout_s
        self.actors = [self._start_actor(rank) for rank in range(world_size)]
        try:
            self.infos = self._rendezvous()
        except BaseException:
            self.shutdown(timeout_s=0)
            raise

    def _start_actor(self, rank: int):
        """Rank ``rank``'s actor in its bundle of the placement group: on the bundle's node while that lives
        (Ray moves the bundles of a lost node to nodes with room)."""
        return self.actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement_group, placement_group_bundle_index=rank)).remote(rank, self.world_size, *self.worker_args)

    def _rendezvous(self) -> list[dict]:
        """Every rank joins one new process group (survivors of a failure leave their broken one)."""
        self._wait_started([actor.ping.remote() for actor in self.actors], "started")
        master_addr, master_port = self.gather([self.actors[0].rendezvous_address.remote()], self.start_timeout_s)[0]
        refs = [a.init_distributed.remote(master_addr, master_port, self.collective_timeout_s) for a in self.actors]
        self._wait_started(refs, "joined the process group")
        return self.gather(refs)

    def _wait_started(self, refs: list, what: str) -> None:
        """Until every rank's call in ``refs`` is done; a timeout names the ranks missing and their nodes."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if len(ready) == len(refs):
            return
        missing = [rank for rank, ref in enumerate(refs) if ref not in ready]
        where = self.bundle_addresses()
        nodes = sorted({where.get(rank, "unplaced") for rank in missing})
        ranks = f"rank{'s' if len(missing) > 1 else ''} {rank_ranges(missing)}"
        raise StartTimeout(
            f"{self.world_size - len(missing)} of {self.world_size} ranks {what} within {self.start_timeout_s:.0f}s; "
            f"not yet: {ranks} on {', '.join(nodes)}; raise cluster.start_timeout_s (now "
            f"{self.start_timeout_s:.0f}) if those nodes are only slow to start")

    def bundle_addresses(self) -> dict[int, str]:
        """Rank -> address of the node its placement bundle is on."""
        table = ray.util.placement_group_table(self.placement_group)
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        return {bundle: addresses.get(node_id, node_id) for bundle, node_id in table["bundles_to_node_id"].items()}

    def replace(self, ranks: list[int]) -> None:
        """Start ``ranks`` anew (their actors died or hang) and re-form the process group with the surviving
        ranks, which keep their processes."""
        for rank in ranks:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.actors[rank] = self._start_actor(rank)
        self.infos = self._rendezvous()

    def gather(self, refs: list, timeout_s: Optional[float] = None) -> list:
        """Results of per-rank calls in order; a dead actor becomes WorkerGroupError naming its rank."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except RayActorError as err:
            raise WorkerGroupError(f"a worker died: {err}", rank=self.rank_of_failure(refs)) from err

    def rank_of_failure(self, refs: list) -> Optional[int]:
        """The first rank whose call in ``refs`` (one per rank) raised an actor error, if any finished."""
        for rank, ref in enumerate(refs):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ref)
                except RayActorError:
                    return rank
                except Exception:  # noqa: BLE001 - an application error is not a dead actor
                    continue
        return None

    def call_async(self, method: str, *args: Any, ranks: Optional[list[int]] = None, control: bool = False,
                   **kwargs: Any) -> list:
        ranks = list(range(self.world_size)) if ranks is None else ranks
        refs = []
        for rank in ranks:
            bound = getattr(self.actors[rank], method)
            if control:
                bound = bound.options(concurrency_group=CONTROL_GROUP)
            refs.append(bound.remote(*args, **kwargs))
        return refs

    def run(self, method: str, *args: Any, timeout_s: Optional[float] = None, **kwargs: Any) -> list:
        """Run ``method`` on every rank and gather the results in rank order."""
        return self.gather(self.call_async(method, *args, **kwargs), timeout_s)

    def health_check(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks that did not answer a ping in time (dead or wedged)."""
        dead, unresponsive = self.probe(timeout_s)
        return sorted(dead + unresponsive)

    def probe(self, timeout_s: float = 10.0, slow_wait_s: float = 0.0) -> tuple[list[int], list[int]]:
        """(ranks Ray reports dead, ranks that stopped answering): every rank is pinged once. One that has not
        answered after ``timeout_s`` stopped answering when its node is no longer listed alive (a node that is
        gone leaves the list once Ray's health checks give up on it), else it gets up to ``slow_wait_s`` more to
        answer that ping (a live rank on a machine whose cores are all busy answers late)."""
        pings = dict(enumerate(self.call_async("ping", control=True)))
        dead, unresponsive = [], []
        started = time.monotonic()
        while pings:
            ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=0.2)
            for rank, ref in [(rank, ref) for rank, ref in pings.items() if ref in ready]:
                try:
                    ray.get(ref)
                    del pings[rank]
                except ActorUnavailableError:  # unreachable for now: ask again
                    pings[rank] = self.call_async("ping", ranks=[rank], control=True)[0]
                except RayActorError:
                    del pings[rank]
                    dead.append(rank)
            waited = time.monotonic() - started
            if pings and waited >= timeout_s:
                alive = set(live_node_ids())
                for rank in [r for r in pings if waited >= timeout_s + slow_wait_s
                             or self.infos[r]["node_id"] not in alive]:
                    del pings[rank]
                    unresponsive.append(rank)
        return sorted(dead), sorted(unresponsive)

    def stacks(self, timeout_s: float = 10.0) -> dict[int, str]:
        """Rank -> every thread's stack now (asked beside any running call), for the ranks that answer in time."""
        refs = self.call_async("stacks", control=True)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        found = {}
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    found[rank] = ray.get(ref)
                except RayError:  # died meanwhile
                    continue
        return found

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Destroy process groups where ranks still answer, then kill every actor and free the placement."""
        refs = [a.shutdown.options(concurrency_group=CONTROL_GROUP).remote() for a in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
