"""Which held version a snapshot overwrites when every slot of an arena holds one (the host arena of
checkpoint/arena.py and the keepers' shared-memory arenas of checkpoint/keepers/arena.py alike)."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional


def slot_to_overwrite(candidates: Mapping[int, int], held: Iterable[Optional[int]], reported: Optional[int]) -> int:
    """The slot of the oldest of ``candidates`` (version -> slot, not empty), sparing, while another is left, the
    newest of them (the trainer's state now) and the newest ``held`` version not newer than ``reported``.

    ``reported`` is the newest step whose report the controller took from this rank. The controller logs no later
    step, and a recovery rolls back to the newest version every rank holds not newer than the last logged step (a
    lost rank's later reports die with it). While the controller keeps up, that version is one of the newest two
    and sparing it changes nothing; when it falls behind (busy for half a second while the ranks train on), the
    arena keeps it, where plain rotation would leave only versions after it and a recovery would roll back to the
    last commit, many steps older."""
    at_or_before = [v for v in held if v is not None and reported is not None and v <= reported]
    spared = {max(candidates), *([max(at_or_before)] if at_or_before else [])}
    pool = {v: slot for v, slot in candidates.items() if v not in spared} or candidates
    return pool[min(pool)]
