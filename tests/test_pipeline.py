"""Pipeline parallelism oracles: every schedule on real gloo ranks equals a single-process full-batch run.

One spawn per world size: all schedule checks of a world size run inside one run_ranks call.
"""
import pytest
import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.pipeline import BATCH, MODEL, SEQ, Params, batch, full_batch_reference, model_config, train

CURVE_STEPS = 20

# (schedule, microbatches, virtual_stages, explicit split)
SCHEDULES_PP2 = [("gpipe", 4, 1, None), ("1f1b", 4, 1, None), ("interleaved_1f1b", 4, 2, None),
                 ("interleaved_1f1b", 2, 3, None), ("looped_bfs", 4, 2, None), ("interleaved_zb", 4, 2, None),
                 ("zbv", 4, 2, None), ("dualpipev", 4, 2, None), ("gpipe", 2, 1, (2,))]
SCHEDULES_PP4 = [("gpipe", 4, 1, None), ("1f1b", 4, 1, None), ("interleaved_1f1b", 4, 2, None),
                 ("looped_bfs", 4, 2, None), ("interleaved_zb", 4, 2, None), ("zbv", 4, 2, None),
                 ("dualpipev", 8, 2, None)]
# (case, optimizer): 20-step loss curves
CURVES_PP2 = [(("1f1b", 4, 1, None), "adamw"), (("interleaved_zb", 4, 2, None), "sgd"),
              (("dualpipev", 4, 2, None), "adamw")]
CURVES_PP4 = [(("interleaved_1f1b", 4, 2, None), "sgd")]
DP_PP_CASE = ("interleaved_1f1b", 2, 2, None)  # per replica: 4 sequences in 2 microbatches, 2 stages per rank


