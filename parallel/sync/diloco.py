"""DiLoCo (arXiv 2311.08105): local inner steps, an outer step every H.

Every replica trains alone for H inner steps with the default (inner) optimizer. Then it takes the
pseudo-gradient against the global copy, Delta_i = phi - theta_i (old minus new), averages it over the replica
group (the only communication), lets the outer Nesterov SGD step phi with it, and copies phi into its live params.
The inner optimizer state is never synced.

This module also holds what Streaming DiLoCo builds on: ``Fragment`` (a FlatParams, tensors.py, with its global
copy and outer optimizer) and ``ReplicaMean`` (an asynchronous, optionally quantised mean over the replica group).

Step numbering: ``after_optimizer(step)`` receives the index of the optimizer step just taken, counting from 0;
an outer step follows optimizer step ``step`` when ``(step + 1) % sync_every == 0``. With ``ddp_warmup_steps`` W
the first W steps average gradients over the replicas (DDP), phi restarts from the common parameters after step
W - 1, and the outer loop counts its steps from W (Streaming DiLoCo's fragment schedule too).
The trainer must not average gradients (no DDP): ``wrap_model`` returns the model unchanged. All replicas must
start from identical parameters (same seed or a loaded checkpoint).

SparseLoCo (arXiv 2508.15706, ``compression="sparseloco"``): each replica keeps an error-feedback buffer in place of
the outer momentum, e <- beta * e + Delta, sends s = Q(TopK_chunk(e)) and keeps e <- e - s; every replica
all-gathers every s (wire format: parallel/sync/sparse.py), sums them decoded in rank order and divides by R, and
phi takes a plain SGD step with ``outer_lr`` (no momentum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from orchestrate.parallel import comm
from orchestrate.parallel.quantize import QUANTIZATIONS, BlockQuantizer, Packed, build_quantizer, pad_to, round_up
from orchestrate.parallel.sync.base import SyncStrategy
from orchestrate.parallel.sync.ddp import DDPSync
from orchestrate.parallel.sync.sparse import SPARSE_BITS, SparseCodec
from orchestrate.parallel.sync.tensors import FlatParams, copy_named_state, trainable_parameters

COMPRESSIONS = ("none", "sparseloco")


@dataclass(frozen=True)
class DiLoCoConfig:
    """With ``compression="sparseloco"`` the error buffer replaces the outer momentum: ``outer_momentum`` and
    ``nesterov`` are ignored and the outer step is SGD with ``outer_lr`` alone (the reference uses 1.0)."""

    sync_every: int = 500  # H, inner steps per outer step
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    quantization: str = "none"  # wire format of Delta: none (fp32), int8 or e3m0 (parallel/quantize.py)
    quant_block: int = 128  # values per quantisation scale
    compression: str = "none"  # none, or sparseloco: top-k of an error-feedback buffer (parallel/sync/sparse.py)
    sparse_density: float = 0.03125  # k / C, the share of each chunk sent (the reference: top 128 of 64x64)
    sparse_chunk: int = 4096  # C, consecutive values per top-k chunk
    sparse_bits: int = 2  # per sent value: 2, or 32 for full precision (the outer dtype: fp32, fp64 stays fp64)
    error_decay: float = 0.95  # beta, the error buffer's decay
    # optimizer steps that first train as DDP (gradients averaged over replicas every step); the outer loop then
    # starts from their common parameters, as the DiLoCo papers start from a model trained with data parallelism
    ddp_warmup_steps: int = 0

    def __post_init__(self):
        if self.sync_every < 1:
            raise ValueError(f"sync_every={self.sync_every}: must be >= 1")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization}: valid: {', '.join(QUANTIZATIONS)}")
        if self.ddp_warmup_steps < 0:
            raise ValueError(f"ddp_warmup_steps={self.ddp_warmup_steps}: must be >= 0")
        self._check_compression()

    def _check_compression(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression={self.compression}: valid: {', '.join(COMPRESSIONS)}")
        if not 0.0 < self.sparse_density <= 1.0:
            raise ValueError(f"sparse_density={self.sparse_density}: valid: (0, 1]")
        if self.sparse_chunk < 1:
            raise ValueError(f"sparse_chunk={self.sparse_chunk}: must be >= 1")
        if self.sparse_bits not in SPARSE_BITS:
            raise ValueError(f"sparse_bits={self.sparse_bits}: valid: {', '.join(map(str, SPARSE_BITS))}")
        if not 0.0 <= self.error_decay <= 1.0:
            raise ValueError(f"error_decay={self.error_decay}: valid: [0, 1]")
        if self.compression == "none":
            return
        if type(self) is not DiLoCoConfig:  # subclasses (Streaming DiLoCo) run their own sync loop
            raise ValueError(f"compression={self.compression}: only sync.diloco supports it; valid here: none")
        if self.quantization != "none":
            raise ValueError(f"quantization={self.quantization}: must be none with compression={self.compression} "
                             f"(sparse_bits sets its wire format)")


class Fragment:
    """A group of parameters with its own global copy phi and outer optimizer (docs/lowcomm.md sections 1.1, 2.1)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], outer_lr: float, momentum: float, nesterov: bool):
        self.flat = FlatParams(named)
        self.global_params = self.flat.flatten()
        self.outer = torch.optim.SGD([self.global_params], lr=outer_lr, momentum=momentum, nesterov=nesterov,
                                     foreach=False)
        if momentum:
            # Allocated up front so the state dict has stable entries; a zero buffer gives exactly torch's first step.
            self.outer.state[self.global_params]["momentum_buffer"] = torch.zeros_like(self.global_params)

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def momentum(self) -> Optional[torch.Tensor]:
        return self.outer.state[self.global_params].get("momentum_buffer")

    def pseudo_gradient(self) -> torch.Tensor:
        """Delta = phi - theta (old minus new), a fresh tensor."""
        return self.global_params - self.flat.flatten()

    @torch.no_grad()
    def outer_step(self, mean_delta: torch.Tensor) -> None:
        self.global_params.grad = mean_delta
        self.outer.step()
        self.global_params.grad = None

    @torch.no_grad()
    def restart(self) -> None:
        """phi <- theta and a zero outer momentum: the outer loop starts afresh from the live parameters."""
        self.global_params.copy_(self.flat.flatten())
        if self.momentum is not None:
            self.momentum.zero_()

    @torch.no_grad()
    def merge(self, alpha: Optional[float]) -> None:
        """theta <- phi (alpha None) or theta <- alpha * theta + (1 - alpha) * phi (exact at alpha 0 and 1)."""
        if alpha is None:
            self.flat.write(self.global_params)
        elif alpha != 1.0:
            self.flat.write(torch.lerp(self.global_params, self.flat.flatten(), alpha))

    def state_views(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}.global.{n}": v for n, v in self.flat.views(self.global_params).items()}
        if self.momentum is not None:
            state.update({f"{prefix}.outer_momentum.{n}": v for n, v in self.flat.views(self.momentum).items()})
        return state


