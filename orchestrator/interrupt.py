"""Ctrl-C and SIGTERM (a scheduler's preemption) while a run trains: the first one asks the controller to save the
newest snapshot as a universal checkpoint and stop; a second one stops at once."""
from __future__ import annotations

import signal
import threading
from typing import Optional

from orchestrate.config import CheckpointConfig
from orchestrate.recovery import versions_held_by_all

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Raised by the controller once it saved what it could after a first Ctrl-C or SIGTERM."""

    def __init__(self, signum: int, checkpoint: Optional[str], step: Optional[int]):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class InterruptRequests:
    """Installed on the main thread for the length of a run; ``signum`` is the first signal received."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptRequests":
        self.install()
        return self

    def install(self) -> None:
        """Handle the signals here (again after ``ray.init``: Ray's core worker installs its own SIGTERM handler,
        which logs and exits)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second one: unwind now (the cluster is still torn down on the way out)
        self.signum = signum


def save_held_versions(group, cfg: CheckpointConfig, logged_step: int, timeout_s: float) -> Optional[int]:
    """Keepers off: every rank pins the same version in its host arena (training goes on in another slot) and
    writes it to ``cfg.dir``; the newest one not newer than ``logged_step``, or None when there is none
    (``checkpoint.every=0``, nothing copied yet)."""
    held = group.gather(group.call_async("held_versions", False, control=True), timeout_s)
    cadence = cfg.every * cfg.persist_every
    # a version due on disk anyway is being written by the ranks' own persisters: not twice at once
    candidates = [v for v in versions_held_by_all(held, logged_step) if not (cadence and v % cadence == 0)]
    for version in reversed(candidates):
        if all(group.gather(group.call_async("pin_snapshot", version, control=True), timeout_s)):
            group.gather(group.call_async("save_pinned", version, cfg.dir, cfg.keep, control=True))
            return version
        group.gather(group.call_async("pin_snapshot", None, control=True), timeout_s)
    return None
