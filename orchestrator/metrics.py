"""Where per-step metrics go: metrics.jsonl in the run directory, and wandb when enabled."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from orchestrate.config import WandbConfig


class MetricsLog:
    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, run_name: str, config: dict):
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb_run = start_wandb(wandb_cfg, run_dir, run_name, config) if wandb_cfg.enabled else None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None},
                               step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(cfg: WandbConfig, run_dir: Path, run_name: str, config: dict) -> Optional[object]:
    """Offline unless the user set WANDB_MODE, so no network or API key is needed."""
    import wandb

    os.environ.setdefault("WANDB_MODE", cfg.mode)
    return wandb.init(project=cfg.project, name=run_name, dir=str(run_dir), config=config)


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as file:
        return [json.loads(line) for line in file if line.strip()]


def aggregate_step(reports: list[dict], run_start: float, tokens_per_step: int) -> dict:
    """One metrics.jsonl record from the per-rank reports of a step, rank 0's first (in rank order, so sums are
    deterministic). Rank 0 coordinates checkpoint commits, so its checkpoint versions are the committed ones."""
    losses = [r["loss"] for r in reports if r["loss"] is not None]
    # replicas of low-communication methods differ between syncs: their held-out losses are averaged
    eval_losses = [r["eval_loss"] for r in reports if r.get("eval_loss") is not None]
    step_time = max(r["step_time"] for r in reports)
    return {
        "step": reports[0]["step"],
        "loss": sum(losses) / len(losses) if losses else None,
        "lr": reports[0]["lr"],
        "tokens": reports[0]["tokens"],
        "tokens_per_s": tokens_per_step / step_time,
        "step_time": step_time,
        "comm_bytes": reports[0]["comm_bytes"],
        "comm_peak_bytes": reports[0]["comm_peak_bytes"],
        "wall_time": max(r["time"] for r in reports) - run_start,
        "time": max(r["time"] for r in reports),
        "ckpt_l0": reports[0].get("ckpt_l0"),
        "ckpt_l2": reports[0].get("ckpt_l2"),
        **({"eval_loss": sum(eval_losses) / len(eval_losses)} if eval_losses else {}),
        # keepers on: bytes the ranks' snapshot copies moved (the optimizer writes the rest in place)
        **({"ckpt_copied_bytes": sum(r["ckpt_copied_bytes"] for r in reports)}
           if all("ckpt_copied_bytes" in r for r in reports) else {}),
        **loss_rank_timing(reports),
    }


def loss_rank_timing(reports: list[dict]) -> dict[str, float]:
    """Pipeline compute/wait split as the last stage (the first rank that has the loss) saw it."""
    return next((r["timing"] for r in reports if r["loss"] is not None and r.get("timing")), {})
