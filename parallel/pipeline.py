"""Pipeline parallelism: split a model into stages by counted cost and run them with torch's schedules.

The model says which parts are blocks and which only the first or last stage keeps (``ModelParts``, from its
folder under orchestrate.models).

Built on ``torch.distributed.pipelining`` (PipelineStage + schedules). What this module adds:

- cost-balanced cut points that count the embedding and the output head (a large vocabulary makes the first and
  last stage heavy), or explicit cuts from ``parallel.pp_split``;
- stage modules that keep global parameter names (``layers.5.attention.wq.weight`` on every layout);
- static input/output shapes for every stage, so no object collective (they need numpy) is needed;
- config validation with one-line errors naming the key and the valid values;
- a per-step compute/wait time split and the peak number of microbatches whose activations a stage holds.

Loss = mean of the microbatch losses with ``scale_grads=True``, so loss and gradients equal a full-batch run.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from orchestrate.parallel.model_parts import ModelParts

PIPELINE_SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
# One stage per rank; stage ids rank + k*pp for k < virtual_stages; stages [rank, 2*pp-1-rank].
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
LOOPED_SCHEDULES = ("interleaved_1f1b", "looped_bfs", "interleaved_zb")
V_SCHEDULES = ("zbv", "dualpipev")


# ---------------------------------------------------------------------------------------------------- validation

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _microbatch_rule(schedule: str, n_stages: int, pp: int) -> tuple[Callable[[int], bool], str]:
    """The microbatch counts torch's schedule constructor accepts (mirrors its checks), and why."""
    if schedule == "1f1b":
        return (lambda m: m >= pp), f"needs at least parallel.pp={pp} microbatches"
    if schedule == "dualpipev":
        return (lambda m: m >= n_stages), f"needs at least 2*parallel.pp={n_stages} microbatches"
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        return ((lambda m: m % max(1, m // pp) == 0),
                f"needs microbatches to be a multiple of its rounds max(1, microbatches // parallel.pp={pp})")
    return (lambda m: True), ""


def validate_virtual_stages(schedule: str, virtual_stages: int) -> None:
    if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ValueError(f"parallel.virtual_stages={virtual_stages}: parallel.pp_schedule={schedule} runs one "
                         f"stage per rank (valid: 1; looped schedules: {', '.join(LOOPED_SCHEDULES)})")
    if schedule in LOOPED_SCHEDULES and virtual_stages < 2:
        raise ValueError(f"parallel.virtual_stages={virtual_stages}: parallel.pp_schedule={schedule} loops over "
                         f"several stages per rank (valid: 2 or more)")
    if schedule in V_SCHEDULES and virtual_stages != 2:
        raise ValueError(f"parallel.virtual_stages={virtual_stages}: parallel.pp_schedule={schedule} places "
                         f"exactly 2 stages per rank in a V (valid: 2)")


def validate_pp(n_layers: int, pp: int, schedule: str, microbatches: int, virtual_stages: int,
                global_batch_per_replica: int) -> None:
    """Raise a one-line ValueError naming the config key and the valid values for a layout that cannot run."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule}: unknown (valid: {', '.join(PIPELINE_SCHEDULES)})")
    if pp < 1:
        raise ValueError(f"parallel.pp={pp}: must be a positive integer")
    if pp == 1:
        return
    validate_virtual_stages(schedule, virtual_stages)
    n_stages = pp * virtual_stages
    if n_stages > n_layers:
        detail = f"parallel.pp*virtual_stages={n_stages}" if virtual_stages > 1 else f"parallel.pp={pp}"
        raise ValueError(f"{detail}: more stages than model.n_layers={n_layers} "
                         f"(each stage needs at least one layer)")
    batch_divisors = _divisors(global_batch_per_replica)
    if microbatches not in batch_divisors:
        raise ValueError(f"parallel.microbatches={microbatches}: must divide the per-replica batch "
                         f"{global_batch_per_replica} (valid: {', '.join(map(str, batch_divisors))})")
    accepts, requirement = _microbatch_rule(schedule, n_stages, pp)
    if not accepts(microbatches):
        valid = ", ".join(str(m) for m in batch_divisors if accepts(m)) or "none; raise the per-replica batch"
        raise ValueError(f"parallel.microbatches={microbatches}: parallel.pp_schedule={schedule} {requirement} "
                         f"(valid: {valid})")


# ------------------------------------------------------------------------------------------------ stage splitting

def build_stage_costs(model: nn.Module, parts: ModelParts) -> tuple[int, list[int], int]:
    """(first-stage parts, per-block, last-stage parts) parameter counts (a meta-device model will do).

    Parameters measure a stage: they set the memory of weights, gradients and optimizer state, and every dense
    part except the embedding lookup costs 2 FLOPs per parameter per token.
    """
    def count(module: Optional[nn.Module]) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    layers = [count(layer) for layer in parts.blocks_of(model).values()]
    return (sum(count(getattr(model, name)) for name in parts.first), layers,
            sum(count(getattr(model, name)) for name in parts.last))


def _min_partition(segment_cost: Callable[[int, int, int], float], n_layers: int, n_stages: int,
                   combine: Callable[[float, float], float], cap: float = math.inf) -> tuple[float, list[int]]:
    """Contiguous partition of layers into n_stages (each non-empty) minimising combine-folded segment costs.

    ``combine(prefix_value, segment_cost)`` must be non-decreasing in prefix_value (max, or a sum of squares), so
    dynamic programming over (stages used, layers covered) is exact. Segments costlier than ``cap`` are excluded.
    """
    best = [[math.inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    start_of = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for stage in range(1, n_stages + 1):
        for end in range(stage, n_layers - (n_stages - stage) + 1):
            for begin in range(stage - 1, end):
                cost = segment_cost(stage - 1, begin, end)
                if best[stage - 1][begin] == math.inf or cost > cap:
                    continue
                value = combine(best[stage - 1][begin], cost)
                if value < best[stage][end]:
                    best[stage][end], start_of[stage][end] = value, begin
    cuts, end = [], n_layers
    for stage in range(n_stages, 1, -1):
        end = start_of[stage][end]
        cuts.append(end)
    return best[n_stages][n_layers], cuts[::-1]


def _balanced_cuts(embedding: int, layers: list[int], head: int, n_stages: int) -> list[int]:
    prefix = [0]
    for cost in layers:
        prefix.append(prefix[-1] + cost)

    def segment_cost(stage: int, begin: int, end: int) -> float:
        extra = (embedding if stage == 0 else 0) + (head if stage == n_stages - 1 else 0)
        return prefix[end] - prefix[begin] + extra

    # The slowest stage sets the pace; among partitions that reach it, spread the rest as evenly as possible.
    bottleneck, _ = _min_partition(segment_cost, len(layers), n_stages, max)
    _, cuts = _min_partition(segment_cost, len(layers), n_stages, lambda acc, cost: acc + cost * cost,
                             cap=bottleneck)
    return cuts


def _validate_explicit_cuts(cuts: Sequence[int], n_layers: int, n_stages: int) -> list[int]:
    cuts = list(cuts)
    increasing = all(a < b for a, b in zip([0, *cuts], [*cuts, n_layers]))
    if len(cuts) != n_stages - 1 or not increasing:
        raise ValueError(f"parallel.pp_split={cuts}: needs {n_stages - 1} strictly increasing layer indices in "
                         f"1..{n_layers - 1} (the first layer of stages 1..{n_stages - 1})")
    return cuts


def split_points(model: nn.Module, parts: ModelParts, n_stages: int,
                 explicit: Optional[Sequence[int]] = None) -> list[int]:
    """First global layer index of each stage after stage 0 (``n_stages - 1`` increasing indices).

    ``model`` is the full model (build it on the meta device to plan without memory: ``parallel`` never imports
    the model code). ``explicit`` (``parallel.pp_split``) is validated and returned; otherwise stages are
    balanced by parameter count with the embedding charged to the first stage and the final norm + output head
    to the last.
    """
    n_layers = len(parts.blocks_of(model))
    if n_stages > n_layers:
        raise ValueError(f"parallel.pp: {n_stages} stages is more than model.n_layers={n_layers}")
    if explicit is not None:
        return _validate_explicit_cuts(explicit, n_layers, n_stages)
    embedding, layers, head = build_stage_costs(model, parts)
    return _balanced_cuts(embedding, layers, head, n_stages)


def build_stage_modules(model: nn.Module, parts: ModelParts, stage_ids: Sequence[int],
                        cuts: Sequence[int]) -> list[nn.Module]:
    """One pruned copy of ``model`` per stage id; blocks keep their global keys, unowned parts become None."""
    blocks = parts.blocks_of(model)
    n_stages = len(cuts) + 1
    bounds = [0, *cuts, len(blocks)]
    if parts.tied(model) and n_stages > 1:
        raise ValueError("model.tie_embeddings=true: not supported with parallel.pp>1 (the embedding and the "
                         "output head live on different stages)")
    stage_modules = []
    for stage_id in stage_ids:
        owned = {str(i) for i in range(bounds[stage_id], bounds[stage_id + 1])}
        unowned = [layer for key, layer in blocks.items() if key not in owned]
        if stage_id != 0:
            unowned += [getattr(model, name) for name in parts.first]
        if stage_id != n_stages - 1:
            unowned += [getattr(model, name) for name in parts.last]
        # A deepcopy memo entry maps a module to None: unowned parts are never copied (no full-model peak).
        stage = copy.deepcopy(model, memo={id(module): None for module in unowned if module is not None})
        stage_blocks = parts.blocks_of(stage)
        for key in [key for key in stage_blocks.keys() if key not in owned]:
            del stage_blocks[key]
        stage_modules.append(stage)
    return stage_modules


def build_stage_ids(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stage ids this pipeline rank runs, in the order torch's schedules expect."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


# ---------------------------------------------------------------------------------------------------- running

class InstrumentedStage(PipelineStage):
    """A PipelineStage that counts seconds of compute and the microbatches whose activations it holds.

    Compute is the time inside this stage's forward/backward (and loss, on the last stage); everything else in a
    step is waiting for a neighbour (pipeline bubble or transfer). A microbatch's activations are held from its
    forward until its full backward, or until its weight backward in zero-bubble schedules.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_s = 0.0
        self.in_flight = 0
        self.peak_in_flight = 0

    def run_timed(self, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.compute_s += time.perf_counter() - start

    def forward_one_chunk(self, *args, **kwargs):
        output = self.run_timed(super().forward_one_chunk, *args, **kwargs)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return output

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self.run_timed(super().backward_one_chunk, bwd_chunk_id, loss=loss, full_backward=full_backward,
                    last_backward=last_backward)
        if full_backward:
            self.in_flight -= 1

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self.run_timed(super().backward_weight_one_chunk, bwd_chunk_id, last_backward=last_backward)
        self.in_flight -= 1


@dataclass
class StepTiming:
    compute_s: float
    total_s: float
    peak_in_flight: list[int]  # per local stage: microbatches whose activations were held at once

    @property
    def wait_s(self) -> float:
        return max(0.0, self.total_s - self.compute_s)


@dataclass
class StageLayout:
    """Where the stages live and what crosses between them, for the forward-only evaluation pass."""

    owners: list[int]  # pipeline-group rank of every stage id
    boundary_shape: tuple[int, int, int]  # hidden states a stage sends on, for the whole per-replica batch
    dtype: torch.dtype


class Pipeline:
    """This rank's stages and the schedule that runs them. The trainer calls ``step`` on every pipeline rank."""

    def __init__(self, schedule, stages: list[InstrumentedStage], batch_shape: tuple[int, int],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], layout: StageLayout):
        self.schedule = schedule
        self.stages = stages
        self.stage_modules: list[nn.Module] = [stage.submod for stage in stages]
        self.batch_shape = batch_shape
        self.loss_fn, self.layout = loss_fn, layout
        self.is_first_stage = any(stage.is_first for stage in stages)
        self.is_last_stage = any(stage.is_last for stage in stages)
        self.last_step_timing: Optional[StepTiming] = None

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.stage_modules:
            yield from module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Global names (``layers.5.feed_forward.w1.weight``): stages hold disjoint parts of one model."""
        for module in self.stage_modules:
            yield from module.named_parameters()

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward and backward over all microbatches; gradients accumulate into the stage modules' .grad.

        Every pipeline rank passes the same full (per-replica) batch; only the first stage reads tokens and only
        the last reads targets. Returns the full-batch mean loss (detached) on the rank holding the last stage,
        else None.
        """
        self._check_batch(tokens, targets)
        for stage in self.stages:
            stage.compute_s, stage.in_flight, stage.peak_in_flight = 0.0, 0, 0
        args = (tokens,) if self.is_first_stage else ()
        losses: list[torch.Tensor] = []
        start = time.perf_counter()
        self.schedule.step(*args, target=targets if self.is_last_stage else None,
                           losses=losses if self.is_last_stage else None, return_outputs=False)
        self.last_step_timing = StepTiming(
            compute_s=sum(stage.compute_s for stage in self.stages), total_s=time.perf_counter() - start,
            peak_in_flight=[stage.peak_in_flight for stage in self.stages])
        if not self.is_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward only, the whole batch stage after stage in stage order, with blocking send/recv between ranks;
        the mean loss on the rank holding the last stage, else None.

        Not torch's ``schedule.eval``: its zero-bubble and V schedules still run their backward actions and fail
        without a backward (seen with zbv). Evaluation needs no overlap, so the plain chain is exact for every schedule."""
        self._check_batch(tokens, targets)
        group = self.stages[0].group
        me, owners = dist.get_rank(group), self.layout.owners
        by_id = {stage.stage_index: stage.submod for stage in self.stages}
        hidden = tokens
        for stage_id in sorted(by_id):
            if stage_id > 0 and owners[stage_id - 1] != me:
                hidden = torch.empty(self.layout.boundary_shape, dtype=self.layout.dtype, device=tokens.device)
                dist.recv(hidden, group=group, group_src=owners[stage_id - 1])
            hidden = by_id[stage_id](hidden)
            if stage_id == len(owners) - 1:
                return self.loss_fn(hidden, targets).detach()
            if owners[stage_id + 1] != me:
                dist.send(hidden.contiguous(), group=group, group_dst=owners[stage_id + 1])
        return None

    def _check_batch(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        if tuple(tokens.shape) != self.batch_shape or tuple(targets.shape) != self.batch_shape:
            raise ValueError(f"pipeline batch: tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} "
                             f"must both be {self.batch_shape} (static stage shapes)")


def _stage_io_examples(stage_id: int, n_stages: int, microbatch_shape: tuple[int, int], boundary_seq_len: int,
                       dim: int, vocab: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Static input/output examples. They must require grad (except token ids), else torch's static path builds
    no gradient buffers and backward fails with 'grad can be implicitly created only for scalar outputs'.

    Only the hidden states between stages are sent, as plain (local) tensors of ``boundary_seq_len`` positions.
    The last stage's logits are never sent or checked against this example, so it stays a plain tensor even when
    tensor parallelism returns vocabulary-sharded DTensor logits (a DTensor example would make torch ask for
    gradient examples too)."""
    mb, seq = microbatch_shape
    if stage_id == 0:
        inputs = torch.empty(mb, seq, dtype=torch.long, device=device)
    else:
        inputs = torch.empty(mb, boundary_seq_len, dim, dtype=dtype, device=device, requires_grad=True)
    if stage_id == n_stages - 1:
        outputs = torch.empty(mb, seq, vocab, dtype=dtype, device=device, requires_grad=True)
    else:
        outputs = torch.empty(mb, boundary_seq_len, dim, dtype=dtype, device=device, requires_grad=True)
    return inputs, outputs


def _owning(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Zero-bubble schedules detach the loss in place after the input backward, which fails on a view (a
    vocabulary-parallel loss is one: ``DTensor.full_tensor`` of a replicated scalar aliases its local tensor).
    Cloning a scalar costs nothing, so every loss gets its own storage."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets).clone()
    return loss


def build_pipeline(model: nn.Module, parts: ModelParts, pp_group, schedule_name: str, microbatches: int,
                   microbatch_shape: tuple[int, int], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   virtual_stages: int = 1, split: Optional[Sequence[int]] = None,
                   parallelize_stage: Optional[Callable[[nn.Module], nn.Module]] = None,
                   boundary_seq_len: Optional[int] = None) -> Pipeline:
    """Cut ``model`` into stages (``parts``: what the model is made of), keep this rank's, and wrap them in the
    named torch schedule.

    ``pp_group``: the pipeline process group (or a 1-d DeviceMesh such as ``mesh["pp"]``).
    ``microbatch_shape``: (sequences per microbatch, sequence length this rank feeds in); the per-replica batch
    is ``microbatches * microbatch_shape[0]`` sequences. ``loss_fn(logits, targets)`` is a mean over one
    microbatch. ``split``: explicit cut points (``parallel.pp_split``), else cost-balanced.
    ``parallelize_stage``: applied to each stage module after the split (tensor/context parallelism), in place
    or returning the module to run. ``boundary_seq_len``: positions of the hidden states a stage sends on
    (default: the microbatch sequence length; sequence parallelism sends only its sequence shard).
    """
    if isinstance(pp_group, DeviceMesh):
        pp_group = pp_group.get_group()
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    hidden, vocab = parts.widths(model)
    validate_pp(len(parts.blocks_of(model)), pp, schedule_name, microbatches, virtual_stages, microbatches * microbatch_shape[0])
    if schedule_name in V_SCHEDULES:
        virtual_stages = 2
    n_stages = pp * virtual_stages
    cuts = split_points(model, parts, n_stages, explicit=split)
    stage_ids = build_stage_ids(schedule_name, pp_rank, pp, virtual_stages)
    owners = [0] * n_stages
    for rank in range(pp):
        for stage_id in build_stage_ids(schedule_name, rank, pp, virtual_stages):
            owners[stage_id] = rank
    param = next(model.parameters())
    stages = []
    boundary_seq_len = boundary_seq_len or microbatch_shape[1]
    for stage_id, module in zip(stage_ids, build_stage_modules(model, parts, stage_ids, cuts)):
        if parallelize_stage is not None:
            module = parallelize_stage(module)
        inputs, outputs = _stage_io_examples(stage_id, n_stages, microbatch_shape, boundary_seq_len, hidden,
                                             vocab, param.dtype, param.device)
        stages.append(InstrumentedStage(module, stage_id, n_stages, param.device, input_args=inputs,
                                        output_args=outputs, group=pp_group))
    schedule_cls = PIPELINE_SCHEDULES[schedule_name]
    stage_arg = stages[0] if schedule_name in SINGLE_STAGE_SCHEDULES else stages
    # The schedule computes the loss outside the stage's forward; count it as the last stage's compute.
    last_stage = next((stage for stage in stages if stage.is_last), stages[-1])
    timed_loss_fn = functools.partial(last_stage.run_timed, _owning(loss_fn))
    schedule = schedule_cls(stage_arg, n_microbatches=microbatches, loss_fn=timed_loss_fn, scale_grads=True)
    batch = microbatches * microbatch_shape[0]
    layout = StageLayout(owners, (batch, boundary_seq_len, hidden), param.dtype)
    return Pipeline(schedule, stages, (batch, microbatch_shape[1]), loss_fn, layout)
