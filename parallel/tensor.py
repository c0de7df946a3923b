"""Tensor parallelism (Megatron-style) with DTensor plans, plus vocab-parallel loss.

The plans come from the model (``ModelParts``: its folder under orchestrate.models knows which projections are
column- and row-wise). The mechanism here applies them to every block and to the parts around the blocks, makes
the parameters left over (norms without sequence parallelism) Replicate DTensors, and computes the loss on
logits sharded on the vocabulary with ``loss_parallel``, never gathering the full [B, T, vocab] logits.

Only the ``tp`` mesh dimension is used: pass ``mesh["tp"]``. Every rank must build the model from the same seed
before ``apply_tp`` shards it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from orchestrate.parallel.mesh import ParallelConfigError
from orchestrate.parallel.model_parts import ModelParts


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


def apply_tp(model: nn.Module, parts: ModelParts, tp_mesh: DeviceMesh, sequence_parallel: bool,
             loss_parallel: bool) -> nn.Module:
    """Shard ``model`` (possibly a pipeline stage) in place over the 1-D ``tp_mesh`` with the plans its
    ``parts`` give; returns it.

    Afterwards every parameter is a DTensor on ``tp_mesh`` (a tp degree of 1 leaves the model unchanged). With
    ``loss_parallel`` the model returns logits as a DTensor sharded on the vocabulary: compute the loss with
    ``tp_loss`` inside ``loss_context`` (backward too).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs the 1-D tp mesh (mesh['tp']), got dims {tp_mesh.mesh_dim_names}")
    if tp_mesh.size() == 1:
        return model
    if parts.tied(model):
        raise ParallelConfigError("model.tie_embeddings=true: not supported with parallel.tp > 1 (valid: false)")
    for block in parts.blocks_of(model).values():
        parallelize_module(block, tp_mesh, parts.tp_block_plan(sequence_parallel))
    parallelize_module(model, tp_mesh, parts.tp_top_plan(model, sequence_parallel, loss_parallel))
    _replicate_remaining_params(model, tp_mesh)
    if sequence_parallel and parts.tp_sequence_hook is not None:
        model.register_forward_pre_hook(parts.tp_sequence_hook(tp_mesh.size()), with_kwargs=True)
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
