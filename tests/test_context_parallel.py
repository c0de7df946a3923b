"""Context parallelism (ring and Ulysses attention) against a single-process oracle, on real gloo ranks.

Model level: loss and every gradient equal the single-process full-batch run (1e-5), loss curves over 5 AdamW
steps within 1e-4, for cp=2 and tp=2 x cp=2. Core level: the attention cores fed non-contiguous, rank-dependent
q/k/v and output gradients (the layouts SDPA and the model produce) equal full causal attention, forward and
backward (gloo corrupts non-contiguous buffers silently).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.tensor_parallel import assert_matches_reference, parallel_run, reference_run

CORE_SHAPE = dict(batch=2, heads=4, seq=32, head_dim=8)


def full_attention_inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v and an output gradient for the whole sequence, laid out [B, T, H, D] and viewed as [B, H, T, D]
    (non-contiguous, as in the model)."""
    gen = torch.Generator().manual_seed(7)
    b, h, t, d = (CORE_SHAPE[k] for k in ("batch", "heads", "seq", "head_dim"))
    return tuple(torch.randn(b, t, h, d, generator=gen).transpose(1, 2) for _ in range(4))


def full_attention_reference() -> dict:
    q, k, v, grad_out = (t.clone().requires_grad_(i < 3) for i, t in enumerate(full_attention_inputs()))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def core_on_shards(impl: str, load_balance: bool) -> dict:
    """One rank: the cp attention core on this rank's (non-contiguous) shard; results scattered back into full-
    sequence tensors (zeros elsewhere) and summed over ranks, so rank 0 can compare them with the reference."""
    import torch.distributed as dist

    from orchestrate.parallel.context import build_attention_core, sequence_positions

    group, rank, cp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    positions = sequence_positions(CORE_SHAPE["seq"], rank, cp, load_balance)
    # Indexing along T of a [B, T, H, D] tensor, then viewing as [B, H, T, D]: non-contiguous, rank-dependent.
    q, k, v, grad_out = (t.transpose(1, 2)[:, positions].transpose(1, 2) for t in full_attention_inputs())
    assert not q.is_contiguous() and not grad_out.is_contiguous()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = build_attention_core(impl, group, load_balance)(q, k, v)
    out.backward(grad_out)
    gathered = {}
    for name, local in {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}.items():
        full = torch.zeros(local.shape[:2] + (CORE_SHAPE["seq"],) + local.shape[3:])
        full[:, :, positions] = local
        dist.all_reduce(full)
        gathered[name] = full
    return gathered


CORE_CASES = [("ring", True), ("ring", False), ("ulysses", True), ("ulysses", False)]
CP2_LAYOUTS = [dict(cp=2, cp_impl="ring"), dict(cp=2, cp_impl="ulysses")]
TP2_CP2_LAYOUTS = [dict(tp=2, cp=2, cp_impl=impl, sequence_parallel=True, loss_parallel=True)
                   for impl in ("ring", "ulysses")]


def cp2_checks(rank: int, world: int) -> dict:
    return {"cores": [core_on_shards(impl, lb) for impl, lb in CORE_CASES],
            "layouts": [parallel_run(layout) for layout in CP2_LAYOUTS]}


def tp2_cp2_checks(rank: int, world: int) -> dict:
    return {"cores": [core_on_shards(impl, lb) for impl, lb in CORE_CASES],
            "layouts": [parallel_run(layout) for layout in TP2_CP2_LAYOUTS]}


@pytest.fixture(scope="module")
def reference():
    return reference_run()


def assert_cores_match(core_results: list[dict], cases: list) -> None:
    expected = full_attention_reference()
    for (impl, load_balance), result in zip(cases, core_results):
        for name, tensor in expected.items():
            torch.testing.assert_close(result[name], tensor, atol=1e-5, rtol=0,
                                       msg=f"{impl} load_balance={load_balance}: {name}")


def test_cp2_ring_and_ulysses_match_single_process(reference):
    results = run_ranks(2, cp2_checks)
    assert_cores_match(results[0]["cores"], CORE_CASES)
    for rank, result in enumerate(results):
        for layout, layout_result in zip(CP2_LAYOUTS, result["layouts"]):
            assert_matches_reference(layout_result, reference, f"rank {rank} {layout}")


def test_tp2_cp2_matches_single_process(reference):
    results = run_ranks(4, tp2_cp2_checks)
    assert_cores_match(results[0]["cores"], CORE_CASES)  # the cores on all 4 ranks as one cp group
    for rank, result in enumerate(results):
        for layout, layout_result in zip(TP2_CP2_LAYOUTS, result["layouts"]):
            assert_matches_reference(layout_result, reference, f"rank {rank} {layout}")


def test_shard_sequence_load_balanced_chunks():
    from orchestrate.parallel.context import shard_sequence

    tokens = torch.arange(16).repeat(2, 1)
    shards = [shard_sequence(tokens, tokens + 100, rank, 4) for rank in range(4)]
    assert shards[0][2].tolist() == [0, 1, 14, 15]
    assert shards[3][2].tolist() == [6, 7, 8, 9]
    for local_tokens, local_targets, positions in shards:
        assert torch.equal(local_tokens[1], positions) and torch.equal(local_targets, local_tokens + 100)
    covered = torch.cat([positions for _, _, positions in shards]).sort().values
    assert torch.equal(covered, torch.arange(16))
    assert shard_sequence(tokens, tokens, 1, 2, load_balance=False)[2].tolist() == list(range(8, 16))


def test_validate_cp_names_keys_and_valid_values():
    from orchestrate.parallel.context import validate_cp

    validate_cp(32, 4, 4, "ulysses")
    validate_cp(32, 4, 2, "ulysses", tp=2)
    with pytest.raises(ValueError, match=r"^train.seq_len=30: must be divisible by 2\*parallel.cp=4 .*"
                                         r"\(valid parallel.cp: 1, 3, 5, 15\)$"):
        validate_cp(30, 4, 2, "ring")
    with pytest.raises(ValueError, match=r"^parallel.cp=4: ulysses needs the heads per tp rank \(model.n_heads=4 / "
                                         r"parallel.tp=2 = 2\) divisible by cp \(valid: 1, 2\)$"):
        validate_cp(32, 4, 4, "ulysses", tp=2)
    validate_cp(32, 4, 4, "ring", tp=2)
    with pytest.raises(ValueError, match=r"^parallel.cp_impl=allgather: unknown \(valid: ring, ulysses\)$"):
        validate_cp(32, 4, 2, "allgather")
