"""Erasure-coded groups of SnapshotKeepers: n keepers survive the loss of any m at memory overhead n / (n - m).

Rotated stripes. Each keeper's own data D_i for a version (the packed snapshots of its node's ranks, padded to a
common length L = k * chunk across the group, k = n - m) is kept locally, cut into k chunks. There are n stripes;
in stripe s, member (s + j) mod n holds shard j: shards 0..k-1 are data (member i contributes its own chunk
(i - s) mod n), shards k..n-1 are Reed-Solomon parity of those k chunks. Every member is a data member of k
stripes and a parity member of m, so it stores L + m * L / k = (n / k) * L bytes, reads its own data back without
decoding, and a lost member's chunks are decoded from any k survivors of each of its k stripes.

Two sides live here:
  * ``GroupMember`` runs inside a keeper: it fetches the data chunks of the stripes it holds parity for from the
    other keepers (keeper-to-keeper calls, off the training path) and decodes a lost member's data.
  * ``KeeperGroup`` / ``commit_l1`` / ``persist_l2`` run in the controller: the commit protocol (seal -> encode ->
    mark committed), rebuild requests, and writing a held version to the universal format from the keepers.
A version is L1-committed only after every keeper of every group holds its data and parity for it; until then
each keeper keeps the previous committed version (see SnapshotKeeper). Own data is read from the keeper's
shared-memory arenas in place; only the chunks a parity member needs travel, keeper to keeper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from orchestrate.checkpoint.erasure import ReedSolomon
from orchestrate.checkpoint.snapshot_index import align

ShardFetch = Callable[[int], np.ndarray]  # stripe -> this member's shard of it
# a member (or the node holding its reply) is gone or does not answer
_UNAVAILABLE = (RayActorError, GetTimeoutError, ObjectLostError)
FAILED_CALLS_GRACE_S = 2.0  # after a failed commit: how long the other keepers' calls may take to end


class GroupLostError(RuntimeError):
    """More members of a group are gone than its parity covers: the version must come from disk."""


class L1CommitError(RuntimeError):
    """A version could not be committed at level 1; the previous committed version is still held."""


class NotHeldError(LookupError):
    """A keeper does not hold (that part of) a version."""


@dataclass(frozen=True)
class StripeLayout:
    size: int  # n keepers
    parity: int  # m: losses survived

    def __post_init__(self) -> None:
        if not 0 <= self.parity < self.size <= 256:
            raise ValueError(f"keeper group of {self.size} with parity {self.parity}: need 0 <= parity < size <= 256")

    @property
    def data_members(self) -> int:
        return self.size - self.parity

    @property
    def memory_overhead(self) -> float:
        return self.size / self.data_members

    def shard_of(self, member: int, stripe: int) -> int:
        return (member - stripe) % self.size

    def member_at(self, stripe: int, shard: int) -> int:
        return (stripe + shard) % self.size

    def stripe_of_chunk(self, member: int, chunk: int) -> int:
        """The stripe that member's own chunk number ``chunk`` is a data shard of."""
        return (member - chunk) % self.size

    def parity_stripes(self, member: int) -> list[int]:
        return [s for s in range(self.size) if self.shard_of(member, s) >= self.data_members]

    def chunk_length(self, largest_data_bytes: int) -> int:
        return align(-(-largest_data_bytes // self.data_members))

    def check_survivable(self, lost: Collection[int]) -> None:
        if len(lost) > self.parity:
            raise GroupLostError(f"lost {len(lost)} of {self.size} keepers; group survives at most {self.parity} "
                                 f"— fall back to disk (lost members {sorted(lost)})")


# ---------------------------------------------------------------------------------------------- keeper side


class GroupMember:
    """This keeper's place in a group: computes its parity stripes and decodes a lost member's data."""

    def __init__(self, index: int, members: Sequence, parity: int, call_timeout_s: float):
        self.layout = StripeLayout(len(members), parity)
        if not 0 <= index < self.layout.size:
            raise ValueError(f"member index {index} outside the group of {self.layout.size}")
        self.index, self.members, self.call_timeout_s = index, list(members), call_timeout_s
        self.codec = ReedSolomon(self.layout.data_members, parity) if parity else None
        # parity shard j of a stripe is generator row j: one single-row plan per row, so each member computes
        # only the parity it stores
        self._row_plans = {} if self.codec is None else {
            row: self.codec.kernel.prepare(self.codec.generator[row:row + 1])
            for row in range(self.layout.data_members, self.layout.size)}

    def encode_parity(self, version: int, chunk_length: int,
                      allocate: Callable[[int], np.ndarray] = lambda n: np.empty(n, dtype=np.uint8)
                      ) -> dict[int, np.ndarray]:
        """stripe -> this member's parity chunk (in a buffer from ``allocate``), from the data chunks fetched from
        the stripe's data members."""
        parity = {}
        for stripe in self.layout.parity_stripes(self.index):
            owners = [self.layout.member_at(stripe, j) for j in range(self.layout.data_members)]
            refs = [self.members[owner].shard.remote(version, stripe, chunk_length) for owner in owners]
            chunks = ray.get(refs, timeout=self.call_timeout_s)
            out = allocate(chunk_length)
            if chunk_length:
                self.codec.kernel.apply(self._row_plans[self.layout.shard_of(self.index, stripe)], chunks, [out])
            parity[stripe] = out
        return parity

    def decode_member(self, version: int, lost: int, chunk_length: int, local_shard: ShardFetch) -> np.ndarray:
        """The lost member's whole padded data (k chunks), decoded stripe by stripe from surviving shards."""
        if lost == self.index:
            raise ValueError("a keeper cannot rebuild itself; ask a survivor")
        unavailable = {lost}
        self.layout.check_survivable(unavailable)
        data = np.empty(self.layout.data_members * chunk_length, dtype=np.uint8)
        for chunk in range(self.layout.data_members):
            stripe = self.layout.stripe_of_chunk(lost, chunk)
            shards = self._gather(version, stripe, unavailable, local_shard)
            target = data[chunk * chunk_length:(chunk + 1) * chunk_length]
            self.codec.decode(shards, chunk_length, out={chunk: target})
        return data

    def _gather(self, version: int, stripe: int, unavailable: set[int], local_shard: ShardFetch) -> dict:
        """Any k shards of a stripe, data shards first (their decode rows are identity rows); members that do not
        answer join ``unavailable``."""
        k = self.layout.data_members
        shards: dict[int, np.ndarray] = {}
        while len(shards) < k:
            candidates = sorted((m for m in range(self.layout.size)
                                 if m not in unavailable and self.layout.shard_of(m, stripe) not in shards),
                                key=lambda m: self.layout.shard_of(m, stripe))
            for member, shard in zip(candidates, self._fetch(version, stripe, candidates[:k - len(shards)],
                                                             local_shard)):
                if shard is None:
                    unavailable.add(member)
                    self.layout.check_survivable(unavailable)
                else:
                    shards[self.layout.shard_of(member, stripe)] = shard
        return shards

    def _fetch(self, version: int, stripe: int, members: list[int], local_shard: ShardFetch) -> list:
        refs = {m: self.members[m].shard.remote(version, stripe) for m in members if m != self.index}
        found = []
        for member in members:
            if member == self.index:
                found.append(local_shard(stripe))
                continue
            try:
                found.append(ray.get(refs[member], timeout=self.call_timeout_s))
            except (*_UNAVAILABLE, NotHeldError):
                found.append(None)
        return found


# ---------------------------------------------------------------------------------------------- controller side


def _reason(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the remote exception as .cause
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _get(refs: list, timeout_s: float, what: str, version: int, previous: Optional[int]):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayError as error:  # GetTimeoutError included
        # ray.get raises at the first failure. A call that lands after the discard only fills a dropped record;
        # waiting for calls stuck on a lost keeper would hold back every later commit.
        ray.wait(refs, num_returns=len(refs), timeout=min(timeout_s, FAILED_CALLS_GRACE_S))
        raise L1CommitError(f"L1 commit of version {version} failed while {what} ({_reason(error)}); the newest "
                            f"L1-committed version stays {previous}") from error


class KeeperGroup:
    """Controller-side handle on n keeper actors (one per node) that erasure-code every version among them."""

    def __init__(self, keepers: Sequence, parity: int, timeout_s: float = 120.0):
        self.layout = StripeLayout(len(keepers), parity)
        self.keepers = list(keepers)
        self.timeout_s = timeout_s
        self.committed_version: Optional[int] = None
        self._join()

    def _join(self) -> None:
        ray.get([k.join_group.remote(i, self.keepers, self.layout.parity) for i, k in enumerate(self.keepers)],
                timeout=self.timeout_s)

    def replace_member(self, index: int, keeper) -> None:
        """Put a fresh keeper (on a replacement node) in slot ``index``. It holds nothing of earlier versions, so
        the group counts it as lost for those until the next commit."""
        self.keepers[index] = keeper
        for member, ref in enumerate([k.join_group.remote(i, self.keepers, self.layout.parity)
                                      for i, k in enumerate(self.keepers)]):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except _UNAVAILABLE:
                if member == index:
                    raise

    def commit(self, version: int, expected_ranks: Collection[int]) -> None:
        commit_l1([self], version, expected_ranks, self.timeout_s)

    def rebuild(self, version: int, lost: int) -> dict[int, tuple[dict, np.ndarray]]:
        """rank -> (index, payload) of a lost member, decoded by the first survivor that answers."""
        return self._ask_survivor("rebuild", version, lost)[1]

    def restore(self, version: int, lost: int) -> tuple[object, list[int]]:
        """(survivor, ranks): a survivor decodes lost member ``lost``'s ranks and holds them for ``get``."""
        return self._ask_survivor("restore_member", version, lost)

    def _ask_survivor(self, method: str, version: int, lost: int) -> tuple[object, object]:
        dead, lacking = {lost}, []
        for member in range(self.layout.size):
            if member == lost:
                continue
            survivor = self.keepers[member]
            try:
                return survivor, ray.get(getattr(survivor, method).remote(version, lost), timeout=self.timeout_s)
            except GroupLostError as error:  # raised in the keeper: re-raise without the remote traceback
                raise GroupLostError(str(getattr(error, "cause", error))) from None
            except _UNAVAILABLE:
                dead.add(member)
            except NotHeldError:
                lacking.append(member)
        self.layout.check_survivable(dead)
        raise GroupLostError(f"no keeper of the group could rebuild member {lost} of version {version}: members "
                             f"{lacking} do not hold it encoded — fall back to disk")


def commit_l1(groups: Sequence[KeeperGroup], version: int, expected_ranks: Collection[int],
              timeout_s: float = 120.0, pin: bool = False) -> None:
    """Make ``version`` L1-committed in every group, or raise L1CommitError after asking the keepers to drop it.

    Seal (freeze each keeper's ranks) -> check that exactly ``expected_ranks`` are held -> encode on every keeper
    of every group. Once every encode returned, every keeper holds data and parity, so the version is committed;
    only then are the keepers told (``mark_committed``: it lets them drop the previous committed version), so each
    keeper's ``committed_version()`` names a version the whole world can restore from memory."""
    keepers = [keeper for group in groups for keeper in group.keepers]
    try:
        _seal_and_encode(groups, keepers, version, sorted(expected_ranks), timeout_s)
    except L1CommitError:
        # a sealed version blocks new handovers until it is committed or dropped; dead keepers hold nothing
        ray.wait([keeper.discard.remote(version) for keeper in keepers], num_returns=len(keepers),
                 timeout=min(timeout_s, FAILED_CALLS_GRACE_S))
        raise
    for group in groups:
        group.committed_version = version
    # a keeper that dies now is a plain loss of a committed version, which its group's parity covers
    ray.wait([keeper.mark_committed.remote(version, pin) for keeper in keepers], num_returns=len(keepers),
             timeout=timeout_s)


def _seal_and_encode(groups: Sequence[KeeperGroup], keepers: list, version: int, expected: list[int],
                     timeout_s: float) -> None:
    previous = groups[0].committed_version if groups else None
    directories = _get([k.seal.remote(version) for k in keepers], timeout_s, "sealing", version, previous)
    held = sorted(entry["rank"] for directory in directories for entry in directory["ranks"])
    if held != expected:
        raise L1CommitError(f"L1 commit of version {version}: keepers hold ranks {held}, expected {expected}; "
                            f"the newest L1-committed version stays {previous}")
    encodes, start = [], 0
    for group in groups:
        mine = directories[start:start + group.layout.size]
        start += group.layout.size
        # with parity, every member's data is padded to the largest; without, nothing needs a common length
        largest = max(d["nbytes"] for d in mine)
        encodes += [keeper.encode.remote(version, group.layout.chunk_length(largest if group.layout.parity
                                                                            else directory["nbytes"]), mine)
                    for keeper, directory in zip(group.keepers, mine)]
    _get(encodes, timeout_s, "encoding", version, previous)


def persist_l2(keepers: Sequence, version: int, root: str, world_ranks: Sequence[int], keep: int = 2,
               timeout_s: float = 600.0) -> list:
    """Refs of every (live) keeper writing its ranks of ``version`` to ``root``; the keeper holding the lowest rank
    (whose snapshot carries the trainer state) also commits it (manifest + ``latest``) once every rank of
    ``world_ranks`` is written. Wait on the refs off the training loop. A rank whose keeper is lost is written by
    nobody: rebuild it first, or persist an older version."""
    held = ray.get([keeper.held_ranks.remote() for keeper in keepers], timeout=timeout_s)
    first = min(world_ranks)
    coordinator = next((i for i, versions in enumerate(held) if first in versions.get(version, [])), 0)
    return [keeper.persist.remote(version, root, list(world_ranks) if i == coordinator else None, keep, timeout_s)
            for i, keeper in enumerate(keepers)]
