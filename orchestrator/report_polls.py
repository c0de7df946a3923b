"""How the controller fetches the ranks' step reports while they train: one long poll per rank at a time.

A rank answers a poll as soon as it has a report (a step ended) or its ``train`` call ended, else after
``REPORT_WAIT_S`` with nothing. So a report reaches the controller when its step ends, not at the next tick of a
timer, and the calls follow the steps: about one per step on long steps (a 1 GiB model's 1 s step, a 32-node run's
steps of seconds on one machine) instead of 20 a second. On short steps a rank's polls are still at most
``POLL_INTERVAL_S`` apart, the reports of the steps in between come together. Each rank answers polls on a thread of
its own (cluster/worker_group.py's reports group), beside ``train`` and the control calls, so a waiting poll delays
neither. Reports carry the id of the ``train`` call they belong to (its "stream"): a poll of an older stream (a call
still in flight when a failure ended that stream) takes nothing from the next one. A rank's arena spares the version
of the newest step whose report a poll took (orchestrator/worker.py's ``poll_metrics``).
"""
from __future__ import annotations

import time

from orchestrate.cluster.worker_group import REPORTS_GROUP, WorkerGroup, WorkerGroupError
from orchestrate.step_report import StepReport

POLL_INTERVAL_S = 0.05  # at most this often per rank; a lost rank takes the reports it was not yet asked for
REPORT_WAIT_S = 10.0  # a poll that finds no report waits this long for one (it ends sooner when its call ends)
# The controller wakes at least this often (no call to the ranks, only a look at interrupts and lost keepers):
# Python runs a signal handler only between Ray's waits, and two Ctrl-C within one wait count as one.
TICK_S = 0.05


class ReportPolls:
    """The outstanding poll of each polled rank of one ``train`` stream, issued again when it was answered."""

    def __init__(self, group: WorkerGroup, ranks: list[int], stream: int):
        self.group, self.ranks, self.stream = group, list(ranks), stream
        self._outstanding: dict[int, object] = {}  # rank -> ref of its running poll
        self._issued_at = {rank: 0.0 for rank in self.ranks}
        self._finished: set[int] = set()  # ranks that answered after their ``train`` call ended

    def outstanding(self) -> list:
        """Refs of the polls running now, issuing those that are due first."""
        now = time.monotonic()
        for rank in self.ranks:
            if rank not in self._outstanding and rank not in self._finished and \
                    now - self._issued_at[rank] >= POLL_INTERVAL_S:
                self._outstanding[rank] = self.group.actors[rank].poll_metrics.options(
                    concurrency_group=REPORTS_GROUP).remote(self.stream, REPORT_WAIT_S)
                self._issued_at[rank] = now
        return list(self._outstanding.values())

    def wait_s(self) -> float:
        """How long the controller may wait for a call to end before a poll is due again or a tick passes."""
        idle = [rank for rank in self.ranks if rank not in self._outstanding and rank not in self._finished]
        due = min((self._issued_at[rank] + POLL_INTERVAL_S - time.monotonic() for rank in idle), default=TICK_S)
        return max(0.0, min(TICK_S, due))

    def collect(self) -> list[tuple[int, list[StepReport]]]:
        """(rank, reports) of every poll that has answered; a dead rank's poll raises WorkerGroupError."""
        import ray

        refs = list(self._outstanding.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        answered = []
        for rank, ref in list(self._outstanding.items()):
            if ref not in ready:
                continue
            del self._outstanding[rank]
            try:
                reports, training = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise WorkerGroupError(f"a worker died: {err}", rank=rank) from err
            if not training:
                self._finished.add(rank)
            answered.append((rank, reports))
        return answered

    @property
    def drained(self) -> bool:
        """Every polled rank answered after its ``train`` call ended: no report is left behind."""
        return self._finished >= set(self.ranks)
