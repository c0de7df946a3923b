"""Level-1 snapshots: the packing codec, SnapshotKeeper actors and their erasure-coded groups.

The cluster tests share one simulated multi-node Ray cluster (ray.cluster_utils.Cluster: a head without CPUs plus
one node per keeper, all on this machine); node loss is ``cluster.remove_node``. Every node runs one keeper and
one producer actor that hands over the snapshots of two ranks and then dies.
"""
import json
import warnings

import numpy as np
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from checkpoint.arena import HostArena
from checkpoint.engine import CheckpointEngine
from checkpoint.fragments import load_model
from checkpoint.keeper import KeeperBusyError, KeeperHandover, SnapshotKeeper, start_keeper
from checkpoint.keeper_group import (GroupLostError, KeeperGroup, L1CommitError, NotHeldError, StripeLayout,
                                     persist_l2)
from checkpoint.reshard import load_slices
from checkpoint.snapshot_codec import ALIGNMENT, SnapshotIndex, copy_into, pack, pack_into, plan_index, unpack
from checkpoint.universal import (CheckpointError, FragmentSpec, SliceSpec, TrainerState, latest_version_dir,
                                  read_manifest)

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


def packed_snapshot(version, rank):
    state = {"step": version, "samples_consumed": 8 * version, "seed": 0, "scheduler": {}, "config": {},
             "extra": {}}
    index, payload = pack(rank_fragments(version, rank), {"trainer_state": state})
    return index.to_json(), payload


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


def test_keeper_keeps_the_committed_version_and_refuses_more_than_it_may_hold():
    keeper = SnapshotKeeper(keep=2)
    keeper.join_group(0, [None], 0)
    for version in (1, 2):
        keeper.put(version, 0, *packed_snapshot(version, 0))
    # full: newer versions are refused (not evicting older ones), so every keeper keeps the same oldest versions
    with pytest.raises(KeeperBusyError, match="version 3 skipped"):
        keeper.put(3, 0, *packed_snapshot(3, 0))
    assert keeper.versions() == [1, 2]
    commit_alone(keeper, 2)
    assert keeper.committed_version() == 2 and keeper.versions() == [2]
    keeper.put(3, 0, *packed_snapshot(3, 0))
    keeper.put(3, 1, *packed_snapshot(3, 1))
    keeper.seal(3)  # a commit of 3 is in progress
    with pytest.raises(KeeperBusyError, match="version 4 skipped"):
        keeper.put(4, 0, *packed_snapshot(4, 0))
    with pytest.raises(CheckpointError, match="came too late"):
        keeper.put(3, 2, *packed_snapshot(3, 2))
    keeper.discard(3)  # the commit of 3 failed
    keeper.put(4, 0, *packed_snapshot(4, 0))
    assert keeper.versions() == [2, 4]
    with pytest.raises(CheckpointError, match="not newer"):
        keeper.put(1, 0, *packed_snapshot(1, 0))
    assert_snapshots_equal({0: keeper.get(2, 0)}, 2, [0])
    with pytest.raises(NotHeldError):
        keeper.get(3, 0)
    assert keeper.held_bytes() == keeper.get(2, 0)[1].nbytes + keeper.get(4, 0)[1].nbytes


def test_a_full_keeper_still_seals_an_empty_version_for_a_commit():
    keeper = SnapshotKeeper(keep=2)
    for version in (1, 2):
        keeper.put(version, 0, *packed_snapshot(version, 0))
    assert keeper.seal(5)["ranks"] == [] and keeper.versions() == [1, 2, 5]


def test_keeper_refuses_a_payload_that_does_not_match_its_index():
    keeper = SnapshotKeeper()
    index, payload = packed_snapshot(1, 0)
    with pytest.raises(CheckpointError, match="payload must be"):
        keeper.put(1, 0, index, payload[:-ALIGNMENT])


# ---------------------------------------------------------------------------------------------- simulated cluster


@ray.remote(num_cpus=0)
class Producer:
    """Stands in for a trainer: hands its ranks' snapshots to its node's keeper, waits for the acks."""

    def hand_over(self, keeper, version, ranks):
        return ray.get([keeper.put.remote(version, rank, *packed_snapshot(version, rank)) for rank in ranks])


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
    """Every node's producer hands over its ranks of ``version``, then is killed."""
    producers = [Producer.options(scheduling_strategy=on_node(node)).remote() for node in nodes]
    acks = ray.get([p.hand_over.remote(k, version, node_ranks(i))
                    for i, (p, k) in enumerate(zip(producers, keepers))])
    assert all(len(a) == RANKS_PER_NODE for a in acks)
    for producer in producers:
        ray.kill(producer)


def test_snapshots_outlive_the_producers_that_handed_them_over(keepers):
    nodes, handles = keepers
    hand_over_and_die(nodes, handles, version=5)
    for i, keeper in enumerate(handles):
        assert_snapshots_equal(ray.get(keeper.get_all.remote(5)), 5, node_ranks(i))
    index, payload = ray.get(handles[1].get.remote(5, 3))
    weight = next(f for f in unpack(index, payload) if f.name == "weight")
    assert torch.equal(weight.tensor, rank_fragments(5, 3)[0].tensor)


def test_engine_hands_its_arena_copy_to_the_keeper(keepers):
    _, handles = keepers
    live = rank_fragments(6, 0)
    engine = CheckpointEngine(HostArena(), every=1, persist_every=1, persister=KeeperHandover(handles[0], rank=0))
    with engine:
        engine.snapshot(6, lambda: live, TrainerState(step=6, samples_consumed=48))
    index, payload = ray.get(handles[0].get.remote(6, 0))
    assert SnapshotIndex.from_json(index).meta["trainer_state"]["samples_consumed"] == 48
    for restored, original in zip(unpack(index, payload), live):
        assert restored.key == original.key and torch.equal(restored.tensor, original.tensor)


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


@pytest.mark.parametrize("parity", [1, 2])
def test_group_rebuilds_up_to_parity_lost_nodes_and_refuses_more(sim, keepers, parity):
    nodes, handles = keepers
    group = KeeperGroup(handles, parity)
    hand_over_and_die(nodes, handles, version=3)
    group.commit(3, WORLD)
    assert ray.get([k.committed_version.remote() for k in handles]) == [3] * NODES

    # memory: own data (padded to the largest member) plus m parity chunks of L / k each
    own = [sum(p.nbytes for _, p in ray.get(k.get_all.remote(3)).values()) for k in handles]
    chunk = group.layout.chunk_length(max(own))
    held = ray.get([k.held_bytes.remote() for k in handles])
    assert held == [NODES * chunk] * NODES
    assert held[0] / max(own) == pytest.approx(NODES / (NODES - parity), rel=0.01)

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

    # the controller replaces the node; the next version is protected again
    nodes[3] = sim.live_nodes(NODES)[3]
    handles[3] = start_keeper(nodes[3].node_id, call_timeout_s=30)
    group.replace_member(3, handles[3])
    hand_over_and_die(nodes, handles, version=3)
    group.commit(3, WORLD)
    # committing 3 frees the older committed version (kept, it would block handovers once `keep` are held)
    assert ray.get([k.versions.remote() for k in handles]) == [[3]] * 4
    assert_snapshots_equal(group.rebuild(3, 0), 3, node_ranks(0))
