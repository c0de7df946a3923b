"""SparseLoCo (DiLoCo with ``compression="sparseloco"``): the codec and the error-feedback identity in process, then
the strategy on real gloo ranks (one spawn per world size runs many checks; the parent compares)."""
import copy
import math
from contextlib import contextmanager

import pytest
import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import (TinyNet, adamw, batch, fingerprint, flat_params, loss_fn, singleton_group,
                                   train_step)


def _codec(numel, density, chunk=4096, bits=2, dtype=torch.float32):
    from orchestrate.parallel.sync.sparse import SparseCodec

    return SparseCodec.build(numel, density, chunk, bits, dtype)


def _expected_message_bytes(numel, density, chunk, bits, itemsize):
    """The wire format's size, written out independently of the codec (parallel/sync/sparse.py docstring)."""
    chunk = min(chunk, numel)
    chunks, k = -(-numel // chunk), max(1, round(density * chunk))
    index_bits = max(1, math.ceil(math.log2(chunk)))
    values = chunks * k * itemsize if bits == 32 else chunks * 8 + math.ceil(chunks * k * 2 / 8)
    positions = math.ceil(chunks * chunk / 8) if k * index_bits > chunk else math.ceil(chunks * k * index_bits / 8)
    return values + positions


# ----------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize("bits", [1, 2, 3, 9, 12, 16])
def test_bit_streams_round_trip(bits):
    from orchestrate.parallel.sync.sparse import pack_bits, unpack_bits

    values = torch.randint(0, 2 ** bits, (101,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(101 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 101), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_one_full_precision_is_lossless(dtype):
    x = torch.randn(10_000, dtype=dtype, generator=torch.Generator().manual_seed(0))
    codec = _codec(x.numel(), 1.0, chunk=4096, bits=32, dtype=dtype)
    message = codec.encode(x)
    assert codec.uses_bitmap and codec.k == codec.chunk == 4096
    assert message.numel() == codec.nbytes == _expected_message_bytes(10_000, 1.0, 4096, 32, dtype.itemsize)
    assert torch.equal(codec.decode(message), x)


def test_codec_keeps_the_top_k_of_every_chunk():
    x = torch.randn(3 * 1024 + 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    codec = _codec(x.numel(), 0.05, chunk=1024, bits=32, dtype=torch.float64)
    assert not codec.uses_bitmap and codec.position_bits == 10 and codec.k == 51
    sent = codec.decode(codec.encode(x))
    kept = sent != 0
    assert torch.equal(sent[kept], x[kept])  # full precision values land where they came from
    padded = torch.cat([x, x.new_zeros(4 * 1024 - x.numel())]).view(4, 1024)
    for row, mask in zip(padded, torch.cat([kept, kept.new_zeros(padded.numel() - x.numel())]).view(4, 1024)):
        if mask.any() and (~mask).any():
            assert row[mask].abs().min() >= row[~mask].abs().max()
    assert kept[: 3 * 1024].view(3, 1024).sum(1).tolist() == [51, 51, 51]


def test_two_bit_values_are_signs_times_per_chunk_bin_means():
    x = torch.randn(4096 * 3, generator=torch.Generator().manual_seed(2))
    codec = _codec(x.numel(), 0.02, chunk=4096, bits=2)
    message = codec.encode(x)
    assert message.numel() == codec.nbytes == _expected_message_bytes(x.numel(), 0.02, 4096, 2, 4)
    full_precision = _codec(x.numel(), 0.02, chunk=4096, bits=32)
    exact = full_precision.decode(full_precision.encode(x))
    sent = codec.decode(message)
    assert torch.equal(sent != 0, exact != 0) and torch.equal(sent.sign(), exact.sign())
    for chunk_exact, chunk_sent in zip(exact.view(3, 4096), sent.view(3, 4096)):
        magnitudes = chunk_exact[chunk_exact != 0].abs()
        high = magnitudes >= magnitudes.mean()
        levels = torch.unique(chunk_sent[chunk_sent != 0].abs())
        expected = torch.stack([magnitudes[~high].mean(), magnitudes[high].mean()])
        torch.testing.assert_close(levels, expected, rtol=1e-6, atol=0)


def test_message_is_a_small_fraction_of_dense_fp32():
    """Density 0.02 and 2-bit values on 2**20 fp32 values: k = 82 of 4096, 12-bit positions, 8 bytes of levels per
    chunk. Within 10% of density * (2 + 12) / 32 of the dense bytes (k rounds up 81.92 -> 82; levels add 0.05%)."""
    numel = 2 ** 20
    codec = _codec(numel, 0.02)
    assert (codec.k, codec.position_bits, codec.uses_bitmap) == (82, 12, False)
    assert codec.nbytes == 256 * 8 + 256 * 82 * 2 // 8 + 256 * 82 * 12 // 8 == 38_784
    assert codec.encode(torch.randn(numel)).numel() == codec.nbytes
    ideal = 0.02 * (2 + 12) / 32
    assert ideal <= codec.nbytes / (4 * numel) <= 1.1 * ideal


@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0])
def test_error_feedback_telescopes(beta):
    """e(t) = beta e(t-1) + delta(t) - s(t), e(0) = 0, unrolls to
    sum_t beta^(T-t) s(t) + e(T) == sum_t beta^(T-t) delta(t) (with beta = 1: sum s + e == sum delta)."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig, ErrorFeedback

    config = DiLoCoConfig(compression="sparseloco", sparse_density=0.05, sparse_chunk=64, error_decay=beta)
    feedback = ErrorFeedback(1000, torch.float64, config)
    generator = torch.Generator().manual_seed(3)
    sent_sum, delta_sum = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for _ in range(8):
        delta = torch.randn(1000, dtype=torch.float64, generator=generator)
        sent = feedback.codec.decode(feedback.compress(delta))
        sent_sum = beta * sent_sum + sent
        delta_sum = beta * delta_sum + delta
    torch.testing.assert_close(sent_sum + feedback.error, delta_sum, rtol=0, atol=1e-12)
    assert feedback.error.abs().max() > 0  # something was held back


@pytest.mark.parametrize("fields, message", [
    ({"compression": "topk"}, "compression=topk: valid: none, sparseloco"),
    ({"sparse_density": 0.0}, "sparse_density=0.0: valid: (0, 1]"),
    ({"sparse_density": 1.5}, "sparse_density=1.5: valid: (0, 1]"),
    ({"sparse_chunk": 0}, "sparse_chunk=0: must be >= 1"),
    ({"sparse_bits": 4}, "sparse_bits=4: valid: 2, 32"),
    ({"error_decay": -0.1}, "error_decay=-0.1: valid: [0, 1]"),
    ({"error_decay": 1.5}, "error_decay=1.5: valid: [0, 1]"),
    ({"compression": "sparseloco", "quantization": "e3m0"}, "quantization=e3m0: must be none with compression="),
])
def test_bad_config_is_one_line_naming_the_field(fields, message):
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    with pytest.raises(ValueError) as err:
        DiLoCoConfig(**fields)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_streaming_diloco_rejects_compression():
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig

    with pytest.raises(ValueError, match=r"^compression=sparseloco: only sync.diloco supports it"):
        StreamingDiLoCoConfig(compression="sparseloco", quantization="none")


def test_options_flow_from_the_command_line():
    from orchestrate.cli import compose_config
    from orchestrate.config import ConfigError
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    base = ["recipe=quickstart", "sync.name=diloco", "sync.diloco.compression=sparseloco"]
    cfg = compose_config([*base, "sync.diloco.sparse_density=0.01", "sync.diloco.error_decay=0.9"],
                         read_inputs=False)
    config = DiLoCoConfig(**cfg.sync.options())
    assert (config.compression, config.sparse_density, config.error_decay, config.sparse_bits) == \
        ("sparseloco", 0.01, 0.9, 2)
    with pytest.raises(ConfigError, match=r"^sync\.diloco\.sparse_bits=8: valid: 2, 32$"):
        compose_config([*base, "sync.diloco.sparse_bits=8"], read_inputs=False)


# ----------------------------------------------------------------------------------------------- gloo ranks


def _sparse_config(**fields):
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    settings = dict(sync_every=3, outer_lr=1.0, compression="sparseloco", sparse_density=0.05, error_decay=0.95)
    settings.update(fields)
    return DiLoCoConfig(**settings)


def _diloco(group, config):
    from orchestrate.parallel.sync.diloco import DiLoCoSync

    model = TinyNet()
    sync = DiLoCoSync(group, config=config)
    sync.wrap_model(model)
    return model, sync, adamw(model)


@contextmanager
def _recorded(module, name):
    """Replace ``module.name`` by a wrapper recording (args, result) of every call."""
    original, calls = getattr(module, name), []

    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                      result.clone() if isinstance(result, torch.Tensor) else None))
        return result

    setattr(module, name, record)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def _equals_plain_diloco(rank, group):
    """Density 1, full precision, beta 0 is DiLoCo with outer SGD(lr, momentum 0), bitwise (momentum settings are
    ignored under sparseloco)."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    plain = _diloco(group, DiLoCoConfig(sync_every=3, outer_lr=0.7, outer_momentum=0.0, nesterov=False))
    sparse = _diloco(group, _sparse_config(outer_lr=0.7, outer_momentum=0.9, nesterov=True, sparse_density=1.0,
                                           sparse_bits=32, error_decay=0.0))
    start, checks = flat_params(sparse[0]), []
    for step in range(9):
        for model, sync, optimizer in (plain, sparse):
            train_step(model, sync, optimizer, step, batch(rank, step))
        if (step + 1) % 3 == 0:
            checks.append({
                "live": all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), sparse[0].parameters())),
                "global": torch.equal(plain[1].fragments[0].global_params, sparse[1].fragments[0].global_params),
                "error_zero": bool((sparse[1].error_feedback[0].error == 0).all()),
                "moved": not torch.equal(flat_params(sparse[0]), start)})
    return checks


