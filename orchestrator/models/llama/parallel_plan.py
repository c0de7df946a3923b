"""How the parallel mechanisms (orchestrate.parallel) apply to Llama: the tensor-parallel plans, what sequence
parallelism must hand the model, where context-parallel attention binds, and which parts the pipeline's first
and last stages keep (``PARTS``); plus the checks of a tensor-parallel degree against the model's shapes.

Tensor parallelism: column-wise wq/wk/wv/w1/w3 and row-wise wo/w2 keep one all-reduce (or reduce-scatter +
all-gather with sequence parallelism) per attention and per MLP. The embedding is vocab-parallel (RowwiseParallel
shards its rows) and the output head is column-wise, so its logits stay sharded on the vocabulary. With
sequence parallelism the norms and the residual stream are sharded along the sequence (dim 1) between the
tensor-parallel regions; the activations held per rank shrink by tp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from orchestrate.parallel.mesh import ParallelConfigError
from orchestrate.parallel.model_parts import ModelParts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _common_divisors(*values: int) -> list[int]:
    return [d for d in _divisors(min(values)) if all(v % d == 0 for v in values)]


def _valid(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def validate_tp(model_cfg, tp: int, local_seq_len: Optional[int] = None) -> None:
    """Raise ParallelConfigError (a ValueError) naming the key when ``tp`` cannot shard the model.

    ``local_seq_len`` (the sequence length one rank holds: train.seq_len / cp) is checked only when given, for
    sequence parallelism, which splits it by tp.
    """
    if tp < 1:
        raise ParallelConfigError(f"parallel.tp={tp}: must be a positive integer")
    heads, kv_heads = model_cfg.n_heads, model_cfg.n_kv_heads
    if heads % tp or kv_heads % tp:
        raise ParallelConfigError(
            f"parallel.tp={tp}: must divide model.n_heads={heads} and model.n_kv_heads={kv_heads} "
            f"(valid: {_valid(_common_divisors(heads, kv_heads))})"
        )
    hidden = model_cfg.hidden_dim
    if hidden % tp:
        raise ParallelConfigError(
            f"parallel.tp={tp}: must divide the feed-forward hidden size {hidden} (model.ffn_hidden, or "
            f"derived from model.dim) (valid: {_valid(_common_divisors(hidden, heads, kv_heads))})"
        )
    vocab = model_cfg.vocab_size
    if vocab % tp:
        raise ParallelConfigError(
            f"parallel.tp={tp}: must divide model.vocab_size={vocab} "
            f"(valid: {_valid(_common_divisors(vocab, hidden, heads, kv_heads))})"
        )
    if local_seq_len is not None and local_seq_len % tp:
        raise ParallelConfigError(
            f"parallel.tp={tp}: sequence parallelism must divide the per-rank sequence length {local_seq_len} "
            f"(train.seq_len / parallel.cp) (valid: {_valid(_common_divisors(local_seq_len, heads, kv_heads))})"
        )


def block_plan(sequence_parallel: bool) -> dict:
    # wo/w2 end a tensor-parallel region: all-reduce to a replicated output, or reduce-scatter along the
    # sequence when the residual stream is sequence-sharded.
    region_output = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=region_output),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=region_output),
    }
    if sequence_parallel:
        # Norms run on the sequence shard; attention / MLP inputs are all-gathered along the sequence.
        plan.update({
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def top_plan(model: nn.Module, sequence_parallel: bool, loss_parallel_enabled: bool) -> dict:
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel_enabled else Replicate(),
            use_local_output=not loss_parallel_enabled,
        )
    return plan


def full_sequence_positions(tp_size: int):
    """Sequence parallelism shards the embedding output, so Llama would size its RoPE tables from the local
    length; hand it the positions of the whole (pre-SP) sequence unless the caller passes them (context
    parallelism does). Hidden-state inputs (a pipeline stage without the embedding) are sequence shards."""
    def hook(module, args, kwargs):
        positions = args[1] if len(args) > 1 else kwargs.get("positions")
        if positions is not None:
            return None
        inputs = args[0] if args else kwargs["tokens"]
        seq = inputs.shape[1] if not inputs.is_floating_point() else inputs.shape[1] * tp_size
        kwargs = {name: value for name, value in kwargs.items() if name not in ("tokens", "positions")}
        return (inputs,), {**kwargs, "positions": torch.arange(seq, device=inputs.device)}
    return hook


def tied(model: nn.Module) -> bool:
    return model.output is not None and model.tok_embeddings is not None and \
        model.output.weight is model.tok_embeddings.weight


PARTS = ModelParts(blocks="layers", first=("tok_embeddings",), last=("norm", "output"), tp_block_plan=block_plan,
                   tp_top_plan=top_plan, attention_of=lambda block: block.attention, tied=tied,
                   widths=lambda model: (model.cfg.dim, model.cfg.vocab_size),
                   tp_sequence_hook=full_sequence_positions)
