"""Level-1 snapshots: the packing codec, SnapshotKeeper actors and their erasure-coded groups.

The cluster tests share one simulated multi-node Ray cluster (ray.cluster_utils.Cluster: a head without CPUs plus
one node per keeper, all on this machine); node loss is ``cluster.remove_node``. Every node runs one keeper and
one producer actor that hands over the snapshots of two ranks and then dies.
"""
import json
import mmap
import os
import time
from dataclasses import replace
import warnings

import numpy as np
import psutil
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from orchestrate.checkpoint.engine import CheckpointEngine
from orchestrate.checkpoint.fragments import load_model
from orchestrate.checkpoint.keepers.keeper import SnapshotKeeper, start_keeper
from orchestrate.checkpoint.keepers.liveness import KeeperWatch
from orchestrate.checkpoint.keepers.group import (GroupLostError, KeeperGroup, L1CommitError, NotHeldError, StripeLayout,
                                     persist_l2)
from orchestrate.checkpoint.reshard import load_slices
from orchestrate.checkpoint.keepers.arena import (FREE, READY, WRITING, Arena, ArenaHandle, ShmSpaceError,
                                                  estimate_meta_capacity)
from orchestrate.checkpoint.keepers.arena_writer import ArenaWriter, write_snapshot
from orchestrate.checkpoint.snapshot_codec import copy_into, pack, pack_into, plan_index, unpack
from orchestrate.checkpoint.snapshot_index import ALIGNMENT, SnapshotIndex
from orchestrate.checkpoint.universal import (CheckpointError, FragmentSpec, SliceSpec, TrainerState, latest_version_dir,
                                  read_manifest)

from tests.support.runs import tmpfs_used_bytes

NODES, RANKS_PER_NODE, COLUMNS = 4, 2, 512
WORLD = list(range(NODES * RANKS_PER_NODE))


# ---------------------------------------------------------------------------------------------- test data


def rows_of(rank):
    return 16 + rank % 3  # uneven shards: nodes hold different amounts, so the group pads to the largest


def row_start(rank):
    return sum(rows_of(r) for r in range(rank))


def full_tensors(version):
    total = row_start(len(WORLD))
    generator = torch.Generator().manual_seed(version)
    return {"weight": torch.randn(total, COLUMNS, generator=generator),
            "bias": torch.randn(total, generator=generator),
            "optim.exp_avg.weight": torch.randn(total, COLUMNS, generator=generator).to(torch.bfloat16),
            "optim.step.weight": torch.tensor(float(version))}


def rank_fragments(version, rank):
    """Rank ``rank``'s row block of every sharded tensor, plus its replica of the step scalar."""
    start, rows = row_start(rank), rows_of(rank)
    fragments = []
    for name, full in full_tensors(version).items():
        if full.dim() == 0:
            fragments.append(FragmentSpec.whole(name, full, replica_id=rank))
        else:
            offsets = (start,) + (0,) * (full.dim() - 1)
            fragments.append(FragmentSpec(name, tuple(full.shape), offsets, full[start:start + rows].clone()))
    return fragments


def trainer_state(version):
    return {"step": version, "samples_consumed": 8 * version, "seed": 0, "scheduler": {}, "config": {}, "extra": {}}


def packed_snapshot(version, rank):
    index, payload = pack(rank_fragments(version, rank), {"trainer_state": trainer_state(version)})
    return json.loads(json.dumps(index.to_json())), payload  # as JSON carries it


def arena_sizes(rank):
    index = plan_index(rank_fragments(0, rank), {"trainer_state": trainer_state(0)})
    return index.nbytes, estimate_meta_capacity(index)


def write_version(arena, version, rank):
    """What a trainer's engine does: pack one version straight into a slot of its arena."""
    fragments = rank_fragments(version, rank)
    return write_snapshot(arena, version, plan_index(fragments, {"trainer_state": trainer_state(version)}), fragments)


def node_ranks(node_index):
    return [node_index * RANKS_PER_NODE + i for i in range(RANKS_PER_NODE)]


