"""TrainWorker: one Ray actor per rank. Builds mesh -> model -> parallelism -> optimizer + sync -> data, then
trains, keeping per-step metrics for the controller to poll while training runs."""
from __future__ import annotations

import os
import threading

import torch
from omegaconf import OmegaConf

from cluster.worker_base import DistributedWorker
from orchestrator.config import Config
from orchestrator.data import ResumableSampler, WindowedTokens, eval_window_ids, load_tokens
from orchestrator.models import LlamaConfig, build_llama, cross_entropy_loss
from orchestrator.trainer import StepMetrics, Trainer, build_lr_scheduler, build_optimizer
from parallel.comm import CommCounter
from parallel.mesh import build_mesh, replica_mesh
from parallel.sync import SyncStrategy, build_sync
from parallel.sync.fsdp import FSDPSync


def config_from_dict(cfg_dict: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg_dict))


def llama_config(cfg: Config) -> LlamaConfig:
    m = cfg.model
    return LlamaConfig(vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
                       n_kv_heads=m.n_kv_heads, ffn_hidden=m.ffn_hidden, multiple_of=m.multiple_of,
                       max_seq_len=cfg.train.seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
                       tie_embeddings=m.tie_embeddings, init_std=m.init_std)


def build_data(cfg: Config) -> WindowedTokens:
    tokens = load_tokens(cfg.data.source, cfg.data.path, cfg.data.max_bytes)
    return WindowedTokens(tokens, cfg.train.seq_len, cfg.data.val_fraction)


def build_sync_strategy(cfg: Config, mesh) -> SyncStrategy:
    replicas = replica_mesh(mesh)
    if cfg.parallel.dp_shard:
        return FSDPSync(replicas, CommCounter())
    return build_sync(cfg.sync.name, replicas.get_group(), CommCounter())


class TrainWorker(DistributedWorker):
    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.cfg: Config | None = None
        self.trainer: Trainer | None = None
        self._metrics: list[dict] = []
        self._lock = threading.Lock()
        self._in_step = False

    def setup(self, cfg_dict: dict) -> dict:
        self.cfg = cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
        dims = cfg.dims
        self.coords = dims.coordinates(self.rank)
        device = torch.device(self.device_type)
        mesh = build_mesh(dims, self.device_type)
        model = build_llama(llama_config(cfg), seed=cfg.train.seed).to(device)
        sync = build_sync_strategy(cfg, mesh)
        wrapped = sync.wrap_model(model)
        optimizer = sync.build_optimizer(model.parameters(), lambda _params: build_optimizer(cfg.optim, model))
        scheduler = build_lr_scheduler(cfg.optim, cfg.train.steps, optimizer)
        data = build_data(cfg)
        sampler = ResumableSampler(data.n_train, cfg.train.global_batch_size, self.coords["dp"], dims.dp,
                                   cfg.train.seed)
        reports_loss = self.coords["tp"] == 0 and self.coords["pp"] == dims.pp - 1
        self.trainer = Trainer(wrapped, optimizer, scheduler, sync, sampler, data, cross_entropy_loss, device,
                               cfg.train.grad_clip, reports_loss=reports_loss)
        n_params = sum(p.numel() for p in model.parameters())
        return {"rank": self.rank, "reports_loss": reports_loss, "n_params": n_params,
                "train_windows": data.n_train, "coords": self.coords}

    def train(self, n_steps: int) -> dict:
        fault = self.cfg.fault
        for _ in range(n_steps):
            if fault.kill_rank == self.rank and fault.at_step == self.trainer.step + 1:
                os._exit(1)  # a deliberate abrupt death (fault.kind=process), as a crash would be
            self._in_step = True
            metrics = self.trainer.train_step()
            self._in_step = False
            self._publish(metrics)
        return {"step": self.trainer.step}

    def evaluate(self, n_batches: int) -> float | None:
        t = self.trainer
        batches = eval_window_ids(t.data, n_batches, self.cfg.train.global_batch_size, self.coords["dp"],
                                  self.cfg.parallel.dp)
        return t.evaluate(batches)

    def _publish(self, metrics: StepMetrics) -> None:
        with self._lock:
            self._metrics.append(metrics.as_dict())

    def finished_step(self) -> int:
        return self.trainer.step - 1 if self.trainer.step and self._in_step else self.trainer.step

    def poll_metrics(self) -> list[dict]:
        """Metrics of the steps finished since the last poll (runs beside train in the control group)."""
        with self._lock:
            drained, self._metrics = self._metrics, []
        return drained
