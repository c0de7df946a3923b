"""Which held version a snapshot overwrites when every slot of an arena holds one (the host arena of
checkpoint/arena.py and the keepers' shared-memory arenas of checkpoint/keepers/arena.py alike)."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional


def slot_to_overwrite(candidates: Mapping[int, int], held: Iterable[Optional[int]], logged: Optional[int]) -> int:
    """The slot of the oldest of ``candidates`` (version -> slot, not empty), sparing, while another is left, the
    newest of them (the trainer's state now) and the newest ``held`` version not newer than ``logged``.

    ``logged`` is the last step the controller logged, as the rank last heard it. A recovery rolls back to the
    newest version every rank holds not newer than that step, since a lost rank's reports of the later steps die
    with it; without this a controller a few steps behind (busy for half a second) would find only the versions
    after it and roll back to the last commit, many steps older."""
    at_or_before_logged = [v for v in held if v is not None and logged is not None and v <= logged]
    spared = {max(candidates), *([max(at_or_before_logged)] if at_or_before_logged else [])}
    pool = {v: slot for v, slot in candidates.items() if v not in spared} or candidates
    return pool[min(pool)]
