"""Single-process parts of the low-communication strategies, by docs/lowcomm.md section: wire formats (2.3.4), the
1-bit compressor (4.3.3), NoLoCo's update and grouping (3.3.3, 3.3.5), Streaming DiLoCo's fragments and schedule
(2.3.2)."""
import math

import pytest
import torch

from orchestrate.parallel.quantize import (E3M0Quantizer, Int8Quantizer, build_quantizer, pack_signs, sign_compress,
                               unpack_signs)
from orchestrate.parallel.sync.noloco import (NoLoCoConfig, check_stability, noloco_groups, update_velocity,
                                  update_velocity_same_rates)
from orchestrate.parallel.sync.streaming_diloco import (FragmentSchedule, StreamingDiLoCoConfig, StreamingDiLoCoSync,
                                            assign_fragments)
from orchestrate.parallel.sync.tensors import parameters_holding
from tests.support.lowcomm import TinyNet


def test_e3m0_representable_values_are_exact_and_signs_kept():
    quantizer = E3M0Quantizer(block=16)
    scale = 3.0
    levels = [scale * 2.0 ** -k for k in range(7)]  # the block's absmax and the six smaller powers of two
    values = torch.tensor(levels + [-v for v in levels] + [0.0, 0.0])
    packed = quantizer.encode(values)
    assert packed.payload.dtype == torch.uint8 and packed.payload.numel() == 8
    assert packed.nbytes == 8 + 4
    assert torch.equal(quantizer.decode(packed), values)


def test_e3m0_rounds_to_nearest_level_zero_stays_zero():
    quantizer = E3M0Quantizer(block=64)
    values = torch.randn(4 * 64, generator=torch.Generator().manual_seed(0))
    values[::7] = 0.0
    decoded = quantizer.decode(quantizer.encode(values))
    assert torch.equal(decoded[::7], torch.zeros_like(decoded[::7]))
    nonzero = decoded != 0
    assert torch.equal(decoded[nonzero].sign(), values[nonzero].sign())
    scales = values.view(-1, 64).abs().amax(1).repeat_interleave(64)
    error = (decoded - values).abs()
    # nearest power of two: at most a third of the value; below scale/128 a value becomes 0
    assert torch.all(error <= torch.maximum(values.abs() / 3, scales / 128) + 1e-7)
    assert torch.all(decoded.abs() <= scales)


def test_int8_round_trip_and_quantizer_choice():
    quantizer = build_quantizer("int8", 32)
    assert isinstance(quantizer, Int8Quantizer) and build_quantizer("none") is None
    values = torch.randn(128, generator=torch.Generator().manual_seed(1))
    packed = quantizer.encode(values)
    assert packed.nbytes == 128 + 4 * 4
    scales = values.view(-1, 32).abs().amax(1).repeat_interleave(32)
    assert torch.all((quantizer.decode(packed) - values).abs() <= scales / 254 + 1e-7)
    with pytest.raises(ValueError):
        build_quantizer("fp8")
    with pytest.raises(ValueError):
        quantizer.encode(torch.zeros(33))


def test_sign_packing_eight_per_byte():
    values = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0, -3.0, 1e-30, -1e-30] * 3)
    packed = pack_signs(values)
    assert packed.numel() == 3
    assert torch.equal(unpack_signs(packed), torch.where(values >= 0, 1.0, -1.0))


def test_one_bit_compressor_identities():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(4096, generator=generator, dtype=torch.float64)
    packed, scale, error = sign_compress(u)
    compressed = scale * unpack_signs(packed, torch.float64)
    torch.testing.assert_close(compressed.norm(), u.norm(), rtol=1e-13, atol=0)  # equal up to summation order
    torch.testing.assert_close(compressed + error, u, rtol=0, atol=1e-15)
    assert 0.55 < (error.norm() / u.norm()).item() < 0.7  # sqrt(1 - 2/pi) ~ 0.60 for Gaussian input

    # Telescoping with error feedback: sum_t C(x_t + e_t) = sum_t x_t - e_T, and e stays bounded.
    error = torch.zeros(1024, dtype=torch.float64)
    sent = torch.zeros(1024, dtype=torch.float64)
    inputs = torch.zeros(1024, dtype=torch.float64)
    worst = 0.0
    for _ in range(2000):
        x = torch.randn(1024, generator=generator, dtype=torch.float64)
        packed, scale, error = sign_compress(x + error)
        sent += scale * unpack_signs(packed, torch.float64)
        inputs += x
        worst = max(worst, (error.norm() / x.norm()).item())
    torch.testing.assert_close(sent, inputs - error, rtol=0, atol=1e-9)
    assert worst < 1.0


def test_noloco_same_rates_form_equals_general_rule():
    generator = torch.Generator().manual_seed(0)
    velocity, slow, fast, mean_slow, mean_fast = (torch.randn(100, generator=generator, dtype=torch.float64)
                                                  for _ in range(5))
    mean_delta = mean_slow - mean_fast
    general = update_velocity(velocity.clone(), slow, mean_delta, mean_slow, 0.5, 0.7, 0.7)
    shortcut = update_velocity_same_rates(velocity.clone(), slow, mean_fast, 0.5, 0.7)
    torch.testing.assert_close(general, shortcut, rtol=0, atol=1e-14)


