"""Tensor (+ sequence, + loss) parallelism against a single-process oracle, on real gloo ranks.

For every layout: the loss and EVERY parameter's gradient of the first step equal a single-process run of the
same model on the same global batch (fp32, 1e-5), and the loss curve of 5 AdamW steps matches within 1e-4.
The oracle and ``parallel_run`` are in tests/support/tensor_parallel.py.
"""
from __future__ import annotations

import pytest

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.tensor_parallel import (BATCH, MODEL, SEQ, assert_matches_reference, reference_run, run_layouts,
                                           tiny_config)


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
    from orchestrate.models.llama import validate_tp

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
    from orchestrate.models.llama import LlamaConfig

    return LlamaConfig(**{**MODEL, **changes})
