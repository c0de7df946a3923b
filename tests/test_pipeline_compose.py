"""Pipeline parallelism composed with tensor and context parallelism, through the trainer's runner
(``orchestrate.parallelize.build_runner``), against the single-process full-batch oracle of tests/support/pipeline.py.

Layouts: pp2 x tp2 and pp2 x cp2 on 4 real gloo ranks; dp2 x pp2 x tp2 and pp2 x tp2 x cp2 on 8; one spawn per
world size. Checked: the loss and every parameter's gradient of the first step equal the oracle within 1e-5, as
does the gradient norm the trainer clips by; a short AdamW loss curve within 1e-4; and a forward-only
evaluation pass (the path of ``train.eval_batches``) returns the oracle's loss.
"""
import pytest
import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.pipeline import BATCH, MODEL, SEQ, batch, build_optimizer, full_batch_reference

CURVE_STEPS = 5
# (label, parallel overrides, steps, optimizer)
PP_TP = [
    ("gpipe-tp", dict(pp_schedule="gpipe", tp=2, sequence_parallel=False, loss_parallel=False), 1, "sgd"),
    ("1f1b-tp-sp-lp", dict(pp_schedule="1f1b", tp=2, sequence_parallel=True, loss_parallel=True), 1, "sgd"),
    ("1f1b-tp-lp-curve", dict(pp_schedule="1f1b", tp=2, loss_parallel=True), CURVE_STEPS, "adamw"),
    ("interleaved-tp-sp", dict(pp_schedule="interleaved_1f1b", pp_virtual_stages=2, tp=2, sequence_parallel=True,
                               loss_parallel=True), 1, "sgd"),
    ("zbv-tp", dict(pp_schedule="zbv", pp_virtual_stages=2, tp=2, loss_parallel=True), 1, "sgd"),
]
WORLD8 = [
    ("dp-1f1b-tp-sp-lp", dict(dp=2, pp_schedule="1f1b", microbatches=2, tp=2, sequence_parallel=True,
                              loss_parallel=True), 1, "sgd"),
    ("gpipe-tp-sp-cp-ring", dict(pp_schedule="gpipe", tp=2, sequence_parallel=True, loss_parallel=True, cp=2,
                                 cp_impl="ring"), 1, "sgd"),
]
PP_CP = [
    ("1f1b-cp-ring", dict(pp_schedule="1f1b", cp=2, cp_impl="ring"), 1, "sgd"),
    ("gpipe-cp-ulysses-curve", dict(pp_schedule="gpipe", cp=2, cp_impl="ulysses"), CURVE_STEPS, "adamw"),
]


def _config(overrides: dict):
    from orchestrate.config import Config, derive

    parallel = {"pp": 2, "microbatches": 4, **overrides}
    return derive(Config(), {"train.global_batch_size": BATCH, "train.seq_len": SEQ,
                             **{f"parallel.{key}": value for key, value in parallel.items()}})


def _run_layout(overrides: dict, n_steps: int, optimizer_name: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from orchestrate.models.llama import PARTS, LlamaConfig, build_llama, cross_entropy_loss
    from orchestrate.parallelize import build_runner
    from orchestrate.trainer import clip_grad_norm_
    from orchestrate.parallel.mesh import build_mesh
    from orchestrate.parallel.sync import build_sync
    cfg = _config(overrides)
    mesh = build_mesh(cfg.dims, "cpu")
    coords = cfg.dims.coordinates(dist.get_rank())
    sync = build_sync("ddp", mesh, cfg.dims, stages_driven_by_schedule=cfg.parallel.pp > 1)
    runner = build_runner(cfg, mesh, coords, build_llama(LlamaConfig(**MODEL), seed=0), PARTS, sync,
                          cross_entropy_loss)
    optimizer = build_optimizer(optimizer_name, list(runner.parameters()))
    losses, first_grads = [], None
    for step in range(n_steps):
        optimizer.zero_grad()
        loss = runner.forward_backward(*_replica_batch(step, coords["dp"], cfg.parallel.dp))
        sync.before_optimizer(step)
        if step == 0:
            first_grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                           for name, p in runner.named_parameters()}
            # the trainer's clipping sees the whole model's norm: DTensor norms over tp, summed over stages
            grad_norm = clip_grad_norm_(runner.parameters(), 1e9, runner.pp_group).item()
        optimizer.step()
        losses.append(None if loss is None else loss.item())
    eval_loss = runner.evaluate(*_replica_batch(1000, coords["dp"], cfg.parallel.dp))
    return {"losses": losses, "grads": first_grads, "eval": None if eval_loss is None else eval_loss.item(),
            "grad_norm": grad_norm}


def _replica_batch(step: int, replica: int, replicas: int):
    rows = slice(replica * BATCH // replicas, (replica + 1) * BATCH // replicas)
    return tuple(part[rows] for part in batch(step))


def _ranks(rank, world, cases):
    return {label: _run_layout(overrides, n_steps, optimizer) for label, overrides, n_steps, optimizer in cases}


def _eval_reference(n_steps: int, optimizer_name: str) -> float:
    """The oracle's loss on the evaluation batch after ``n_steps`` optimizer steps."""
    from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss
    model = build_llama(LlamaConfig(**MODEL), seed=0)
    optimizer = build_optimizer(optimizer_name, list(model.parameters()))
    for step in range(n_steps):
        optimizer.zero_grad()
        tokens, targets = batch(step)
        cross_entropy_loss(model(tokens), targets).backward()
        optimizer.step()
    with torch.no_grad():
        tokens, targets = batch(1000)
        return cross_entropy_loss(model(tokens), targets).item()


def _assert_matches_oracle(results: list[dict], cases) -> None:
    for label, overrides, n_steps, optimizer_name in cases:
        ref_losses, ref_grads = full_batch_reference(n_steps, optimizer_name)
        per_rank = [r[label] for r in results]
        reporting = [r for r in per_rank if r["losses"][0] is not None]
        # tp rank 0 of the last stage reports, once per dp x cp rank (its tokens); the controller averages them
        assert len(reporting) == overrides.get("dp", 1) * overrides.get("cp", 1), label
        losses = [sum(step) / len(reporting) for step in zip(*(r["losses"] for r in reporting))]
        tol = 1e-5 if n_steps == 1 else 1e-4
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < tol, (label, losses, ref_losses)
        held = {name for r in per_rank for name in r["grads"]}
        assert held == set(ref_grads), f"{label}: the stages hold every parameter"
        for r in per_rank:
            for name, grad in r["grads"].items():
                torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=f"{label} {name}")
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
        for r in per_rank:
            assert abs(r["grad_norm"] - ref_norm) < 1e-5 * max(1.0, ref_norm), (label, r["grad_norm"], ref_norm)
        eval_loss = sum(r["eval"] for r in reporting) / len(reporting)
        assert abs(eval_loss - _eval_reference(n_steps, optimizer_name)) < tol, (label, eval_loss)


@pytest.mark.slow
def test_pp2_tp2_matches_full_batch():
    results = run_ranks(4, _ranks, PP_TP, timeout_s=120)
    _assert_matches_oracle(results, PP_TP)


@pytest.mark.slow
def test_pp2_cp2_matches_full_batch():
    results = run_ranks(4, _ranks, PP_CP, timeout_s=120)
    _assert_matches_oracle(results, PP_CP)


@pytest.mark.slow
def test_dp2_pp2_tp2_and_pp2_tp2_cp2_match_full_batch():
    results = run_ranks(8, _ranks, WORLD8, timeout_s=120)
    _assert_matches_oracle(results, WORLD8)