def _single_replica(rank):
    """W = 1, density 1, full precision, beta 0: phi <- phi - alpha * (phi - theta) at every outer step."""
    model, sync, optimizer = _diloco(singleton_group(), _sparse_config(
        sync_every=2, outer_lr=0.7, sparse_density=1.0, sparse_bits=32, error_decay=0.0))
    fragment, checks = sync.fragments[0], []
    for step in range(6):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()
        phi = fragment.global_params.clone()
        delta = phi - flat_params(model)
        sync.after_optimizer(step)
        if (step + 1) % 2 == 0:
            expected = torch.add(phi, delta, alpha=-0.7)
            checks.append(torch.equal(fragment.global_params, expected) and torch.equal(flat_params(model), expected))
    return checks, sync.counter.total


def _bytes_and_means(rank, group, world):
    """Per step: bytes counted, pseudo-gradients compressed, messages handed to the all-gather and the mean every
    rank computed; at the end, this replica's error buffer."""
    from orchestrate.parallel import comm
    from orchestrate.parallel.sync import diloco

    model, sync, optimizer = _diloco(group, _sparse_config())
    steps = []
    with _recorded(comm, "all_gather_into") as gathers, _recorded(diloco, "sparse_replica_mean") as means, \
            _recorded(diloco.ErrorFeedback, "compress") as compressed:
        for step in range(9):
            sent, gathers_before, means_before = sync.counter.total, len(gathers), len(means)
            compressed_before = len(compressed)
            train_step(model, sync, optimizer, step, batch(rank, step))
            steps.append({"sent": sync.counter.total - sent,
                          "handed": [args[1] for args, _ in gathers[gathers_before:]],
                          "means": [mean for _, mean in means[means_before:]],
                          "deltas": [args[1] for args, _ in compressed[compressed_before:]],
                          "messages": [message for _, message in compressed[compressed_before:]],
                          "live": fingerprint(model.parameters()),
                          "global": fingerprint([sync.fragments[0].global_params]),
                          "error": fingerprint([sync.error_feedback[0].error])})
    return {"steps": steps, "peak": sync.counter.peak, "nbytes": sync.error_feedback[0].codec.nbytes,
            "numel": sync.fragments[0].numel, "error": sync.error_feedback[0].error.clone()}


