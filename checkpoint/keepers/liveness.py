"""Whether the keepers live: a blocking check for the moments the controller must know (a recovery, a refresh),
and a watch the training loop looks at without waiting.

A keeper runs at the lowest CPU priority (keeper.py's ``KEEPER_NICE``), so on a node whose cores the trainers
keep busy its answer to a ping can take a second. The training loop must not wait that long: while it waits it
fetches no step report, the ranks train on, and a rank lost meanwhile takes the reports of those steps with it
(measured on the simulated cluster: checks every 2 s that blocked held the loop up to 0.9 s, and one node loss
in eight then rolled back to the last commit, 16 steps, instead of the last step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import ray

PING_TIMEOUT_S = 5.0
PING_ATTEMPTS = 3  # a keeper is lost after this many pings in a row went unanswered
CHECK_INTERVAL_S = 2.0


def keeper_answers(keeper, attempts: int = PING_ATTEMPTS) -> bool:
    """False once Ray reports the keeper dead. A keeper that is only slow or briefly unreachable (a busy node)
    gets a few tries: replacing it would throw away every version it holds."""
    for attempt in range(attempts):
        try:
            ray.get(keeper.ping.remote(), timeout=PING_TIMEOUT_S)
            return True
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            time.sleep(0.5 * (attempt + 1))
        except Exception:  # noqa: BLE001 - dead, or its node is: either way it holds nothing we can read
            return False
    return False


@dataclass
class _Ping:
    keeper: Any
    ref: Any
    sent_at: float
    misses: int  # pings in a row before this one that went unanswered
    unreachable: bool = False  # Ray answered that the keeper cannot be reached (yet not that it is dead)


class KeeperWatch:
    """Pings every keeper each ``CHECK_INTERVAL_S`` (at once after ``check_soon``) and reports, without waiting,
    the nodes whose keeper Ray reports dead or that missed ``PING_ATTEMPTS`` pings of ``PING_TIMEOUT_S``."""

    def __init__(self):
        self._pings: dict[str, _Ping] = {}
        self._checked_at = time.monotonic()
        self._soon = False

    def check_soon(self) -> None:
        """Ping at the next look (a commit failed: a keeper may be gone)."""
        self._soon = True

    def lost(self, keepers: Mapping[str, Any]) -> list[str]:
        """Nodes (of ``keepers``: node -> keeper) whose keeper is lost, as far as the answers so far tell."""
        now = time.monotonic()
        self._pings = {node: ping for node, ping in self._pings.items() if keepers.get(node) is ping.keeper}
        if self._soon or now - self._checked_at >= CHECK_INTERVAL_S:
            self._soon, self._checked_at = False, now
            for node, keeper in keepers.items():
                if node not in self._pings:
                    self._pings[node] = _Ping(keeper, keeper.ping.remote(), now, 0)
        refs = [ping.ref for ping in self._pings.values()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        lost = []
        for node, ping in list(self._pings.items()):
            if ping.ref in ready and not ping.unreachable:
                try:
                    ray.get(ping.ref)
                    del self._pings[node]
                    continue
                except ray.exceptions.ActorUnavailableError:
                    ping.unreachable = True  # a busy or a dying node: a miss once the ping's time is up
                except Exception:  # noqa: BLE001 - dead, or its node is
                    del self._pings[node]
                    lost.append(node)
                    continue
            if now - ping.sent_at < PING_TIMEOUT_S:
                continue
            if ping.misses + 1 >= PING_ATTEMPTS:
                del self._pings[node]
                lost.append(node)
            else:
                self._pings[node] = _Ping(ping.keeper, ping.keeper.ping.remote(), now, ping.misses + 1)
        return lost
