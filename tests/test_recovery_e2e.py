"""Automatic recovery: a rank killed mid-run is replaced, the newest committed version is restored, and the run
finishes with the loss curve of a run without the fault."""

import mmap

import pytest

from tests.support.runs import orchestrate, ray_processes_of_ours, records_of, run, tmpfs_used_bytes


@pytest.mark.slow
def test_killed_rank_is_healed_from_its_replica_and_the_survivor_keeps_its_process(reference, tmp_path):
    overrides = ["checkpoint.persist_every=3", "checkpoint.keep=2"]
    _, expected = reference
    recovered = run(tmp_path / "faulty", *overrides, "checkpoint.keepers=false", "fault.kill_rank=1",
                    "fault.at_step=8")
    assert recovered == expected
    records = records_of(tmp_path / "faulty")
    [recovery] = [r["recovery"] for r in records if "recovery" in r]
    # no keeper, no disk version needed: rank 0 holds the same state as rank 1 (DDP) and sends it
    assert recovery["failed_rank"] == 1 and recovery["source"] == "replica"
    assert recovery["restarted_ranks"] == [1] and recovery["kept_ranks"] == [0]
    assert recovery["restored_step"] <= 7 and recovery["seconds"] > 0 and recovery["steps_lost"] <= 7
    before, after = [r["pids"] for r in records if r.get("event") == "workers"]
    assert after[0] == before[0] and after[1] != before[1]  # the survivor's process stayed
    assert [r["fault"]["at_step"] for r in records if r.get("event") == "fault"] == [8]
    assert not ray_processes_of_ours()
    # both ranks lost at once: no replica survives, each one's keeper holds its snapshot
    both = "fault.schedule=[{rank:0,at_step:12},{rank:1,at_step:12}]"
    from_memory = run(tmp_path / "keepers", *overrides, "checkpoint.keepers=true", both)
    assert from_memory == expected
    records = records_of(tmp_path / "keepers")
    [recovery] = [r["recovery"] for r in records if "recovery" in r]
    assert recovery["source"] == "keeper" and recovery["restarted_ranks"] == [0, 1]
    last_step = [r for r in records if "step_time" in r][-1]
    assert last_step["ckpt_l1"] is not None and (tmp_path / "keepers" / "checkpoints" / "latest").exists()
    [memory] = [r["nodes"] for r in records if r.get("event") == "keeper_memory"]
    [node] = memory.values()  # one node: no parity; the arenas hold shm_versions of each rank's state
    assert node["parity_bytes"] == 0 and node["arena_bytes"] >= node["slots"] * node["state_bytes"]
    # nothing more than those versions but, for each of the 2 ranks, a header page and in each slot a compressed
    # index (a page or two) and the payload's rounding up to a page
    assert node["arena_bytes"] - node["slots"] * node["state_bytes"] <= 2 * (1 + node["slots"] * 3) * mmap.PAGESIZE


def assert_optimizer_wrote_the_snapshots(records):
    """The optimizer step wrote each version's parameters, moments and step counts straight into its slot: a
    snapshot copied nothing, except the first of each process (no layout yet)."""
    copied = [r["ckpt_copied_bytes"] for r in records if r.get("step", 0) >= 3 and "ckpt_copied_bytes" in r]
    assert len(copied) >= 10 and sum(c > 0 for c in copied) <= 4, copied


@pytest.mark.slow
def test_without_restarts_left_the_run_fails_clearly_and_frees_its_shared_memory(tmp_path, tmpfs):
    shm = tmpfs("256M")
    result = orchestrate("launch", "recipe=quickstart", "train.steps=8", "checkpoint.persist_every=2",
                         "fault.kill_rank=0", "fault.at_step=5", "fault.max_restarts=0", f"checkpoint.shm_dir={shm}",
                         f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "rank 0 died during step 5" in result.stderr and "fault.max_restarts=0 used up" in result.stderr
    assert tmpfs_used_bytes(shm) == 0


@pytest.mark.slow
def test_keeper_loss_and_a_fault_during_recovery_are_survived(tmp_path):
    # 100 steps: a replacement keeper takes a few seconds to start (it imports torch) while training goes on, and
    # the ranks snapshot into the lost keeper's orphaned arenas until then (unprotected)
    # keepers take each snapshot from the (fused) optimizer step itself, no copy
    overrides = ["checkpoint.persist_every=0", "train.steps=100"]
    expected = run(tmp_path / "clean", *overrides)
    schedule = "fault.schedule=[{rank:0,at_step:3,kind:keeper},{rank:1,at_step:96},{rank:0,during_recovery:true}]"
    assert run(tmp_path / "faulty", *overrides, "checkpoint.keepers=true", schedule) == expected
    records = records_of(tmp_path / "faulty")
    assert_optimizer_wrote_the_snapshots(records)
    [replaced] = [r for r in records if r.get("event") == "keeper_replaced"]
    assert replaced["ranks"] == [0, 1]
    interrupted, recovered = [r["recovery"] for r in records if "recovery" in r]
    assert "rank 0" in interrupted["interrupted_by"] and interrupted["source"] == "replica"
    # rank 0 died while it restored, and rank 1 holds nothing yet: each rank's keeper holds its part, nothing
    # decoded
    assert recovered["source"] == "keeper" and recovered["decoded_ranks"] == []
    # rank 1 died as it was about to start step 96, while its snapshot of step 95 was being finished in the
    # background (lazy: the copy overlaps the next step): the keepers hold 95 for every rank, or 94
    assert interrupted["version"] - 1 <= recovered["restored_step"] <= interrupted["version"]
    assert not (tmp_path / "faulty" / "checkpoints").exists()
