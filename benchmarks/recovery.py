"""Recovery from a killed rank, in memory (SnapshotKeeper, level 1) vs from disk (level 2), in one run.

Each side runs the quickstart recipe with the same injected fault (rank 1 dies at ``--at-step``) and reads the
recovery record the controller writes: seconds from the failure being detected to the first finished step
after it, and the steps redone. Snapshots are taken every step; disk versions every ``--persist-every`` steps.
Encode/decode speed of the erasure code against memcpy is ``benchmarks/erasure.py``.

    python -m benchmarks.recovery [--steps 40] [--at-step 25] [--persist-every 10]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def recover(source: str, steps: int, at_step: int, persist_every: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["recipe=quickstart", f"train.steps={steps}", f"checkpoint.persist_every={persist_every}",
                     "fault.kill_rank=1", f"fault.at_step={at_step}", f"run.dir={tmp}/run", "logging.progress=false",
                     f"checkpoint.keepers={'true' if source == 'keeper' else 'false'}"]
        subprocess.run([sys.executable, "-m", "orchestrator", "launch", *overrides], check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    [recovery] = [r["recovery"] for r in records if "recovery" in r]
    return recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--at-step", type=int, default=25)
    parser.add_argument("--persist-every", type=int, default=10)
    args = parser.parse_args()
    print(f"Recovery: quickstart, 2 workers, rank 1 killed at step {args.at_step}, disk every "
          f"{args.persist_every} steps, snapshot every step\n")
    print("| source | restored step | steps redone | seconds to next finished step | goal |")
    print("|---|---|---|---|---|")
    for source in ("keeper", "disk"):
        r = recover(source, args.steps, args.at_step, args.persist_every)
        goal = "<= 10 s, <= 1 step" if source == "keeper" else "-"
        print(f"| {r['source']} | {r['restored_step']} | {r['steps_lost']} | {r['seconds']:.1f} | {goal} |")


if __name__ == "__main__":
    main()
