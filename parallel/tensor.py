"""Tensor parallelism (Megatron-style) for the Llama decoder with DTensor plans, plus vocab-parallel loss.

Column-wise wq/wk/wv/w1/w3 and row-wise wo/w2 keep one all-reduce (or reduce-scatter + all-gather with
sequence parallelism) per attention and per MLP. The embedding is vocab-parallel (RowwiseParallel shards its
rows) and the output head is column-wise, so its logits stay sharded on the vocabulary and the loss is computed
with ``loss_parallel`` without ever gathering the full [B, T, vocab] logits.

With ``sequence_parallel`` the norms and the residual stream are sharded along the sequence (dim 1) between the
tensor-parallel regions; the activations held per rank shrink by tp.

Only the ``tp`` mesh dimension is used: pass ``mesh["tp"]``. Every rank must build the model from the same seed
(``build_llama``) before ``apply_tp`` shards it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from orchestrate.parallel.mesh import ParallelConfigError


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


def _block_plan(sequence_parallel: bool) -> dict:
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


def _top_plan(model: nn.Module, sequence_parallel: bool, loss_parallel_enabled: bool) -> dict:
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


def _replicate_remaining_params(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Without sequence parallelism the norms are not parallelized; make their weights Replicate DTensors too,
    so every parameter has the same type (optimizers, grad clipping and checkpoints see one kind of tensor).
    Their forward then takes and returns plain tensors."""
    for module in model.modules():
        params = [(name, p) for name, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not params:
            continue
        for name, param in params:
            module.register_parameter(
                name, nn.Parameter(DTensor.from_local(param.data, tp_mesh, [Replicate()], run_check=False)))
        module.register_forward_pre_hook(_wrap_inputs_replicated(tp_mesh))
        module.register_forward_hook(_unwrap_output)


def _wrap_inputs_replicated(tp_mesh: DeviceMesh):
    def hook(module, args):
        return tuple(DTensor.from_local(a, tp_mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)
    return hook


def _unwrap_output(module, args, output):
    return output.to_local() if isinstance(output, DTensor) else output


def _full_sequence_positions(tp_size: int):
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


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool) -> nn.Module:
    """Shard ``model`` (a Llama, possibly a pipeline stage) in place over the 1-D ``tp_mesh``; returns it.

    Afterwards every parameter is a DTensor on ``tp_mesh`` (a tp degree of 1 leaves the model unchanged). With
    ``loss_parallel`` the model returns logits as a DTensor sharded on the vocabulary: compute the loss with
    ``tp_loss`` inside ``loss_context`` (backward too).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs the 1-D tp mesh (mesh['tp']), got dims {tp_mesh.mesh_dim_names}")
    if tp_mesh.size() == 1:
        return model
    tied = model.output is not None and model.tok_embeddings is not None and \
        model.output.weight is model.tok_embeddings.weight
    if tied:
        raise ParallelConfigError("model.tie_embeddings=true: not supported with parallel.tp > 1 (valid: false)")
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel))
    parallelize_module(model, tp_mesh, _top_plan(model, sequence_parallel, loss_parallel))
    _replicate_remaining_params(model, tp_mesh)
    if sequence_parallel:
        model.register_forward_pre_hook(_full_sequence_positions(tp_mesh.size()), with_kwargs=True)
    return model


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    return isinstance(logits, DTensor) and any(
        isinstance(p, Shard) and p.dim in (-1, logits.ndim - 1) for p in logits.placements)


def loss_context(logits: torch.Tensor):
    """``loss_parallel()`` for vocab-sharded logits, else a no-op; the loss AND its backward must run inside."""
    return loss_parallel() if is_vocab_sharded(logits) else contextlib.nullcontext()


def tp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy for plain or vocab-sharded logits [B, T, V]; targets [B, T] (replicated
    over tp). Returns a plain scalar tensor, the same on every tp rank. Call inside ``loss_context(logits)`` and
    call ``backward()`` there too."""
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