def _checkpoint_round_trip(rank, group):
    config = _sparse_config(sync_every=2, sparse_density=0.1)
    model, sync, optimizer = _diloco(group, config)
    for step in range(5):
        train_step(model, sync, optimizer, step, batch(rank, step))
    saved_sync = {k: v.clone() for k, v in sync.state_dict().items()}
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), saved_sync)
    resumed, resumed_sync, resumed_optimizer = _diloco(group, config)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_sync.load_state_dict(saved[2])
    for step in range(5, 11):
        for run in ((model, sync, optimizer), (resumed, resumed_sync, resumed_optimizer)):
            train_step(*run, step, batch(rank, step))
    names = [n for n, _ in model.named_parameters()]
    return {"keys": sorted(saved_sync), "names": names,
            "error_nonzero": bool(any(saved_sync[f"diloco.error.{n}"].abs().max() > 0 for n in names)),
            "live": [fingerprint(m.parameters()) for m in (model, resumed)],
            "state": [fingerprint(s.state_dict().values()) for s in (sync, resumed_sync)]}


def _world2(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"plain": _equals_plain_diloco(rank, group), "single": _single_replica(rank),
            "bytes": _bytes_and_means(rank, group, world), "checkpoint": _checkpoint_round_trip(rank, group)}


def _world4(rank, world):
    import torch.distributed as dist

    return {"bytes": _bytes_and_means(rank, dist.group.WORLD, world)}


