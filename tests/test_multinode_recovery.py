"""Recovery from node loss on a simulated multi-node cluster (one raylet per node, all on this machine).

Every worker node has one CPU, so the two ranks of ``quickstart`` (cpus_per_worker=1) run on two nodes; the
others are spares for the replacements. ``fault.kind=node`` SIGKILLs a rank's raylet: the node leaves the
cluster with its trainers and its SnapshotKeeper. Level 2 is off (``persist_every=0``) unless a test wants the
disk: a run that finishes with the clean curve then restored from memory only.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from tests.support.runs import (ENV, STEPS, assert_close_curves, curve_of, orchestrate, records_of, recoveries_of,
                                 wait_for_records)

ON_CLUSTER = ["cluster.cpus_per_worker=1", "checkpoint.keepers=true", "cluster.start_timeout_s=60"]


@pytest.fixture(scope="module")
def clean_curve(reference):
    return reference[1]


def launch_on(sim, run_dir, spare_nodes, *overrides):
    sim.resize(2 + spare_nodes)
    return orchestrate("launch", "recipe=quickstart", f"train.steps={STEPS}", "logging.progress=false",
                       "parallel.dp=2", f"cluster.address={sim.cluster.address}", *ON_CLUSTER, *overrides,
                       f"run.dir={run_dir}")


def controller_lines(result):
    """The controller's own output: the actors' log lines (prefixed with their pid) bury it otherwise."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "pid=" not in line]
    return "\n".join(lines[-30:])


@pytest.mark.slow
def test_lost_node_is_healed_from_the_surviving_replica_and_the_curve_is_unchanged(sim, clean_curve, tmp_path):
    result = launch_on(sim, tmp_path, 1, "checkpoint.persist_every=0", "fault.kill_rank=1", "fault.at_step=12",
                       "fault.kind=node")
    assert result.returncode == 0, controller_lines(result)
    assert curve_of(tmp_path) == clean_curve
    [recovery] = recoveries_of(tmp_path)
    # rank 0's node lives on, and rank 0 holds the same state as rank 1 (DDP): it stays and sends it to rank 1,
    # started anew on the spare node
    assert recovery["source"] == "replica" and len(recovery["lost_nodes"]) == 1
    assert recovery["restarted_ranks"] == [1] and recovery["kept_ranks"] == [0]
    before, after = [r for r in records_of(tmp_path) if r.get("event") == "workers"]
    assert after["pids"][0] == before["pids"][0] and after["nodes"][1] not in before["nodes"]
    assert recovery["steps_lost"] >= 0 and recovery["seconds"] > 0
    assert not (tmp_path / "checkpoints").exists()  # nothing was read from (or written to) disk
    assert "fault injected: node of rank 1" in " ".join((result.stdout + result.stderr).split())


