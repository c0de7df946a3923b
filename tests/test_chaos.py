"""Chaos on a simulated multi-node cluster: one run loses random ranks' processes, nodes and keepers at random
steps (seeded), one of them while it recovers, and still ends with exactly the parameters of a run without a
fault (the tensor checksums of the final universal checkpoints) and every step once in ``metrics.jsonl``."""
import json
import random

import pytest

from orchestrate.checkpoint.universal import version_dir
from tests.support.runs import orchestrate, records_of

STEPS = 40
# a larger batch than the quickstart's: steps of ~0.4 s, so that the keepers' commits keep up with the faults as
# they do when a step takes seconds (at 0.05 s a step the first faults come before the first commit)
COMMON = ["recipe=quickstart", f"train.steps={STEPS}", "train.global_batch_size=64", "parallel.dp=2",
          "logging.progress=false",
          "checkpoint.persist_every=5", "cluster.cpus_per_worker=1", "cluster.start_timeout_s=120"]


def chaos_schedule(seed: int) -> tuple[str, int]:
    """Six faults at distinct random steps (two faults at one step would race): a process, node and keeper loss
    each, three more of random kinds, then one fault during the recovery that follows; and the node losses."""
    rng = random.Random(seed)
    kinds = ["process", "node", "keeper"] + [rng.choice(["process", "node", "keeper"]) for _ in range(3)]
    rng.shuffle(kinds)
    # from step 8 on: a version is on disk (step 5) for the loss that finds no replica and no keeper left
    steps = sorted(rng.sample(range(8, STEPS - 2, 3), len(kinds)))
    faults = [f"{{rank:{rng.randrange(2)},at_step:{step},kind:{kind}}}" for step, kind in zip(steps, kinds)]
    faults.append(f"{{rank:{rng.randrange(2)},during_recovery:true}}")
    return f"fault.schedule=[{','.join(faults)}]", kinds.count("node")


def final_checksums(run_dir) -> dict[str, str]:
    manifest = json.loads((version_dir(run_dir / "checkpoints", STEPS) / "manifest.json").read_text())
    return {name: [f["checksum"] for f in record["fragments"]] for name, record in manifest["tensors"].items()}


@pytest.mark.slow
def test_random_faults_end_with_the_parameters_of_a_run_without_them(sim, tmp_path):
    schedule, node_losses = chaos_schedule(seed=7)
    sim.resize(2 + node_losses + 1)  # a spare for every node loss, and one more
    on_sim = [f"cluster.address={sim.address}"]
    clean = orchestrate("launch", *COMMON, *on_sim, f"run.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    chaos = orchestrate("launch", *COMMON, *on_sim, schedule, "fault.max_restarts=10",
                        f"run.dir={tmp_path / 'chaos'}", timeout=900)
    assert chaos.returncode == 0, chaos.stderr[-3000:]
    records = records_of(tmp_path / "chaos")
    assert [r["step"] for r in records if "step_time" in r] == list(range(1, STEPS + 1))
    assert len([r for r in records if r.get("event") == "fault"]) >= 6
    recoveries = [r["recovery"] for r in records if "recovery" in r]
    assert any("interrupted_by" in r for r in recoveries)  # the fault during a recovery hit one
    assert final_checksums(tmp_path / "chaos") == final_checksums(tmp_path / "clean")
