"""Apply the configured parallelism to a freshly built model: the runner the trainer steps through.

A runner hides the difference between running the whole model on this rank (dp, later tp/cp) and running this
rank's pipeline stages under a schedule: ``forward_backward(inputs, targets)`` leaves gradients in the local
parameters and returns the loss where this rank has it (None elsewhere).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from orchestrate.config import Config
from orchestrate.parallel.context import apply_cp, bind_sequence_positions, shard_sequence
from orchestrate.parallel.model_parts import ModelParts
from orchestrate.parallel.pipeline import Pipeline, build_pipeline
from orchestrate.parallel.tensor import apply_tp, loss_context, tp_loss
from orchestrate.parallel.sync import SyncStrategy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class WholeModelRunner:
    """All layers on this rank, maybe sharded over tp (DTensor) and holding a part of each sequence (cp); the
    sync strategy may wrap it (DDP, FSDP). The loss is computed on vocabulary-sharded logits under tp."""

    def __init__(self, model: nn.Module, parts: ModelParts, sync: SyncStrategy, cp_rank: int = 0, cp: int = 1,
                 reports_loss: bool = True):
        self.model = model
        self.module = sync.wrap_model(model, parts.blocks_of(model))
        self.cp_rank, self.cp = cp_rank, cp
        self.reports_loss = reports_loss
        self.pp_group = None

    def step_timing(self) -> dict[str, float]:
        return {}

    def _logits(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cp == 1:
            return self.module(inputs), targets
        inputs, targets, positions = shard_sequence(inputs, targets, self.cp_rank, self.cp)
        return self.module(inputs, positions), targets

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        logits, targets = self._logits(inputs, targets)
        with loss_context(logits):
            loss = tp_loss(logits, targets)
            loss.backward()
        return loss.detach() if self.reports_loss else None

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        logits, targets = self._logits(inputs, targets)
        with loss_context(logits):
            loss = tp_loss(logits, targets)
        return loss if self.reports_loss else None


class PipelineRunner:
    """This rank's pipeline stages; gradients of the stages are averaged over the replica group by ``sync``.

    Stages may be tensor-parallel (each tp rank runs its own copy of the schedule over its pp group, sending its
    part of the hidden states) and context-parallel (each cp rank feeds its part of every sequence). With
    vocabulary-sharded logits the whole schedule runs inside ``loss_parallel``: torch computes each microbatch's
    loss and its backward inside the schedule, so the context must span both."""

    def __init__(self, pipeline: Pipeline, parts: ModelParts, sync: SyncStrategy, pp_group,
                 vocab_sharded: bool = False, cp_rank: int = 0, cp: int = 1, reports_loss: bool = True):
        self.pipeline = pipeline
        merged = merge_stages(pipeline.stage_modules, parts)
        sync.wrap_model(merged, parts.blocks_of(merged))
        self.reports_loss = pipeline.is_last_stage and reports_loss
        self.pp_group = pp_group
        self.loss_context = loss_parallel if vocab_sharded else contextlib.nullcontext
        self.cp_rank, self.cp = cp_rank, cp

    def _local(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cp == 1:
            return inputs, targets
        inputs, targets, _ = shard_sequence(inputs, targets, self.cp_rank, self.cp)
        return inputs, targets

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.pipeline.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.pipeline.parameters()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        with self.loss_context():
            loss = self.pipeline.step(*self._local(inputs, targets))
        return loss if self.reports_loss else None

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        with self.loss_context():
            loss = self.pipeline.evaluate(*self._local(inputs, targets))
        return loss if self.reports_loss else None

    def step_timing(self) -> dict[str, float]:
        """This rank's split of the last pipeline step: time in its stages' compute vs waiting for neighbours."""
        timing = self.pipeline.last_step_timing
        return {"pp_compute_s": timing.compute_s, "pp_wait_s": timing.wait_s}


def merge_stages(stage_modules: list[nn.Module], parts: ModelParts) -> nn.Module:
    """One module over this rank's stages whose parameter names are the global ones (``layers.5.*``), for sync
    strategies that key their state by parameter name. It shares the stages' parameters; it is never run."""
    merged = nn.Module()
    blocks = nn.ModuleDict()
    setattr(merged, parts.blocks, blocks)
    for stage in stage_modules:
        for name in (*parts.first, *parts.last):
            if getattr(stage, name, None) is not None:
                setattr(merged, name, getattr(stage, name))
        blocks.update(parts.blocks_of(stage))
    return merged


def build_runner(cfg: Config, mesh: DeviceMesh, coords: dict[str, int], model: nn.Module, parts: ModelParts,
                 sync: SyncStrategy, loss_fn: LossFn):
    """Apply tp and cp to the model (in place), or cut it into pipeline stages; the sync strategy wraps last.
    ``parts``: how the parallel mechanisms apply to this model (its family's ``PARTS``).

    The loss is reported by tp rank 0 of every (dp, cp) replica part; the controller averages them."""
    p = cfg.parallel
    if p.pp == 1:
        apply_tp(model, parts, mesh["tp"], p.sequence_parallel, p.loss_parallel)
        apply_cp(model, parts, mesh["cp"], p.cp_impl)
        return WholeModelRunner(model, parts, sync, coords["cp"], p.cp, reports_loss=coords["tp"] == 0)

    def parallelize_stage(stage: nn.Module) -> nn.Module:
        apply_tp(stage, parts, mesh["tp"], p.sequence_parallel, p.loss_parallel)
        bind_sequence_positions(stage, cfg.train.seq_len, coords["cp"], p.cp)
        return apply_cp(stage, parts, mesh["cp"], p.cp_impl)

    per_replica_batch = cfg.train.global_batch_size // p.dp
    local_seq = cfg.train.seq_len // p.cp
    # Stages exchange the hidden states each rank holds: with sequence parallelism, its sequence shard.
    boundary_seq = local_seq // p.tp if p.sequence_parallel else local_seq
    pipeline = build_pipeline(
        model, parts, mesh["pp"], p.pp_schedule, p.microbatches, (per_replica_batch // p.microbatches, local_seq),
        tp_loss if p.tp > 1 else loss_fn, virtual_stages=p.pp_virtual_stages,
        split=list(p.pp_split) if p.pp_split else None, parallelize_stage=parallelize_stage,
        boundary_seq_len=boundary_seq)
    return PipelineRunner(pipeline, parts, sync, mesh["pp"].get_group(), vocab_sharded=p.tp > 1 and p.loss_parallel,
                          cp_rank=coords["cp"], cp=p.cp, reports_loss=coords["tp"] == 0)