def assert_snapshots_equal(got, version, ranks):
    assert sorted(got) == sorted(ranks)
    for rank in ranks:
        want_index, want_payload = packed_snapshot(version, rank)
        index, payload = got[rank]
        assert index == want_index
        np.testing.assert_array_equal(payload, want_payload)


# ---------------------------------------------------------------------------------------------- codec (no Ray)


def test_codec_round_trip_is_bit_exact_without_pickle():
    weight = torch.randn(5, 7)
    fragments = [FragmentSpec("w", (10, 7), (5, 0), weight),
                 FragmentSpec.whole("half", torch.randn(3, 3).to(torch.bfloat16)),
                 FragmentSpec.whole("ids", torch.arange(5, dtype=torch.int64), replica_id=2),
                 FragmentSpec.whole("mask", torch.tensor([True, False, True])),
                 FragmentSpec.whole("step", torch.tensor(3.0)),
                 FragmentSpec("empty", (4, 0), (0, 0), torch.empty(4, 0)),
                 FragmentSpec.whole("strided", torch.randn(4, 6).t())]  # non-contiguous source
    index, payload = pack(fragments, {"trainer_state": {"step": 3}})
    assert payload.dtype == np.uint8 and payload.nbytes == index.nbytes and index.nbytes % ALIGNMENT == 0
    assert all(t.byte_offset % ALIGNMENT == 0 for t in index.tensors)

    wire = json.loads(json.dumps(index.to_json()))  # the index is plain JSON
    readonly = payload.copy()
    readonly.flags.writeable = False  # as ray.get hands it out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = unpack(wire, readonly)
    assert SnapshotIndex.from_json(wire).meta == {"trainer_state": {"step": 3}}
    for before, after in zip(fragments, restored):
        assert (after.name, after.global_shape, after.offsets, after.replica_id) == \
               (before.name, before.global_shape, before.offsets, before.replica_id)
        assert after.tensor.dtype == before.tensor.dtype
        assert torch.equal(after.tensor, before.tensor)
    # zero-copy: the restored tensors are views of the payload
    assert restored[0].tensor.untyped_storage().data_ptr() == readonly.ctypes.data

    live = [FragmentSpec(f.name, f.global_shape, f.offsets, torch.zeros_like(f.tensor), f.replica_id)
            for f in fragments]
    copy_into(live, wire, readonly)
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(live, fragments))


def test_codec_reuses_a_buffer_and_rejects_mismatches():
    fragments = [FragmentSpec.whole("a", torch.randn(100)), FragmentSpec.whole("b", torch.randn(3))]
    index = plan_index(fragments)
    buffer = np.full(index.nbytes + 256, 0xFF, dtype=np.uint8)
    payload = pack_into(index, fragments, buffer)
    assert np.shares_memory(payload, buffer)
    np.testing.assert_array_equal(payload, pack(fragments)[1])  # alignment gaps are zeroed: same bytes
    with pytest.raises(CheckpointError, match="bytes"):
        unpack(index, payload[:-ALIGNMENT])
    with pytest.raises(CheckpointError, match="given twice"):
        plan_index(fragments + fragments[:1])
    with pytest.raises(CheckpointError, match="layout changed"):
        copy_into([FragmentSpec("a", (200,), (100,), torch.zeros(100))], index, payload)


# ---------------------------------------------------------------------------------------------- layout (no Ray)


@pytest.mark.parametrize("n,m", [(4, 1), (4, 2), (5, 2), (3, 0)])
def test_rotated_stripes_spread_data_and_parity_evenly(n, m):
    layout = StripeLayout(n, m)
    k = layout.data_members
    for stripe in range(n):
        assert sorted(layout.shard_of(member, stripe) for member in range(n)) == list(range(n))
    for member in range(n):
        chunks = [layout.shard_of(member, layout.stripe_of_chunk(member, c)) for c in range(k)]
        assert chunks == list(range(k))  # each own chunk is a data shard of exactly one stripe
        assert len(layout.parity_stripes(member)) == m
    assert layout.memory_overhead == n / k
    layout.check_survivable(range(m))
    with pytest.raises(GroupLostError, match=f"lost {m + 1} of {n} keepers; group survives at most {m} — "
                                             f"fall back to disk"):
        layout.check_survivable(range(m + 1))


