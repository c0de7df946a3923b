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
