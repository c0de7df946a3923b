"""The tensor/sequence/context-parallel oracle: a single-process full-batch run of a tiny Llama, and one rank of
the same run on any dp/tp/cp layout (``parallel_run``), with the comparison the tests make between them."""
from __future__ import annotations

import torch

MODEL = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
BATCH, SEQ, STEPS, LR = 4, 16, 5, 1e-2
GRAD_TOL, CURVE_TOL = 1e-5, 1e-4


def tiny_config():
    from orchestrate.models.llama import LlamaConfig

    return LlamaConfig(**MODEL)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process, full batch: the loss of each step and the gradients of the first."""
    from orchestrate.models.llama import build_llama, cross_entropy_loss

    model = build_llama(tiny_config(), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first_grads = [], {}
    for step in range(STEPS):
        tokens, targets = global_batch(step)
        loss = cross_entropy_loss(model(tokens), targets)
        loss.backward()
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


def parallel_run(layout: dict) -> dict:
    """One rank of a parallel run. ``layout``: dp/tp/cp degrees, sequence_parallel, loss_parallel, cp_impl.

    This is the recipe a trainer follows: slice the batch by dp, shard the sequence by cp, compute the loss in
    the loss context, average gradients over the replica group (dp x cp), report the loss averaged over it.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from orchestrate.models.llama import PARTS, build_llama
    from orchestrate.parallel.context import apply_cp, shard_sequence
    from orchestrate.parallel.mesh import ParallelDims, build_mesh, replica_group
    from orchestrate.parallel.sync.base import sync_step
    from orchestrate.parallel.sync.ddp import DDPSync
    from orchestrate.parallel.tensor import apply_tp, loss_context, tp_loss

    dims = ParallelDims(dp=layout.get("dp", 1), tp=layout.get("tp", 1), cp=layout.get("cp", 1))
    mesh = build_mesh(dims, "cpu")
    coords = dims.coordinates(dist.get_rank())
    model = build_llama(tiny_config(), seed=0)
    if dims.tp > 1:
        apply_tp(model, PARTS, mesh["tp"], layout["sequence_parallel"], layout["loss_parallel"])
    if dims.cp > 1:
        apply_cp(model, PARTS, mesh["cp"], layout["cp_impl"])
    replicas = replica_group(mesh)
    sync = DDPSync(replicas)
    wrapped = sync.wrap_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    losses, first_grads, logits_shape = [], {}, []

    def forward_backward(step: int) -> torch.Tensor:
        tokens, targets = global_batch(step)
        rows = slice(coords["dp"] * BATCH // dims.dp, (coords["dp"] + 1) * BATCH // dims.dp)
        tokens, targets, positions = shard_sequence(tokens[rows], targets[rows], coords["cp"], dims.cp)
        logits = wrapped(tokens, positions if dims.cp > 1 else None)
        if not logits_shape:
            logits_shape.extend((logits.to_local() if isinstance(logits, DTensor) else logits).shape)
        with loss_context(logits):
            loss = tp_loss(logits, targets)
            loss.backward()
        return loss

    def keep_first_grads() -> None:
        if not first_grads:
            first_grads.update({name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                                for name, p in model.named_parameters()})

    for step in range(STEPS):
        loss = sync_step(sync, optimizer, step, lambda: forward_backward(step), keep_first_grads)
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=replicas)
        losses.append(reported.item() / dist.get_world_size(replicas))
    logits_shape = tuple(logits_shape)
    return {"losses": losses, "grads": first_grads, "local_logits_shape": logits_shape}


def run_layouts(rank: int, world: int, layouts: list[dict]) -> list[dict]:
    return [parallel_run(layout) for layout in layouts]


def assert_matches_reference(result: dict, reference: tuple, label: str) -> None:
    ref_losses, ref_grads = reference
    assert abs(result["losses"][0] - ref_losses[0]) <= GRAD_TOL, (label, result["losses"][0], ref_losses[0])
    assert result["grads"].keys() == ref_grads.keys(), label
    for name, grad in ref_grads.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=GRAD_TOL, rtol=0, msg=f"{label}: {name}")
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), atol=CURVE_TOL, rtol=0,
                               msg=f"{label}: loss curve")
