"""Tensor (+ sequence, + loss) parallelism against a single-process oracle, on real gloo ranks.

For every layout: the loss and EVERY parameter's gradient of the first step equal a single-process run of the
same model on the same global batch (fp32, 1e-5), and the loss curve of 5 AdamW steps matches within 1e-4.
The helpers here (oracle, ``parallel_run``) are shared with tests/test_context_parallel.py.
"""
from __future__ import annotations

import pytest
import torch

from parallel.local_ranks import run_ranks

MODEL = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
BATCH, SEQ, STEPS, LR = 4, 16, 5, 1e-2
GRAD_TOL, CURVE_TOL = 1e-5, 1e-4


def tiny_config():
    from orchestrator.models import LlamaConfig

    return LlamaConfig(**MODEL)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process, full batch: the loss of each step and the gradients of the first."""
    from orchestrator.models import build_llama, cross_entropy_loss

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

    from orchestrator.models import build_llama
    from parallel.context import apply_cp, shard_sequence
    from parallel.mesh import ParallelDims, build_mesh, replica_group
    from parallel.sync.ddp import DDPSync
    from parallel.tensor import apply_tp, loss_context, tp_loss

    dims = ParallelDims(dp=layout.get("dp", 1), tp=layout.get("tp", 1), cp=layout.get("cp", 1))
    mesh = build_mesh(dims, "cpu")
    coords = dims.coordinates(dist.get_rank())
    model = build_llama(tiny_config(), seed=0)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], layout["sequence_parallel"], layout["loss_parallel"])
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], layout["cp_impl"])
    replicas = replica_group(mesh)
    sync = DDPSync(replicas)
    wrapped = sync.wrap_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    losses, first_grads, logits_shape = [], {}, None
    for step in range(STEPS):
        tokens, targets = global_batch(step)
        rows = slice(coords["dp"] * BATCH // dims.dp, (coords["dp"] + 1) * BATCH // dims.dp)
        tokens, targets, positions = shard_sequence(tokens[rows], targets[rows], coords["cp"], dims.cp)
        logits = wrapped(tokens, positions if dims.cp > 1 else None)
        with loss_context(logits):
            loss = tp_loss(logits, targets)
            loss.backward()
        sync.before_optimizer(step)
        if step == 0:
            logits_shape = tuple((logits.to_local() if isinstance(logits, DTensor) else logits).shape)
            first_grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                           for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=replicas)
        losses.append(reported.item() / dist.get_world_size(replicas))
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


@pytest.fixture(scope="module")
def reference():
    return reference_run()


TP2_LAYOUTS = [dict(tp=2, sequence_parallel=sp, loss_parallel=lp) for sp in (False, True) for lp in (False, True)]
DP2_TP2_LAYOUTS = [dict(dp=2, tp=2, sequence_parallel=True, loss_parallel=True),
                   dict(dp=2, tp=2, sequence_parallel=False, loss_parallel=False)]


def test_tp2_matches_single_process(reference):
    results = run_ranks(2, run_layouts, TP2_LAYOUTS)
    for rank, per_layout in enumerate(results):
        for layout, result in zip(TP2_LAYOUTS, per_layout):
            assert_matches_reference(result, reference, f"rank {rank} {layout}")
            vocab = MODEL["vocab_size"] // 2 if layout["loss_parallel"] else MODEL["vocab_size"]
            assert result["local_logits_shape"] == (BATCH, SEQ, vocab), layout  # never gathered with loss_parallel


def test_dp2_tp2_matches_single_process(reference):
    results = run_ranks(4, run_layouts, DP2_TP2_LAYOUTS)
    for rank, per_layout in enumerate(results):
        for layout, result in zip(DP2_TP2_LAYOUTS, per_layout):
            assert_matches_reference(result, reference, f"rank {rank} {layout}")


def test_validate_tp_names_keys_and_valid_values():
    from parallel.tensor import validate_tp

    cfg = tiny_config()
    validate_tp(cfg, 1)
    validate_tp(cfg, 2, local_seq_len=16)
    with pytest.raises(ValueError, match=r"^parallel.tp=3: must divide model.n_heads=4 and model.n_kv_heads=2 "
                                         r"\(valid: 1, 2\)$"):
        validate_tp(cfg, 3)
    with pytest.raises(ValueError, match=r"parallel.tp=4: must divide model.n_heads=4 and model.n_kv_heads=2"):
        validate_tp(cfg, 4)
    with pytest.raises(ValueError, match=r"^parallel.tp=4: must divide the feed-forward hidden size 90 .*"
                                         r"\(valid: 1, 2\)$"):
        validate_tp(_with(ffn_hidden=90, n_heads=8, n_kv_heads=4), 4)
    with pytest.raises(ValueError, match=r"parallel.tp=2: must divide model.vocab_size=255 \(valid: 1\)"):
        validate_tp(_with(vocab_size=255), 2)
    with pytest.raises(ValueError, match=r"sequence parallelism must divide the per-rank sequence length 15"):
        validate_tp(cfg, 2, local_seq_len=15)


def _with(**changes):
    from orchestrator.models import LlamaConfig

    return LlamaConfig(**{**MODEL, **changes})