def kill_training_nodes_once(sim, tmp_path, ready, *overrides, hold=None, count=2, spares=2):
    """Launch on 2 + ``spares`` nodes, wait until ``ready(records)``, then remove ``count`` training nodes at once
    (two fault.kind=node faults at one step race: the first loss tears the gang down before the second fires).
    With ``hold``, the training
    processes are stopped (SIGSTOP) once ready and the nodes removed once ``hold()`` is true: the keepers go on
    committing meanwhile, so what a loss finds no longer depends on how fast the steps are. Returns the
    finished run."""
    sim.resize(2 + spares)
    command = [sys.executable, "-m", "orchestrate", "launch", "recipe=quickstart", f"train.steps={STEPS}",
               "logging.progress=false", "parallel.dp=2", f"cluster.address={sim.address}", *ON_CLUSTER,
               *overrides, f"run.dir={tmp_path}"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(tmp_path, ready, process)
        free_cpus = ray._private.state.available_resources_per_node()
        training = [node for node in sim.nodes if free_cpus.get(node.node_id, {}).get("CPU", 0) == 0]
        assert len(training) == 2
        training = training[2 - count:]
        if hold is not None:
            [workers] = [r for r in records_of(tmp_path) if r.get("event") == "workers"]
            for pid in workers["pids"]:
                os.kill(pid, signal.SIGSTOP)
            deadline = time.monotonic() + 60
            while not hold():
                assert time.monotonic() < deadline, "what the loss needs did not appear while training was held"
                time.sleep(0.1)
        for node in training:
            sim.cluster.remove_node(node, allow_graceful=False)
            sim.nodes.remove(node)
        lost = {node.node_id for node in training}
        for pid, node in zip(*(workers["pids"], workers["nodes"]) if hold is not None else ((), ())):
            try:  # a stopped process would not notice its raylet is gone; one on a live node goes on
                os.kill(pid, signal.SIGKILL if node in lost else signal.SIGCONT)
            except ProcessLookupError:
                pass
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    for node in training:  # the next run must not be offered a node that is gone
        sim.wait_until_dead(node.node_id)
    return process.returncode, stderr, training


@pytest.mark.slow
def test_parity_many_nodes_lost_at_once_are_decoded(sim, clean_curve, tmp_path):
    # training is held once a version is committed: the first commit across nodes may come late (it came at step
    # 16 of 20 once), and the loss must find the run still training
    returncode, stderr, training = kill_training_nodes_once(
        sim, tmp_path, lambda records: any(r.get("step", 0) >= 8 and r.get("ckpt_l1") is not None for r in records),
        "checkpoint.persist_every=0", "checkpoint.ec.parity=2", hold=lambda: True)
    assert returncode == 0, stderr[-3000:]
    assert curve_of(tmp_path) == clean_curve
    [recovery] = recoveries_of(tmp_path)
    assert recovery["source"] == "parity" and recovery["decoded_ranks"] == [0, 1]
    assert sorted(recovery["lost_nodes"]) == sorted(node.node_id for node in training)


@pytest.mark.slow
def test_more_losses_than_parity_fall_back_to_disk_or_fail_clearly(sim, clean_curve, tmp_path):
    # both training nodes are lost once a version is on disk (every committed version goes there)
    (tmp_path / "disk").mkdir()
    returncode, stderr, _ = kill_training_nodes_once(
        sim, tmp_path / "disk", lambda records: any("step_time" in r for r in records), "checkpoint.persist_every=1",
        hold=lambda: (tmp_path / "disk" / "checkpoints" / "latest").exists())
    assert returncode == 0, stderr[-3000:]
    assert curve_of(tmp_path / "disk") == clean_curve
    [recovery] = recoveries_of(tmp_path / "disk")
    assert recovery["source"] == "disk" and 1 <= recovery["restored_step"] < STEPS

    # the same loss without a disk: one line, exit 1
    (tmp_path / "none").mkdir()
    returncode, stderr, _ = kill_training_nodes_once(
        sim, tmp_path / "none", lambda records: any("step_time" in r for r in records), "checkpoint.persist_every=0",
        hold=lambda: True)
    assert returncode == 1
    assert "no committed checkpoint to restore" in stderr.splitlines()[-1]


@pytest.mark.slow
def test_without_room_for_the_layout_the_run_resumes_elastically_with_fewer_replicas(sim, clean_curve, tmp_path):
    # one of the two nodes is lost once a version is on disk, and no node is left to take its rank
    returncode, stderr, _ = kill_training_nodes_once(
        sim, tmp_path, lambda records: any("step_time" in r for r in records), "checkpoint.persist_every=1",
        hold=lambda: (tmp_path / "checkpoints" / "latest").exists(), count=1, spares=0)
    assert returncode == 0, stderr[-3000:]
    [recovery] = recoveries_of(tmp_path)
    assert recovery["elastic"] == {"dp_from": 2, "dp_to": 1} and recovery["source"] == "disk"
    curve = curve_of(tmp_path)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert_close_curves(curve, clean_curve, 1e-4)  # the same global batch, split over one replica instead of two
