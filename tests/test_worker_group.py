import os
import signal
from types import SimpleNamespace
import time

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from orchestrate.cluster.worker_base import DistributedWorker
from orchestrate.cluster.worker_group import WorkerGroup, WorkerGroupError
from orchestrate.failures import HEALTH_CHECK_TIMEOUT_S, SLOW_RANK_WAIT_S
from orchestrate.report_polls import ReportPolls
from orchestrate.step_report import RankCheckpoint, StepReport
from orchestrate.trainer import StepMetrics
from orchestrate.worker import TrainWorker


class SumWorker(DistributedWorker):
    def all_reduce_rank(self) -> float:
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    def crash(self) -> None:
        os._exit(1)

    def wait_outside_any_collective(self, seconds: float) -> None:
        time.sleep(seconds)


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


def test_a_collective_that_times_out_leaves_the_stack_of_the_rank_it_waited_for(local_ray):
    group = WorkerGroup(SumWorker, world_size=2, cpus_per_worker=0.5, collective_timeout_s=3)
    try:
        [waited_for] = group.call_async("wait_outside_any_collective", 60, ranks=[1])
        [timed_out] = group.call_async("all_reduce_rank", ranks=[0])
        with pytest.raises(ray.exceptions.RayTaskError, match="[Tt]imed out|timeout"):
            ray.get(timed_out, timeout=60)
        stacks = group.stacks()
        assert stacks[0].startswith("rank 0, pid ") and stacks[1].startswith("rank 1, pid ")
        assert "wait_outside_any_collective" in stacks[1] and "wait_outside_any_collective" not in stacks[0]
        assert not ray.wait([waited_for], timeout=0)[0]  # asked beside the running call, which goes on
    finally:
        group.shutdown()


def test_group_that_cannot_be_placed_fails_fast(local_ray):
    from orchestrate.cluster.worker_group import PlacementError

    with pytest.raises(PlacementError, match="cannot place 3 workers"):
        WorkerGroup(SumWorker, world_size=3, cpus_per_worker=1.0, start_timeout_s=2)


class SlowStartWorker(SumWorker):
    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        if rank == 1:
            import time

            time.sleep(60)  # a node that is slow to bring the rank up


def test_ranks_not_started_in_time_are_named_with_their_nodes_and_the_setting(local_ray):
    from orchestrate.cluster.worker_group import StartTimeout

    with pytest.raises(StartTimeout) as raised:
        WorkerGroup(SlowStartWorker, world_size=2, cpus_per_worker=0.5, start_timeout_s=8)
    assert str(raised.value) == ("1 of 2 ranks started within 8s; not yet: rank 1 on 127.0.0.1; raise "
                                 "cluster.start_timeout_s (now 8) if those nodes are only slow to start")


STEP_S = 0.3


class ReportingWorker(TrainWorker):
    """A rank whose ``train`` reports a step every ``STEP_S`` without training anything: what is under test is the
    way its reports reach the controller (the worker's ``train``/``poll_metrics`` and the controller's polls).
    Its checkpointer only records the steps it is told the controller took (its arena would spare them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpointer = SimpleNamespace(reported=[])
        self.checkpointer.note_reported = self.checkpointer.reported.append

    def reported_steps(self) -> list[int]:
        return self.checkpointer.reported

    def _train(self, until_step: int) -> dict:
        for step in range(1, until_step + 1):
            time.sleep(STEP_S)
            metrics = StepMetrics(step=step, loss=1.0, lr=0.0, tokens=0, step_time=STEP_S, comm_bytes=0,
                                  comm_peak_bytes=0, time=time.time())
            self._publish(StepReport(metrics, RankCheckpoint()))
        return {"step": until_step}


def test_step_reports_reach_the_controller_as_their_steps_end_with_about_one_poll_per_step(local_ray):
    group = WorkerGroup(ReportingWorker, world_size=2, cpus_per_worker=0.5)
    try:
        stale = ReportPolls(group, [0, 1], stream=1).outstanding()  # polls of a call that a newer one replaces
        train = group.call_async("train", 6, 2)
        polls = ReportPolls(group, [0, 1], stream=2)
        delays, answers = {0: {}, 1: {}}, 0
        deadline = time.monotonic() + 60
        while not polls.drained and time.monotonic() < deadline:
            running = polls.outstanding()
            if running:
                ray.wait(running, num_returns=1, timeout=polls.wait_s())
            for rank, reports in polls.collect():
                answers += 1
                delays[rank].update({report.step: time.time() - report.time for report in reports})
        assert ray.get(train) == [{"step": 6}, {"step": 6}]
        assert [sorted(by_step) for by_step in delays.values()] == [[1, 2, 3, 4, 5, 6]] * 2  # each report once
        assert max(d for by_step in delays.values() for d in by_step.values()) < 0.5  # fetched as its step ended
        # a poll waits for the step to end: ~one answer per step and rank, not one per 0.05 s (~70 here)
        assert answers <= 2 * (6 + 3)
        assert ray.get(stale) == [([], False), ([], False)]  # the older stream's polls took nothing
        for rank, reported in enumerate(group.gather(group.call_async("reported_steps", control=True))):
            # the newest step of each answer, as the controller took it: the version the rank's arena spares
            assert reported == sorted(set(reported)) and reported[-1] == 6 and set(reported) <= set(delays[rank])
    finally:
        group.shutdown()


class BusyWorker(TrainWorker):
    """A live rank on a machine whose cores are all busy: it answers a ping ``PING_DELAY_S`` late."""

    def ping(self) -> int:
        time.sleep(PING_DELAY_S)
        return os.getpid()


PING_DELAY_S = HEALTH_CHECK_TIMEOUT_S + 2


def test_a_live_rank_that_answers_the_health_ping_late_is_not_counted_lost(local_ray):
    group = WorkerGroup(BusyWorker, world_size=2, cpus_per_worker=0.5)
    try:
        os.kill(group.infos[1]["pid"], signal.SIGKILL)
        started = time.monotonic()
        dead, unresponsive = group.probe(HEALTH_CHECK_TIMEOUT_S, SLOW_RANK_WAIT_S)
        waited = time.monotonic() - started
        # rank 1's process is gone: Ray reports it dead; rank 0 is slow, not lost (it was started anew before)
        assert (dead, unresponsive) == ([1], [])
        assert PING_DELAY_S <= waited < HEALTH_CHECK_TIMEOUT_S + SLOW_RANK_WAIT_S
    finally:
        group.shutdown()
