import os

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from cluster.worker_base import DistributedWorker
from cluster.worker_group import WorkerGroup, WorkerGroupError


class SumWorker(DistributedWorker):
    def all_reduce_rank(self) -> float:
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    def crash(self) -> None:
        os._exit(1)


def test_group_rendezvous_runs_on_all_ranks_and_detects_death(local_ray):
    group = WorkerGroup(SumWorker, world_size=3, cpus_per_worker=0.5, collective_timeout_s=20)
    try:
        assert [info["rank"] for info in group.infos] == [0, 1, 2]
        assert all(info["backend"] == "gloo" for info in group.infos)
        assert group.run("all_reduce_rank") == [6.0, 6.0, 6.0]
        assert group.health_check() == []
        pids = group.run("ping")
        assert len(set(pids)) == 3 and os.getpid() not in pids
        crashed = group.call_async("crash", ranks=[1])
        ray.wait(crashed, timeout=20)  # pings run in another concurrency group and could answer before the crash
        assert group.health_check(timeout_s=10) == [1]
        with pytest.raises(WorkerGroupError):
            group.run("ping", timeout_s=10)
    finally:
        group.shutdown()
    gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=10)
    assert alive == []  # shutdown leaves no worker process behind


def test_group_that_cannot_be_placed_fails_fast(local_ray):
    from cluster.worker_group import PlacementError

    with pytest.raises(PlacementError, match="cannot place 3 workers"):
        WorkerGroup(SumWorker, world_size=3, cpus_per_worker=1.0, start_timeout_s=2)
