"""Values remembered for lists of the very same objects. A rank's snapshot path sees the same few lists of
fragments again and again (one per arena slot the state moves through); working out their layout, checking their
keys or finding which tensors a slot lacks once per list, not once per step, is most of what keeps a small model's
snapshot cheap."""
from __future__ import annotations

from typing import Any, Optional, Sequence


class IdentityMemo:
    """Up to ``capacity`` values, each for a list of objects compared by identity (not equality). A lookup costs a
    tuple of the ids; the objects are held while remembered, so no other object can take one of their ids."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: dict[tuple[int, ...], tuple[list, Any]] = {}

    def get(self, items: Sequence) -> Optional[Any]:
        entry = self._entries.get(tuple(map(id, items)))
        return None if entry is None else entry[1]

    def put(self, items: Sequence, value: Any) -> Any:
        if len(self._entries) >= self.capacity:
            self._entries.clear()
        self._entries[tuple(map(id, items))] = (list(items), value)
        return value

    def clear(self) -> None:
        self._entries.clear()