def fragments_state_dict(prefix: str, fragments: list[Fragment]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for fragment in fragments:
        state.update(fragment.state_views(prefix))
    return state


@torch.no_grad()
def load_fragments_state(prefix: str, fragments: list[Fragment], state: dict[str, torch.Tensor]) -> None:
    """Copy saved phi and outer momenta in; without any ``prefix.*`` entry, restart the outer loop from the live
    parameters."""
    if copy_named_state(fragments_state_dict(prefix, fragments), state):
        return
    for fragment in fragments:
        fragment.restart()


class ReplicaMean:
    """Mean of a flat tensor over the replica group, started at construction and finished by ``result()``.

    Full precision: one asynchronous all-reduce. Quantised (torchft's scheme, docs/lowcomm.md section 2.2): each
    replica quantises its own Delta; an all-to-all hands chunk k of every replica to rank k, which dequantises and
    sums them in fp32 in rank order, re-quantises the mean chunk, and an all-gather returns all chunks to everyone.
    Every rank then decodes the same bytes, so results are bitwise identical across ranks. ``advance()`` runs the
    middle part and launches the all-gather, so a caller with spare steps can overlap both phases. The input is
    consumed. A group of one rank sends nothing and quantises nothing.
    """

    def __init__(self, local: torch.Tensor, group, counter: comm.CommCounter,
                 quantizer: Optional[BlockQuantizer] = None):
        self.group, self.counter, self.quantizer = group, counter, quantizer
        self.world = comm.group_size(group)
        self.numel, self.dtype = local.numel(), local.dtype
        self._value: Optional[torch.Tensor] = None
        self._gather = None
        if self.world == 1:
            self._value = local
        elif quantizer is None:
            self._buffer = local.contiguous()
            self._works = [comm.all_reduce(self._buffer, group, counter, async_op=True)]
        else:
            self._start_quantised(local)

    def _start_quantised(self, local: torch.Tensor) -> None:
        self.chunk = round_up(-(-self.numel // self.world), self.quantizer.block)
        packed = self.quantizer.encode(pad_to(local, self.chunk * self.world))
        self._sending = packed  # alive until the asynchronous collective completes
        self._received = Packed(torch.empty_like(packed.payload), torch.empty_like(packed.scales))
        self._works = [comm.all_to_all(self._received.payload, packed.payload, self.group, self.counter, True),
                       comm.all_to_all(self._received.scales, packed.scales, self.group, self.counter, True)]

    def advance(self) -> None:
        if self.quantizer is None or self._value is not None or self._gather is not None:
            return
        for work in self._works:
            work.wait()
        payloads = self._received.payload.chunk(self.world)
        scales = self._received.scales.chunk(self.world)
        chunk_sum = torch.zeros(self.chunk, dtype=torch.float32)
        for payload, scale in zip(payloads, scales):  # rank order: the same sum on every rank
            chunk_sum += self.quantizer.decode(Packed(payload, scale))
        mine = self.quantizer.encode(chunk_sum / self.world)
        self._sending = mine
        self._gather = Packed(mine.payload.new_empty(mine.payload.numel() * self.world),
                              mine.scales.new_empty(mine.scales.numel() * self.world))
        self._works = [comm.all_gather_into(self._gather.payload, mine.payload, self.group, self.counter, True),
                       comm.all_gather_into(self._gather.scales, mine.scales, self.group, self.counter, True)]

    def result(self) -> torch.Tensor:
        if self._value is None:
            self.advance()
            for work in self._works:
                work.wait()
            if self.quantizer is None:
                self._value = self._buffer.div_(self.world)
            else:
                self._value = self.quantizer.decode(self._gather)[: self.numel].to(self.dtype)
        return self._value


def finish_fragment_sync(fragment: Fragment, pending: ReplicaMean, alpha: Optional[float]) -> None:
    """Outer step with the averaged pseudo-gradient, then merge phi into the live parameters."""
    fragment.outer_step(pending.result())
    fragment.merge(alpha)


class ErrorFeedback:
    """SparseLoCo's per-replica accumulator of one fragment: e <- beta * e + Delta; send s = Q(TopK_chunk(e));
    keep e <- e - s. What is not sent (dropped or lost to quantisation) stays in e for later outer steps."""

    def __init__(self, numel: int, dtype: torch.dtype, config: DiLoCoConfig):
        self.error = torch.zeros(numel, dtype=dtype)
        self.decay = config.error_decay
        self.codec = SparseCodec.build(numel, config.sparse_density, config.sparse_chunk, config.sparse_bits, dtype)

    @torch.no_grad()
    def compress(self, delta: torch.Tensor) -> torch.Tensor:
        """This replica's message for the outer step with pseudo-gradient ``delta``."""
        self.error.mul_(self.decay).add_(delta)
        message = self.codec.encode(self.error)
        self.error.sub_(self.codec.decode(message))  # s exactly as every replica decodes it
        return message


def sparse_replica_mean(message: torch.Tensor, codec: SparseCodec, group, counter: comm.CommCounter) -> torch.Tensor:
    """(1/R) * the sum of every replica's decoded message, added in rank order so that every rank computes the same
    bits. One all-gather of the equal-sized messages; a group of one rank sends nothing."""
    world = comm.group_size(group)
    received = [message]
    if world > 1:
        gathered = message.new_empty(message.numel() * world)
        comm.all_gather_into(gathered, message, group, counter)
        received = list(gathered.chunk(world))
    total = torch.zeros(codec.numel, dtype=codec.dtype)
    for replica_message in received:
        total += codec.decode(replica_message)
    return total.div_(world)


class DiLoCoSync(SyncStrategy):
    replicas_diverge = True
    name = "diloco"
    state_prefix = "diloco"

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None,
                 config: Optional[DiLoCoConfig] = None):
        super().__init__(replica_group, counter)
        self.config = config or DiLoCoConfig()
        self.quantizer = build_quantizer(self.config.quantization, self.config.quant_block)
        self.fragments: list[Fragment] = []
        self.error_feedback: list[ErrorFeedback] = []  # one per fragment with compression=sparseloco, else empty
        self.warmup = DDPSync(replica_group, self.counter, use_torch_ddp=False)  # the first ddp_warmup_steps

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        self.model = model
        cfg = self.config
        sparse = cfg.compression == "sparseloco"
        momentum, nesterov = (0.0, False) if sparse else (cfg.outer_momentum, cfg.nesterov)
        self.fragments = [Fragment(trainable_parameters(model), cfg.outer_lr, momentum, nesterov)]
        if sparse:
            self.error_feedback = [ErrorFeedback(f.numel, f.global_params.dtype, cfg) for f in self.fragments]
        self.warmup.wrap_model(model, blocks)
        return model

    def before_optimizer(self, step: int) -> None:
        if step < self.config.ddp_warmup_steps:
            self.warmup.before_optimizer(step)

    def warmup_step(self, step: int) -> bool:
        """Whether ``step`` belongs to the DDP warm-up; after its last step phi restarts from the replicas' common
        parameters."""
        warmup = self.config.ddp_warmup_steps
        if step == warmup - 1:
            for fragment in self.fragments:
                fragment.restart()
        return step < warmup

    def after_optimizer(self, step: int) -> None:
        if self.warmup_step(step) or (step + 1 - self.config.ddp_warmup_steps) % self.config.sync_every:
            return
        for index, fragment in enumerate(self.fragments):
            if self.error_feedback:
                feedback = self.error_feedback[index]
                message = feedback.compress(fragment.pseudo_gradient())
                fragment.outer_step(sparse_replica_mean(message, feedback.codec, self.replica_group, self.counter))
                fragment.merge(None)
            else:
                pending = ReplicaMean(fragment.pseudo_gradient(), self.replica_group, self.counter, self.quantizer)
                finish_fragment_sync(fragment, pending, alpha=None)
        self.counter.end_event()

    def outer_parameters(self) -> dict[str, torch.Tensor]:
        """name -> phi shaped like the local shard: the parameters to evaluate and export."""
        views: dict[str, torch.Tensor] = {}
        for fragment in self.fragments:
            views.update(fragment.flat.views(fragment.global_params))
        return views

    def error_views(self) -> dict[str, torch.Tensor]:
        """``<prefix>.error.<name>`` -> this replica's error buffer shaped like the local shard (sparseloco)."""
        views: dict[str, torch.Tensor] = {}
        for fragment, feedback in zip(self.fragments, self.error_feedback):
            views.update({f"{self.state_prefix}.error.{n}": v for n, v in fragment.flat.views(feedback.error).items()})
        return views

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = fragments_state_dict(self.state_prefix, self.fragments)
        state.update(self.error_views())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Without saved error buffers (another compression, or a fresh outer loop) they restart at zero."""
        load_fragments_state(self.state_prefix, self.fragments, state)
        if not copy_named_state(self.error_views(), state):
            for feedback in self.error_feedback:
                feedback.error.zero_()