def _run_pipeline(group, case, n_steps, optimizer_name, rows=slice(None), sync_group=None):
    from orchestrate.models.llama import PARTS, build_llama, cross_entropy_loss
    from orchestrate.parallel.pipeline import build_pipeline
    from orchestrate.parallel.sync.ddp import DDPSync

    schedule, microbatches, virtual_stages, split = case
    batch_rows = len(range(BATCH)[rows])
    pipe = build_pipeline(build_llama(model_config(), seed=0), PARTS, group, schedule, microbatches,
                          (batch_rows // microbatches, SEQ), cross_entropy_loss, virtual_stages=virtual_stages,
                          split=split)
    sync = None
    if sync_group is not None:
        sync = DDPSync(sync_group, use_torch_ddp=False)
        sync.wrap_model(torch.nn.ModuleList(pipe.stage_modules))

    def forward_backward(step):
        tokens, targets = batch(step)
        return pipe.step(tokens[rows], targets[rows])

    losses, grads = train(forward_backward, Params(pipe.named_parameters()), n_steps, optimizer_name, sync)
    return {"losses": losses, "grads": grads, "timing": pipe.last_step_timing}


def _pipeline_ranks(rank, world, grad_cases, curve_cases):
    import torch.distributed as dist

    results = {}
    for case in grad_cases:
        results[case] = _run_pipeline(dist.group.WORLD, case, 1, "sgd")
    for case, optimizer_name in curve_cases:
        results[(case, optimizer_name)] = _run_pipeline(dist.group.WORLD, case, CURVE_STEPS, optimizer_name)
    if world == 4:
        from orchestrate.parallel.mesh import ParallelDims, build_mesh, replica_group

        mesh = build_mesh(ParallelDims(dp=2, pp=2), "cpu")
        replica = mesh.get_coordinate()[1]
        rows = slice(replica * BATCH // 2, (replica + 1) * BATCH // 2)
        results["dp_pp"] = _run_pipeline(mesh["pp"], DP_PP_CASE, 5, "adamw", rows, replica_group(mesh))
        results["dp_pp"]["replica"] = replica
    return results


def _assert_grads_equal(rank_grads: list[dict], reference: dict, label) -> None:
    names = [name for grads in rank_grads for name in grads]
    assert sorted(names) == sorted(reference), f"{label}: stages must hold every parameter exactly once"
    for grads in rank_grads:
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-5, msg=f"{label} {name}")


def _assert_matches_reference(results: list[dict], key, n_steps: int, optimizer_name: str) -> None:
    ref_losses, ref_grads = full_batch_reference(n_steps, optimizer_name)
    loss_ranks = [r[key]["losses"] for r in results if r[key]["losses"][0] is not None]
    assert len(loss_ranks) == 1, f"{key}: exactly one rank holds the last stage"
    tol = 1e-5 if n_steps == 1 else 1e-4
    assert max(abs(a - b) for a, b in zip(loss_ranks[0], ref_losses)) < tol, (key, loss_ranks[0], ref_losses)
    _assert_grads_equal([r[key]["grads"] for r in results], ref_grads, key)


@pytest.fixture(scope="module")
def pp2_results():
    return run_ranks(2, _pipeline_ranks, SCHEDULES_PP2, CURVES_PP2, timeout_s=120)


@pytest.fixture(scope="module")
def pp4_results():
    return run_ranks(4, _pipeline_ranks, SCHEDULES_PP4, CURVES_PP4, timeout_s=120)


def test_pp2_every_schedule_matches_full_batch(pp2_results):
    for case in SCHEDULES_PP2:
        _assert_matches_reference(pp2_results, case, 1, "sgd")


def test_pp4_every_schedule_matches_full_batch(pp4_results):
    for case in SCHEDULES_PP4:
        _assert_matches_reference(pp4_results, case, 1, "sgd")


def test_loss_curves_match_single_process(pp2_results, pp4_results):
    for results, curves in ((pp2_results, CURVES_PP2), (pp4_results, CURVES_PP4)):
        for case, optimizer_name in curves:
            _assert_matches_reference(results, (case, optimizer_name), CURVE_STEPS, optimizer_name)


def test_explicit_split_places_layers(pp2_results):
    first_stage = pp2_results[0][("gpipe", 2, 1, (2,))]["grads"]
    assert {name.split(".")[1] for name in first_stage if name.startswith("layers.")} == {"0", "1"}
    assert "tok_embeddings.weight" in first_stage and "output.weight" not in first_stage


def test_dp2_pp2_with_ddp_sync_matches_full_batch(pp4_results):
    ref_losses, ref_grads = full_batch_reference(5, "adamw")
    for replica in (0, 1):
        ranks = [r["dp_pp"] for r in pp4_results if r["dp_pp"]["replica"] == replica]
        _assert_grads_equal([r["grads"] for r in ranks], ref_grads, f"replica {replica}")
    # each replica's last stage sees half the batch: their mean is the full-batch loss
    replica_losses = [r["dp_pp"]["losses"] for r in pp4_results if r["dp_pp"]["losses"][0] is not None]
    assert len(replica_losses) == 2
    for step, ref in enumerate(ref_losses):
        assert abs((replica_losses[0][step] + replica_losses[1][step]) / 2 - ref) < 1e-4


def test_step_timing_and_activation_count(pp4_results):
    for rank, results in enumerate(pp4_results):
        gpipe, one_f_one_b = results[("gpipe", 4, 1, None)]["timing"], results[("1f1b", 4, 1, None)]["timing"]
        assert 0 < gpipe.compute_s <= gpipe.total_s and gpipe.wait_s >= 0
        assert gpipe.peak_in_flight == [4]  # fill-drain holds every microbatch
        assert one_f_one_b.peak_in_flight == [4 - rank]  # 1F1B holds at most pp - rank


# ---------------------------------------------------------------------------------------------- in-process units

def _meta_model(**overrides):
    from orchestrate.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        return Llama(LlamaConfig(**{**MODEL, **overrides}))


def test_split_balances_counted_cost():
    from orchestrate.models.llama import PARTS
    from orchestrate.parallel.pipeline import split_points

    assert split_points(_meta_model(vocab_size=32), PARTS, 4) == [2, 4, 6]
    heavy = split_points(_meta_model(vocab_size=2048), PARTS, 4)
    sizes = [b - a for a, b in zip([0, *heavy], [*heavy, MODEL["n_layers"]])]
    assert sizes[0] < min(sizes[1:-1]) and sizes[-1] < min(sizes[1:-1]), sizes


def test_explicit_split_is_honoured_and_checked():
    from orchestrate.models.llama import PARTS
    from orchestrate.parallel.pipeline import split_points

    assert split_points(_meta_model(), PARTS, 3, explicit=[1, 7]) == [1, 7]
    for bad in ([4], [3, 3], [0, 4], [4, 8]):
        with pytest.raises(ValueError, match=r"parallel.pp_split=.*strictly increasing layer indices in 1..7"):
            split_points(_meta_model(), PARTS, 3, explicit=bad)


def test_stage_modules_keep_global_names():
    from orchestrate.models.llama import PARTS, LlamaConfig, build_llama
    from orchestrate.parallel.pipeline import build_stage_modules

    model = build_llama(model_config(), seed=0)
    stages = build_stage_modules(model, PARTS, [0, 1, 2], [3, 5])
    assert [list(stage.layers.keys()) for stage in stages] == [["0", "1", "2"], ["3", "4"], ["5", "6", "7"]]
    assert stages[0].tok_embeddings is not None and stages[0].output is None and stages[1].norm is None
    assert stages[2].tok_embeddings is None and stages[2].output is not None
    named = {name: p for stage in stages for name, p in stage.named_parameters()}
    assert sorted(named) == sorted(name for name, _ in model.named_parameters())
    assert all(named[name].data_ptr() != p.data_ptr() for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="model.tie_embeddings"):
        build_stage_modules(build_llama(LlamaConfig(**MODEL, tie_embeddings=True), seed=0), PARTS, [0], [4])


@pytest.mark.parametrize("args, message", [
    ((8, 2, "gpipe", 3, 1, 8), r"parallel.microbatches=3: must divide the per-replica batch 8 \(valid: 1, 2, 4, 8\)"),
    ((4, 8, "gpipe", 8, 1, 8), r"parallel.pp=8: more stages than model.n_layers=4"),
    ((8, 4, "interleaved_1f1b", 4, 4, 8), r"parallel.pp\*virtual_stages=16: more stages than model.n_layers=8"),
    ((8, 2, "pipedream", 2, 1, 8), r"parallel.pp_schedule=pipedream: unknown \(valid: gpipe, 1f1b, .*zbv"),
    ((8, 2, "interleaved_1f1b", 4, 1, 8), r"parallel.virtual_stages=1: .* \(valid: 2 or more\)"),
    ((8, 2, "1f1b", 4, 2, 8), r"parallel.virtual_stages=2: .* \(valid: 1;"),
    ((8, 2, "zbv", 4, 3, 8), r"parallel.virtual_stages=3: .* \(valid: 2\)"),
    ((8, 4, "1f1b", 2, 1, 8), r"parallel.microbatches=2: .* at least parallel.pp=4 .*\(valid: 4, 8\)"),
    ((8, 2, "dualpipev", 2, 2, 8), r"parallel.microbatches=2: .* at least 2\*parallel.pp=4 .*\(valid: 4, 8\)"),
    ((8, 4, "interleaved_zb", 9, 2, 18), r"parallel.microbatches=9: .* rounds .*\(valid: 1, 2, 3, 6\)"),
])
def test_bad_combinations_name_key_and_valid_values(args, message):
    from orchestrate.parallel.pipeline import validate_pp

    with pytest.raises(ValueError, match=message):
        validate_pp(*args)