# ---------------------------------------------------------------------------------------------- keeper (in process)


def commit_alone(keeper, version):
    """The commit protocol for a keeper that is a group of one without parity (no peers to call)."""
    directory = keeper.seal(version)
    keeper.encode(version, StripeLayout(1, 0).chunk_length(directory["nbytes"]), [directory])
    keeper.mark_committed(version)


@pytest.fixture
def keeper_and_arenas(tmp_path):
    """An in-process keeper of ranks 0 and 1 with three slots each, and the trainers' view of their arenas."""
    keeper = SnapshotKeeper(slots=3)
    keeper.join_group(0, [None], 0)
    keeper._node = lambda: "node-a"  # noqa: SLF001 - no Ray runtime in this process
    handles = keeper.reserve({rank: arena_sizes(rank) for rank in (0, 1)})
    arenas = {rank: Arena.attach(ArenaHandle.from_json(handle)) for rank, handle in handles.items()}
    yield keeper, arenas
    for arena in arenas.values():
        arena.close()
    keeper.close()


def test_arenas_hold_the_newest_versions_and_never_overwrite_a_claimed_one(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    for version in (1, 2, 3):
        assert write_version(arenas[0], version, 0)
    assert keeper.held_ranks() == {1: [0], 2: [0], 3: [0]}
    assert write_version(arenas[0], 4, 0)  # full: the oldest unclaimed version makes room
    assert keeper.held_ranks() == {2: [0], 3: [0], 4: [0]}
    for version in (2, 3, 4):
        assert write_version(arenas[1], version, 1)
    assert keeper.seal(3)["ranks"][0]["rank"] == 0  # a commit claims 3 on both ranks
    for version in (5, 6):
        assert write_version(arenas[0], version, 0) and write_version(arenas[1], version, 1)
    assert keeper.held_ranks() == {3: [0, 1], 5: [0, 1], 6: [0, 1]}  # 3 survived, 2 and 4 made room
    keeper.encode(3, StripeLayout(1, 0).chunk_length(keeper.seal(3)["nbytes"]), [keeper.seal(3)])
    keeper.mark_committed(3)
    assert keeper.committed_version() == 3 and keeper.versions() == [3, 5, 6]
    assert_snapshots_equal(keeper.get_all(3), 3, [0, 1])

    commit_alone(keeper, 6)  # older versions are freed, the committed one stays
    assert keeper.versions() == [6]
    keeper.seal(7)  # a rank that holds nothing of a version seals it empty
    assert keeper.seal(7)["ranks"] == [] and keeper.versions() == [6, 7]
    with pytest.raises(NotHeldError):
        keeper.get(5, 0)


def test_a_version_due_on_disk_is_not_overwritten_before_a_commit(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    fragments = {v: rank_fragments(v, 0) for v in range(10, 14)}
    for version, parts in fragments.items():
        index = plan_index(parts, {"trainer_state": trainer_state(version)})
        assert write_snapshot(arenas[0], version, index, parts, keep_every=10)
    assert keeper.held_ranks() == {10: [0], 12: [0], 13: [0]}  # 11 made room, not 10
    commit_alone(keeper, 13)
    assert keeper.versions() == [13]  # a newer commit frees it all the same


def test_a_rank_skips_a_version_only_while_every_slot_is_claimed(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    for version in (1, 2, 3):
        write_version(arenas[0], version, 0)
    commit_alone(keeper, 1)
    keeper.seal(2)
    keeper.seal(3)
    assert not write_version(arenas[0], 4, 0)  # committed and being committed: skipped
    keeper.discard(2)  # that commit failed
    assert write_version(arenas[0], 4, 0)
    assert keeper.held_ranks() == {1: [0], 3: [0], 4: [0]}


def test_a_full_arena_spares_the_version_a_recovery_rolls_back_to(keeper_and_arenas):
    """The controller took the report of step 1 and then fell behind while the rank trained on: version 1 stays
    held (a recovery rolls back to the newest version not newer than the last logged step), the others rotate."""
    keeper, arenas = keeper_and_arenas
    writer = ArenaWriter(arenas[0].handle())
    writer.reported_step = 1
    for version in range(1, 7):
        assert writer.copy_version(version, rank_fragments(version, 0), TrainerState(**trainer_state(version)))
    assert keeper.held_ranks() == {1: [0], 5: [0], 6: [0]}
    writer.reported_step = 5  # it caught up: 5 is spared now, 1 makes room
    assert writer.copy_version(7, rank_fragments(7, 0), TrainerState(**trainer_state(7)))
    assert keeper.held_ranks() == {5: [0], 6: [0], 7: [0]}
    assert_snapshots_equal({0: keeper.get(5, 0)}, 5, [0])


def test_a_slot_left_half_written_by_a_dead_writer_is_freed_when_its_rank_attaches_again(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    sizes = {rank: arena_sizes(rank) for rank in (0, 1)}
    before = keeper.reserve(sizes)
    write_version(arenas[0], 1, 0)
    arenas[0].header[1, :2] = (WRITING, 2)  # the trainer died while copying version 2
    assert keeper.held_ranks() == {1: [0]}
    assert keeper.reserve(sizes) == before  # the same arenas, version 1 kept
    assert [arenas[0].state(slot) for slot in range(3)] == [READY, FREE, FREE]
    assert_snapshots_equal({0: keeper.get(1, 0)}, 1, [0])


def test_an_engine_writes_its_only_copy_into_the_keepers_arena(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    live = rank_fragments(6, 0)
    writer = ArenaWriter(arenas[0].handle())
    with CheckpointEngine(writer, every=1) as engine:
        engine.snapshot(6, lambda: live, TrainerState(step=6, samples_consumed=48))
    assert writer.handed_version == 6 and engine.copied_version == 6
    index, payload = keeper.get(6, 0)
    assert SnapshotIndex.from_json(index).meta["trainer_state"]["samples_consumed"] == 48
    for restored, original in zip(unpack(index, payload), live):
        assert restored.key == original.key and torch.equal(restored.tensor, original.tensor)


def test_shared_memory_too_small_is_one_clear_error_and_nothing_is_allocated(tmpfs):
    small_tmpfs = tmpfs("1M")
    keeper = SnapshotKeeper(shm_dir=str(small_tmpfs), slots=4)
    keeper._node = lambda: "node-abcdef12"  # noqa: SLF001 - no Ray runtime in this process
    with pytest.raises(ShmSpaceError, match=rf"checkpoint.shm_dir={small_tmpfs}: the keeper of node node-abc "
                                            rf"needs \d+\.\d MiB of shared memory \(4 versions of ranks \[0, 1\]\), "
                                            rf"1.0 MiB is free; set checkpoint.shm_dir="):
        keeper.reserve({0: (2 ** 20, 65536), 1: (2 ** 20, 65536)})
    assert not list(small_tmpfs.iterdir())
    fits = SnapshotKeeper(shm_dir=str(small_tmpfs), slots=2)
    fits.reserve({0: (100_000, 65536)})
    assert not list(small_tmpfs.iterdir()) and tmpfs_used_bytes(small_tmpfs) > 0  # arenas have no name
    fits.close()
    assert tmpfs_used_bytes(small_tmpfs) == 0


# ---------------------------------------------------------------------------------------------- simulated cluster


@ray.remote(num_cpus=0)
class Producer:
    """Stands in for a trainer: writes its ranks' snapshots into their arenas on its node, then is killed."""

    def hand_over(self, handles, version, ranks):
        return [write_version(Arena.attach(ArenaHandle.from_json(handles[rank])), version, rank) for rank in ranks]


def on_node(node):
    return NodeAffinitySchedulingStrategy(node.node_id, soft=False)


@pytest.fixture
def keepers(sim):
    """One keeper per node of ``NODES`` live nodes: (nodes, keepers); keepers are killed afterwards."""
    nodes = sim.live_nodes(NODES)
    handles = [start_keeper(node.node_id, call_timeout_s=30) for node in nodes]
    assert ray.get([k.ping.remote() for k in handles]) == [node.node_id for node in nodes]
    yield nodes, handles
    for handle in handles:
        ray.kill(handle)


def hand_over_and_die(nodes, keepers, version):
    """Every node's producer writes its ranks of ``version`` into its keeper's arenas, then is SIGKILLed."""
    arenas = ray.get([k.reserve.remote({rank: arena_sizes(rank) for rank in node_ranks(i)})
                      for i, k in enumerate(keepers)])
    producers = [Producer.options(scheduling_strategy=on_node(node)).remote() for node in nodes]
    written = ray.get([p.hand_over.remote(a, version, node_ranks(i))
                       for i, (p, a) in enumerate(zip(producers, arenas))])
    assert all(written == [True] * RANKS_PER_NODE for written in written)
    for producer in producers:
        ray.kill(producer)


def test_snapshots_outlive_the_producers_that_wrote_them(keepers):
    nodes, handles = keepers
    hand_over_and_die(nodes, handles, version=5)
    for i, keeper in enumerate(handles):
        assert_snapshots_equal(ray.get(keeper.get_all.remote(5)), 5, node_ranks(i))
    index, payload = ray.get(handles[1].get.remote(5, 3))
    weight = next(f for f in unpack(index, payload) if f.name == "weight")
    assert torch.equal(weight.tensor, rank_fragments(5, 3)[0].tensor)


def test_persist_from_keepers_loads_back_in_the_universal_format(keepers, tmp_path):
    nodes, handles = keepers
    group = KeeperGroup(handles, parity=1)
    hand_over_and_die(nodes, handles, version=7)
    group.commit(7, WORLD)
    written = ray.get(persist_l2(handles, 7, str(tmp_path), WORLD))
    assert sorted(r for ranks in written for r in ranks) == WORLD

    directory = latest_version_dir(tmp_path)
    manifest = read_manifest(directory)
    assert manifest.version == 7 and manifest.trainer_state == TrainerState(step=7, samples_consumed=56)
    full = full_tensors(7)
    wanted = {name: SliceSpec(tuple(t.shape), (0,) * t.dim(), tuple(t.shape)) for name, t in full.items()}
    loaded = load_slices(directory, wanted)
    for name, tensor in full.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    model = nn.Linear(COLUMNS, row_start(len(WORLD)))
    load_model(directory, model)
    assert torch.equal(model.weight.detach(), full["weight"]) and torch.equal(model.bias.detach(), full["bias"])
    # the keepers held, encoded and wrote all of it without loading torch (each would cost ~180 MiB and seconds)
    assert keeper_processes() and not [p.pid for p in keeper_processes() if loads_torch(p)]


def keeper_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == "ray::SnapshotKeeper"]


def loads_torch(process: psutil.Process) -> bool:
    return any("libtorch" in m.path for m in process.memory_maps())


@pytest.mark.parametrize("parity", [1, 2])
def test_group_rebuilds_up_to_parity_lost_nodes_and_refuses_more(sim, keepers, parity):
    nodes, handles = keepers
    group = KeeperGroup(handles, parity)
    hand_over_and_die(nodes, handles, version=3)
    group.commit(3, WORLD)
    assert ray.get([k.committed_version.remote() for k in handles]) == [3] * NODES

    # memory beyond the arenas: m parity chunks of L / k each, L the largest member's data
    own = [sum(p.nbytes for _, p in ray.get(k.get_all.remote(3)).values()) for k in handles]
    chunk = group.layout.chunk_length(max(own))
    memory = ray.get([k.memory.remote() for k in handles])
    assert [m["parity_bytes"] for m in memory] == [parity * chunk] * NODES
    assert (max(own) + parity * chunk) / max(own) == pytest.approx(NODES / (NODES - parity), rel=0.01)

    lost = list(range(parity))
    for member in lost:
        sim.remove(nodes[member])
    for member in lost:
        assert_snapshots_equal(group.rebuild(3, member), 3, node_ranks(member))
    # a survivor decodes a lost node's ranks and holds them, so replacement workers read them with `get`
    survivor, ranks = group.restore(3, 0)
    assert ranks == node_ranks(0) and ray.get(survivor.ping.remote()) == nodes[parity].node_id
    assert_snapshots_equal({rank: ray.get(survivor.get.remote(3, rank)) for rank in ranks}, 3, node_ranks(0))
    assert ray.get(survivor.held_ranks.remote()) == {3: node_ranks(parity)}  # its own ranks, not the decoded

    sim.remove(nodes[parity])
    with pytest.raises(GroupLostError, match=f"lost {parity + 1} of {NODES} keepers; group survives at most "
                                             f"{parity} — fall back to disk"):
        group.rebuild(3, 0)


def test_a_killed_keepers_arenas_are_released(sim, tmpfs):
    shm = tmpfs("64M")
    [node] = sim.live_nodes(1)
    keeper = start_keeper(node.node_id, str(shm), call_timeout_s=30)
    arenas = ray.get(keeper.reserve.remote({rank: arena_sizes(rank) for rank in (0, 1)}))
    producer = Producer.options(scheduling_strategy=on_node(node)).remote()
    assert ray.get(producer.hand_over.remote(arenas, 1, [0, 1])) == [True, True]
    ray.kill(producer)
    assert tmpfs_used_bytes(shm) > 0 and ray.get(keeper.held_ranks.remote()) == {1: [0, 1]}
    ray.kill(keeper)
    deadline = time.monotonic() + 20
    while tmpfs_used_bytes(shm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tmpfs_used_bytes(shm) == 0


def test_keeper_killed_during_encoding_leaves_the_committed_version_intact(sim, keepers):
    nodes, handles = keepers
    group = KeeperGroup(handles, parity=1)
    hand_over_and_die(nodes, handles, version=1)
    group.commit(1, WORLD)
    hand_over_and_die(nodes, handles, version=2)

    # the commit of version 2 stops half-way: two keepers have encoded it when keeper 3's node dies
    directories = ray.get([k.seal.remote(2) for k in handles])
    chunk = group.layout.chunk_length(max(d["nbytes"] for d in directories))
    ray.get([k.encode.remote(2, chunk, directories) for k in handles[:2]])
    sim.remove(nodes[3])
    with pytest.raises(ray.exceptions.RayError):
        ray.get(handles[2].encode.remote(2, chunk, directories))
    with pytest.raises(L1CommitError, match="newest L1-committed version stays 1"):
        group.commit(2, WORLD)

    assert group.committed_version == 1
    assert ray.get([k.committed_version.remote() for k in handles[:3]]) == [1, 1, 1]
    assert_snapshots_equal(group.rebuild(1, 3), 1, node_ranks(3))
    for i in range(3):
        assert_snapshots_equal(ray.get(handles[i].get_all.remote(1)), 1, node_ranks(i))

    # the controller replaces the node and its keeper (new arenas); the next version is protected again
    nodes[3] = sim.live_nodes(NODES)[3]
    handles[3] = start_keeper(nodes[3].node_id, call_timeout_s=30)
    group.replace_member(3, handles[3])
    hand_over_and_die(nodes, handles, version=3)
    group.commit(3, WORLD)
    # committing 3 frees the older committed version's slots
    assert ray.get([k.versions.remote() for k in handles]) == [[3]] * 4
    assert_snapshots_equal(group.rebuild(3, 0), 3, node_ranks(0))


def test_a_step_that_writes_into_the_begun_slot_is_the_snapshot_and_nothing_is_copied_again(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    live = rank_fragments(6, 0)
    for slot in range(arenas[0].layout.slots):  # bytes an earlier layout left: the alignment gaps must not keep them
        arenas[0].payload(slot, arenas[0].layout.payload_capacity)[:] = 0xFF
    writer = ArenaWriter(arenas[0].handle())
    assert not writer.copies_little(6, live)
    writer.copy_version(6, live, TrainerState(step=6))
    assert writer.copied_bytes == sum(f.tensor.nbytes for f in live)
    np.testing.assert_array_equal(keeper.get(6, 0)[1], pack(live)[1])  # equal snapshots are equal byte for byte
    views = writer.begin(7, live)  # version 7's slot, laid out as version 6 was
    assert set(views) == {f.key for f in live}
    moved = []
    with torch.no_grad():
        for fragment in live[:-1]:  # "the optimizer" writes all but the last tensor straight into the slot
            views[fragment.key].copy_(fragment.tensor + 1)
            moved.append(replace(fragment, tensor=views[fragment.key]))
    moved.append(live[-1])
    assert writer.copies_little(7, moved)  # little left: the engine copies it on the trainer's thread
    assert not writer.copies_little(8, moved)  # no slot begun for version 8
    assert writer.copy_version(7, moved, TrainerState(step=7))
    assert writer.copied_bytes == live[-1].tensor.nbytes  # only what was not written in place
    held = {f.key: f.tensor for f in unpack(*keeper.get(7, 0))}
    assert all(torch.equal(held[f.key], f.tensor) for f in moved)
    before = unpack(*keeper.get(6, 0))  # the version before is intact
    assert all(torch.equal(held.tensor, fragment.tensor) for held, fragment in zip(before, live))
    keeper.seal(6)
    keeper.seal(7)
    assert writer.copy_version(8, live, TrainerState(step=8))  # the last free slot
    keeper.seal(8)
    assert writer.begin(9, live) is None  # every slot claimed: nothing to begin, the step updates in place
    assert not writer.copy_version(9, live, TrainerState(step=9)) and writer.skipped == 1


def test_an_index_that_outgrows_its_slot_gets_a_larger_arena_even_after_the_step_wrote_into_it(keeper_and_arenas):
    keeper, arenas = keeper_and_arenas
    live = rank_fragments(6, 0)
    writer = ArenaWriter(arenas[0].handle(),
                         lambda payload, meta: ArenaHandle.from_json(keeper.allocate(0, payload, meta)))
    assert writer.copy_version(6, live, TrainerState(step=6))
    meta_capacity = writer.arena.layout.meta_capacity
    assert meta_capacity <= 2 * mmap.PAGESIZE  # the index is stored compressed: not 64 KiB per slot
    views = writer.begin(7, live)
    with torch.no_grad():
        moved = [replace(f, tensor=views[f.key].copy_(f.tensor + 1)) for f in live]  # the step wrote into slot 7
    grown = TrainerState(step=7, extra={"history": os.urandom(meta_capacity).hex()})  # incompressible, 2x the room
    assert writer.copy_version(7, moved, grown)
    assert writer.arena.layout.meta_capacity > meta_capacity
    assert writer.copied_bytes == sum(f.tensor.nbytes for f in moved)  # copied out of the old arena's slot
    index, payload = keeper.get(7, 0)
    assert SnapshotIndex.from_json(index).meta["trainer_state"]["extra"] == grown.extra
    held = {f.key: f.tensor for f in unpack(index, payload)}
    assert all(torch.equal(held[f.key], f.tensor) for f in moved)
    assert keeper.held_ranks() == {7: [0]}  # the old arena went, with version 6


@ray.remote(num_cpus=0)
class Pinged:
    """Answers a ping after ``delay_s``: a keeper on a node whose cores the trainers keep busy."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def ping(self) -> str:
        time.sleep(self.delay_s)
        return "node"


def test_the_keeper_watch_never_waits_for_an_answer_and_finds_a_dead_keeper(sim):
    slow, dead = Pinged.remote(1.5), Pinged.remote(0.0)
    ray.get(dead.ping.remote())
    ray.kill(dead)
    watch, keepers = KeeperWatch(), {"slow": slow, "dead": dead}
    watch.check_soon()
    looks, lost, deadline = [], [], time.monotonic() + 20
    while not lost and time.monotonic() < deadline:
        started = time.perf_counter()
        lost = watch.lost(keepers)
        looks.append(time.perf_counter() - started)
        time.sleep(0.02)
    assert lost == ["dead"]
    del keepers["dead"]
    watch.check_soon()
    until = time.monotonic() + 4  # the slow keeper answers every ping, 1.5 s late: never lost
    while time.monotonic() < until:
        started = time.perf_counter()
        assert watch.lost(keepers) == []
        looks.append(time.perf_counter() - started)
        time.sleep(0.02)
    assert max(looks) < 0.2  # no look waited for the slow keeper's answer
    ray.kill(slow)
