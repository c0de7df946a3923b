"""What the parallel mechanisms need to know of a model, supplied by the model's own folder
(``orchestrate.models.<family>``): tensor parallelism, the pipeline cut and context-parallel attention work on
any model that describes itself with a ``ModelParts``.

The model keeps its repeated blocks in an ``nn.ModuleDict`` keyed by their global index (so parameter names are
the same on every layout), a few parts before them (an embedding: only the first pipeline stage keeps them) and
after them (final norm, output head: only the last stage), each of which may be None on a stage that lacks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from torch import nn


@dataclass(frozen=True)
class ModelParts:
    blocks: str  # the attribute holding the ModuleDict of blocks
    first: tuple[str, ...]  # attributes only the first pipeline stage keeps
    last: tuple[str, ...]  # attributes only the last pipeline stage keeps
    # tensor parallelism: sequence_parallel -> the parallelize_module plan of one block
    tp_block_plan: Callable[[bool], dict]
    # (model or stage, sequence_parallel, loss_parallel) -> the plan of the parts outside the blocks
    tp_top_plan: Callable[[nn.Module, bool, bool], dict]
    # a block's attention module; context parallelism replaces its ``attention_core(q, k, v)``
    attention_of: Callable[[nn.Module], nn.Module]
    # whether the input embedding and the output head share one weight (neither tp nor pp can split that)
    tied: Callable[[nn.Module], bool]
    # (width of the hidden states between pipeline stages, width of the output): the stages' static shapes
    widths: Callable[[nn.Module], tuple[int, int]]
    # sequence parallelism: tp size -> a forward pre-hook (with kwargs) that gives the model what it needs of
    # the whole sequence (e.g. positions) when it sees a sequence shard; None: nothing needed
    tp_sequence_hook: Optional[Callable[[int], Callable]] = None

    def blocks_of(self, model: nn.Module) -> nn.ModuleDict:
        return getattr(model, self.blocks)

    def attentions(self, model: nn.Module) -> Iterable[nn.Module]:
        return (self.attention_of(block) for block in self.blocks_of(model).values())