def test_noloco_groups_partition_and_stability_window():
    for world, size in ((4, 2), (8, 2), (8, 4), (6, 3)):
        for step in range(20):
            groups = noloco_groups(step, world, size)
            assert groups == noloco_groups(step, world, size)
            assert sorted(r for g in groups for r in g) == list(range(world))
            assert all(len(g) == size for g in groups)
    assert len({tuple(map(tuple, noloco_groups(s, 8, 2))) for s in range(20)}) > 1  # regrouped over time
    with pytest.raises(ValueError):
        noloco_groups(0, 6, 4)
    check_stability(2, 0.5, 0.7, 0.7)
    for alpha, beta, gamma in ((0.5, 0.4, 0.7), (0.5, 0.7, 0.45), (0.5, 0.7, 1.6)):
        with pytest.raises(ValueError):
            check_stability(2, alpha, beta, gamma)
    with pytest.raises(ValueError):
        NoLoCoConfig(group_size=1)


def test_streaming_fragments_strided_and_sequential():
    block_of = [*range(6), None, None]  # six blocks, then the embedding and the output head
    assert assign_fragments(block_of, 3, strided=True) == [[0, 2, 4], [1, 3, 5], [6, 7]]
    assert assign_fragments(block_of, 3, strided=False) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert assign_fragments(block_of, 0, strided=True) == [list(range(8))]
    # a pipeline stage fragments the blocks it holds (blocks 2..5 here: ordinals 0..3)
    assert assign_fragments(block_of[2:6], 2, strided=True) == [[0, 2], [1, 3]]


def test_streaming_schedule_each_fragment_once_per_window():
    for sync_every, fragments in ((6, 3), (12, 4), (100, 5), (4, 1), (10, 3), (100, 9), (9, 9)):
        schedule = FragmentSchedule(sync_every, fragments)
        for window in range(3):
            sent = [schedule.fragment_to_send(s) for s in range(window * sync_every, (window + 1) * sync_every)]
            assert sorted(p for p in sent if p is not None) == list(range(fragments))
        offsets = sorted(schedule.offset(p) for p in range(fragments)) + [sync_every]
        assert min(b - a for a, b in zip(offsets, offsets[1:])) >= schedule.spacing
    with pytest.raises(ValueError):
        FragmentSchedule(2, 3)


def test_streaming_rejects_overlap_beyond_fragment_spacing():
    model = TinyNet(n_layers=4)  # 2 strided block fragments + the non-block fragment
    sync = StreamingDiLoCoSync(None, config=StreamingDiLoCoConfig(sync_every=6, layers_per_fragment=2,
                                                                  overlap_steps=2))
    with pytest.raises(ValueError, match="overlap_steps"):
        sync.wrap_model(model, model.layers)


def test_registry_builds_every_strategy_from_options():
    from orchestrate.parallel.sync import STRATEGIES

    counter = None
    built = {name: STRATEGIES[name](None, counter, {}) for name in
             ("diloco", "streaming_diloco", "noloco", "onebit_adam")}
    assert built["streaming_diloco"].config.quantization == "e3m0"
    assert STRATEGIES["diloco"](None, counter, {"sync_every": 10}).config.sync_every == 10
    with pytest.raises(TypeError):
        STRATEGIES["diloco"](None, counter, {"no_such_option": 1})
    assert math.isclose(built["diloco"].config.outer_lr, 0.7)


def test_streaming_evaluates_on_outer_weights_and_gives_the_live_ones_back(tmp_path):
    """The trainer evaluates inside ``sync.evaluating()``: Streaming DiLoCo's fragments sync at different steps, so
    the held-out loss is taken on the outer weights phi, and training goes on from the live weights, bit for bit."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        _evaluate_on_outer_weights()
    finally:
        dist.destroy_process_group()


def _evaluate_on_outer_weights():
    model = TinyNet(n_layers=4)
    sync = StreamingDiLoCoSync(None, config=StreamingDiLoCoConfig(sync_every=6, layers_per_fragment=2,
                                                                  overlap_steps=1))
    sync.wrap_model(model, model.layers)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # live weights moved away from phi by local steps
    live = {name: param.detach().clone() for name, param in model.named_parameters()}
    outer = {name: value.clone() for name, value in sync.outer_parameters().items()}
    with sync.evaluating():
        inside = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all(inside[name].equal(outer[name]) for name in live)
    assert all(not inside[name].equal(live[name]) for name in live)
    assert all(param.equal(live[name]) for name, param in model.named_parameters())


def test_values_for_no_parameter_are_refused_before_any_weight_changes():
    """A name that matches no parameter (say, one prefixed by a wrapper) would evaluate that parameter's live
    weights unnoticed."""
    model = TinyNet(n_layers=2)
    live = {name: param.detach().clone() for name, param in model.named_parameters()}
    values = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    values["module.layers.0.weight"] = values.pop("layers.0.weight")
    with pytest.raises(ValueError, match=r"1 values name no parameter, e.g. \['module.layers.0.weight'\]"):
        with parameters_holding(model.named_parameters(), values):
            pass
    assert all(param.equal(live[name]) for name, param in model.named_parameters())
