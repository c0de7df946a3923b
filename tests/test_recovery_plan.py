"""Which source each rank of a recovering gang restores from (orchestrator/recovery.py), without a cluster."""
from pathlib import Path
from types import SimpleNamespace

from orchestrate.recovery import plan_recovery, replica_of


def coords(dp, tp=1, pp=1):
    return [{"dp": d, "tp": t, "pp": p, "cp": 0} for p in range(pp) for d in range(dp) for t in range(tp)]


def never():
    raise AssertionError("a slower source was asked although a faster one serves")


def test_a_lost_data_parallel_rank_takes_the_newest_logged_version_its_replica_holds():
    plan = plan_recovery([1], {0: [6, 7]}, coords(dp=2), logged_step=6, heals_from_replicas=True,
                         keeper_plan=never, disk_source=never)
    assert plan.source == "replica" and plan.version == 6
    assert plan.sources == {0: ("own", 6), 1: ("replica", 6, 0)}


def test_replicas_are_ranks_of_the_same_stage_and_tensor_shard():
    layout = coords(dp=2, tp=2)  # ranks 0, 1: dp 0 (tp 0, 1); ranks 2, 3: dp 1
    assert replica_of(3, layout, [0, 1, 2]) == 1 and replica_of(2, layout, [0, 1]) == 0
    assert replica_of(3, layout, [0, 2]) is None


def test_without_identical_replicas_or_a_logged_version_the_keepers_then_the_disk_serve():
    keeper = SimpleNamespace(version=5, source="keeper", holders={0: "k0", 1: "k1"}, decoded_ranks=[])
    for heals, held in ((False, {0: [5, 6]}), (True, {0: [7]})):
        plan = plan_recovery([1], held, coords(dp=2), logged_step=6, heals_from_replicas=heals,
                             keeper_plan=lambda: keeper, disk_source=never)
        assert plan.source == "keeper" and plan.version == 5
        expected_own = ("own", 5) if 5 in held[0] else ("keeper", 5, "k0")
        assert plan.sources == {0: expected_own, 1: ("keeper", 5, "k1")}
    plan = plan_recovery([0], {1: [3]}, coords(dp=1, tp=2), logged_step=3, heals_from_replicas=True,
                         keeper_plan=lambda: None, disk_source=lambda: Path("/c/step-2"))
    assert plan.source == "disk" and plan.disk == Path("/c/step-2") and plan.version is None
    assert plan_recovery([0], {}, coords(dp=2), 3, True, lambda: None, lambda: None) is None


def test_a_recovery_record_logs_its_outcome_and_not_its_clock_marks():
    from orchestrate.recovery import RecoveryRecord, failure_time

    started = failure_time({0: 100.0, 1: 103.0}, lost=[1], detected=104.5)
    assert started == 103.0 and failure_time({}, [1], 104.5) == 104.5
    record = RecoveryRecord(failed_rank=1, restarted_ranks=[1], kept_ranks=[0], lost_nodes=[], source="keeper",
                            version=12, decoded_ranks=[], detected_at=104.5, started=started, last_step=14)
    record.restored_step = 12
    record.finish(step_end=106.25)
    line = record.to_metrics()
    assert line["seconds"] == 3.25 and line["steps_lost"] == 2 and line["resumed_at"] == 106.25
    assert not {"started", "last_step", "elastic", "interrupted_by"} & set(line)
    cut = RecoveryRecord(failed_rank=0, restarted_ranks=[0], kept_ranks=[], lost_nodes=["n1"], source="disk",
                         version="/ckpt/step_10", decoded_ranks=[], detected_at=5.0, started=4.0, last_step=11)
    cut.cut_short("rank 0 died", now=6.0)
    assert cut.to_metrics()["interrupted_by"] == "rank 0 died" and "steps_lost" not in cut.to_metrics()


def test_elastic_shrink_picks_the_largest_valid_data_parallel_degree_that_fits():
    from orchestrate.config import Config, derive
    from orchestrate.recovery import data_parallel_that_fits

    cfg = derive(Config(), {"parallel.dp": 4, "parallel.tp": 2, "train.global_batch_size": 16})
    assert data_parallel_that_fits(cfg, slots=7) == 2  # dp=3 does not divide the batch of 16
    assert data_parallel_that_fits(cfg, slots=1) is None
