"""Streaming DiLoCo (arXiv 2501.18512): DiLoCo one fragment at a time.

The model is split into P fragments (groups of transformer blocks, strided: block l -> fragment l mod P_blocks;
the non-block parameters form one more fragment). Fragment p syncs once every H steps at offset p*H/P, so the
burst is ~1/P of DiLoCo's. Its pseudo-gradient's mean is launched asynchronously ("send") and applied tau steps
later: the fragment's outer optimizer steps phi_p, and the live fragment becomes alpha*theta + (1-alpha)*phi_p,
keeping a fraction alpha of the tau local steps taken meanwhile (tau = 0: theta <- phi_p, as in DiLoCo). Delta
travels as E3M0 (4-bit) by default, accumulated in fp32 (parallel/quantize.py, ``ReplicaMean``).

The schedule depends only on the trainer's step (identical on all replicas), so all replicas always sync the same
fragment. At most one fragment is in flight (tau < H // P; unlike torchft, H need not be a multiple of P).
An in-flight sync is checkpointed as this rank's un-reduced Delta and relaunched after a restore.
Trainer contract as DiLoCo (diloco.py): no gradient averaging, default inner optimizer, step counts from 0.
Evaluate and export ``outer_parameters()`` (phi, mixed-age fragments), which beat the live replica params.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from orchestrate.parallel import comm
from orchestrate.parallel.sync.diloco import DiLoCoConfig, DiLoCoSync, Fragment, ReplicaMean, finish_fragment_sync
from orchestrate.parallel.sync.tensors import trainable_parameters

@dataclass(frozen=True)
class StreamingDiLoCoConfig(DiLoCoConfig):
    sync_every: int = 100  # H: every fragment syncs once per H steps
    outer_lr: float = 0.4
    quantization: str = "e3m0"
    layers_per_fragment: int = 3  # <= 0: the whole model is one fragment
    strided: bool = True  # block l -> fragment l mod P_blocks (else consecutive blocks)
    overlap_steps: int = 1  # tau: inner steps between launching a fragment's sync and applying it
    merge_alpha: float = 0.0  # alpha: share of the tau local steps kept when merging

    def __post_init__(self):
        super().__post_init__()
        if self.overlap_steps < 0:
            raise ValueError(f"overlap_steps={self.overlap_steps}: must be >= 0")
        if not 0.0 <= self.merge_alpha <= 1.0:
            raise ValueError(f"merge_alpha={self.merge_alpha}: must be in [0, 1]")

    def check_fragments(self, num_fragments: int) -> None:
        """ValueError naming the key when ``num_fragments`` fragments cannot be scheduled."""
        spacing = FragmentSchedule(self.sync_every, num_fragments).spacing
        if self.overlap_steps >= spacing:
            raise ValueError(f"overlap_steps={self.overlap_steps}: must be < sync_every // fragments = "
                             f"{self.sync_every}//{num_fragments} (one fragment in flight at a time)")

    def check_blocks(self, blocks: int) -> None:
        """The check for a rank holding ``blocks`` blocks (and parameters outside them): before a run starts."""
        self.check_fragments(1 if self.layers_per_fragment <= 0 else -(-blocks // self.layers_per_fragment) + 1)


def assign_fragments(block_of: list[Optional[int]], layers_per_fragment: int, strided: bool) -> list[list[int]]:
    """Indices into ``block_of`` (each parameter's block, None outside the blocks) per fragment: block fragments
    in order, then the non-block parameters. P_blocks = ceil(blocks held / layers_per_fragment)."""
    if layers_per_fragment <= 0:
        return [list(range(len(block_of)))]
    # Ordinals among the blocks this rank holds: a pipeline stage fragments its own blocks.
    ordinal = {block: i for i, block in enumerate(sorted({block for block in block_of if block is not None}))}
    num_block_fragments = -(-len(ordinal) // layers_per_fragment)
    fragments: list[list[int]] = [[] for _ in range(num_block_fragments + 1)]
    for position, block in enumerate(block_of):
        if block is None:
            fragments[-1].append(position)
        else:
            index = ordinal[block]
            fragments[index % num_block_fragments if strided else index // layers_per_fragment].append(position)
    return [fragment for fragment in fragments if fragment]


def block_of_parameters(named: list[tuple[str, nn.Parameter]],
                        blocks: Optional[Mapping[str, nn.Module]]) -> list[Optional[int]]:
    """The global index of the block holding each parameter (None: outside the blocks)."""
    index_of = {id(param): int(key) for key, block in (blocks or {}).items() for param in block.parameters()}
    return [index_of.get(id(param)) for _, param in named]


@dataclass(frozen=True)
class FragmentSchedule:
    """Fragment p is sent after step s (counted from 0) when (s + 1) % H == floor(p * H / P): evenly spaced
    offsets, at least floor(H / P) steps apart (also across the window boundary)."""

    sync_every: int
    num_fragments: int

    def __post_init__(self):
        if self.sync_every < self.num_fragments:
            raise ValueError(f"sync_every={self.sync_every}: must be >= the {self.num_fragments} fragments (blocks / "
                             f"layers_per_fragment, and one for the parameters outside the blocks)")

    @property
    def spacing(self) -> int:
        return self.sync_every // self.num_fragments

    def offset(self, fragment: int) -> int:
        return fragment * self.sync_every // self.num_fragments

    def fragment_to_send(self, step: int) -> Optional[int]:
        phase = (step + 1) % self.sync_every
        fragment = -(-phase * self.num_fragments // self.sync_every)  # the only p with offset(p) >= phase
        return fragment if fragment < self.num_fragments and self.offset(fragment) == phase else None


class StreamingDiLoCoSync(DiLoCoSync):
    name = "streaming_diloco"
    state_prefix = "streaming_diloco"

    def evaluation_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The outer parameters: fragments are synced at different steps, so the live weights never all match
        the replicas' common ones."""
        return {**dict(model.named_parameters()), **self.outer_parameters()}

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None,
                 config: Optional[StreamingDiLoCoConfig] = None):
        super().__init__(replica_group, counter, config or StreamingDiLoCoConfig())
        self._pending: Optional[ReplicaMean] = None
        # Checkpointed in-flight sync: fragment index (-1: none), step it was sent after, this rank's Delta.
        self._inflight_fragment = torch.tensor(-1, dtype=torch.int64)
        self._inflight_step = torch.tensor(-1, dtype=torch.int64)
        self._inflight_delta = torch.zeros(0)

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        self.model = model
        cfg = self.config
        named = trainable_parameters(model)
        groups = assign_fragments(block_of_parameters(named, blocks), cfg.layers_per_fragment, cfg.strided)
        self.fragments = [Fragment([named[i] for i in group], cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
                          for group in groups]
        cfg.check_fragments(len(self.fragments))
        self.schedule = FragmentSchedule(cfg.sync_every, len(self.fragments))
        largest = max(fragment.numel for fragment in self.fragments)
        self._inflight_delta = torch.zeros(largest, dtype=self.fragments[0].global_params.dtype)
        self.warmup.wrap_model(model, blocks)
        return model

    @property
    def inflight_fragment(self) -> Optional[int]:
        index = int(self._inflight_fragment)
        return None if index < 0 else index

    def after_optimizer(self, step: int) -> None:
        if self.warmup_step(step):
            return
        step -= self.config.ddp_warmup_steps  # the fragment schedule starts after the warm-up
        self._relaunch_restored_sync()
        to_send = self.schedule.fragment_to_send(step)
        if to_send is not None:
            self._send(to_send, step)
        if self.inflight_fragment is not None:
            waited = step - int(self._inflight_step)
            if waited >= self.config.overlap_steps:
                self._apply()
            elif waited > 0:
                self._pending.advance()

    def _send(self, index: int, step: int) -> None:
        if self.inflight_fragment is not None:
            raise RuntimeError(f"fragment {index} sent while fragment {self.inflight_fragment} is in flight")
        fragment = self.fragments[index]
        delta = fragment.pseudo_gradient()
        self._inflight_delta[: fragment.numel].copy_(delta)  # before the collective consumes delta
        self._pending = ReplicaMean(delta, self.replica_group, self.counter, self.quantizer)
        self._inflight_fragment.fill_(index)
        self._inflight_step.fill_(step)

    def _apply(self) -> None:
        alpha = None if self.config.overlap_steps == 0 else self.config.merge_alpha
        finish_fragment_sync(self.fragments[self.inflight_fragment], self._pending, alpha)
        self._pending = None
        self._inflight_fragment.fill_(-1)
        self.counter.end_event()

    def _relaunch_restored_sync(self) -> None:
        index = self.inflight_fragment
        if index is not None and self._pending is None:
            delta = self._inflight_delta[: self.fragments[index].numel].clone()
            self._pending = ReplicaMean(delta, self.replica_group, self.counter, self.quantizer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state[f"{self.state_prefix}.inflight.fragment"] = self._inflight_fragment
        state[f"{self.state_prefix}.inflight.sent_step"] = self._inflight_step
        state[f"{self.state_prefix}.inflight.delta"] = self._inflight_delta
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self._pending is not None:  # a sync of the state being replaced is still on the wire: let it land
            self._pending.result()
            self._pending = None
            self.counter.end_event()
        prefix = f"{self.state_prefix}.inflight"
        if f"{prefix}.fragment" in state:
            self._inflight_fragment.copy_(state[f"{prefix}.fragment"])
            self._inflight_step.copy_(state[f"{prefix}.sent_step"])
            self._inflight_delta.copy_(state[f"{prefix}.delta"])
        else:
            self._inflight_fragment.fill_(-1)