def _check_bytes_and_means(results, world):
    """Counted bytes == (W-1) * the bytes handed to the all-gather == (W-1) * the wire format's size; every rank
    gets the bitwise-identical mean, which is the rank-ordered sum of every rank's decoded message over W."""
    config = _sparse_config()
    numel = results[0]["bytes"]["numel"]
    message_bytes = _expected_message_bytes(numel, config.sparse_density, config.sparse_chunk, 2, itemsize=8)
    codec = _codec(numel, config.sparse_density, config.sparse_chunk, 2, torch.float64)
    for result in results:
        data = result["bytes"]
        assert data["nbytes"] == message_bytes
        for step, record in enumerate(data["steps"]):
            if (step + 1) % config.sync_every:
                assert record["sent"] == 0 and not record["handed"]
            else:
                assert [m.numel() for m in record["handed"]] == [message_bytes]
                assert torch.equal(record["handed"][0], record["messages"][0])
                assert record["sent"] == (world - 1) * message_bytes
        assert data["peak"] == (world - 1) * message_bytes
        _check_telescoping(data, codec, config.error_decay)
    per_rank = [r["bytes"]["steps"] for r in results]
    for step_records in zip(*per_rank):
        if not step_records[0]["handed"]:
            continue
        total = torch.zeros(numel, dtype=torch.float64)
        for record in step_records:
            total += codec.decode(record["handed"][0])
        expected = total / world
        for record in step_records:
            assert torch.equal(record["means"][0], expected)
        assert len({r["live"] for r in step_records}) == 1 and len({r["global"] for r in step_records}) == 1
        assert len({r["error"] for r in step_records}) == world  # the error buffers are per replica


def _check_telescoping(data, codec, beta):
    """On real training (float64): sum_t beta^(T-t) s(t) + e(T) == sum_t beta^(T-t) Delta(t)."""
    sent_sum = torch.zeros(codec.numel, dtype=torch.float64)
    delta_sum = torch.zeros(codec.numel, dtype=torch.float64)
    outer_steps = [record for record in data["steps"] if record["deltas"]]
    assert len(outer_steps) == 3
    for record in outer_steps:
        sent_sum = beta * sent_sum + codec.decode(record["messages"][0])
        delta_sum = beta * delta_sum + record["deltas"][0]
    torch.testing.assert_close(sent_sum + data["error"], delta_sum, rtol=0, atol=1e-12)


def test_sparseloco_world2():
    world = 2
    results = run_ranks(world, _world2, timeout_s=120)
    for result in results:
        assert len(result["plain"]) == 3
        for check in result["plain"]:
            assert check == {"live": True, "global": True, "error_zero": True, "moved": True}
        checks, sent = result["single"]
        assert checks == [True] * 3 and sent == 0
        checkpoint = result["checkpoint"]
        assert {f"diloco.error.{n}" for n in checkpoint["names"]} <= set(checkpoint["keys"])
        assert {f"diloco.global.{n}" for n in checkpoint["names"]} <= set(checkpoint["keys"])
        assert not [k for k in checkpoint["keys"] if "momentum" in k]
        assert checkpoint["error_nonzero"]
        assert checkpoint["live"][0] == checkpoint["live"][1] and checkpoint["state"][0] == checkpoint["state"][1]
    _check_bytes_and_means(results, world)


def test_sparseloco_world4():
    world = 4
    _check_bytes_and_means(run_ranks(world, _world4, timeout_s=120), world)
