import itertools
import logging

import numpy as np
import pytest
import torch

from orchestrate.checkpoint import erasure
from orchestrate.checkpoint.erasure import NumpyKernel, ReedSolomon, join_shards, split_into_shards

ISAL = erasure.load_isal()
needs_isal = pytest.mark.skipif(ISAL is None, reason="no ISA-L library found")
GROUPS = [(4, 2), (3, 1), (2, 2)]


def kernels():
    return [NumpyKernel()] + ([erasure.IsalKernel(*ISAL)] if ISAL else [])


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@needs_isal
@pytest.mark.parametrize("k,m", GROUPS + [(10, 4), (1, 1), (16, 16)])
def test_isal_generator_is_the_numpy_cauchy_matrix(k, m):
    assert np.array_equal(ReedSolomon(k, m).generator, erasure.cauchy_generator(k, m))


@needs_isal
@pytest.mark.parametrize("k,m", GROUPS + [(10, 4)])
@pytest.mark.parametrize("length", [1, 63, 64, 1001, (1 << 20) + 37])
def test_native_and_numpy_parity_bytes_are_identical(k, m, length):
    data = [random_bytes(length, seed=i) for i in range(k)]
    native = ReedSolomon(k, m).encode(data)
    oracle = ReedSolomon(k, m, NumpyKernel()).encode(data)
    for got, want in zip(native, oracle):
        np.testing.assert_array_equal(got, want)


@needs_isal
def test_native_and_numpy_matrix_inverse_agree():
    generator = erasure.cauchy_generator(4, 2)
    for rows in itertools.combinations(range(6), 4):
        submatrix = generator[list(rows)]
        native = erasure.IsalKernel(*ISAL).invert(submatrix)
        np.testing.assert_array_equal(native, erasure.gf_invert_matrix(submatrix))


@pytest.mark.parametrize("kernel", kernels(), ids=lambda kernel: kernel.name)
@pytest.mark.parametrize("k,m", GROUPS)
@pytest.mark.parametrize("total_len", [1, 7, 4099])
def test_every_pattern_of_up_to_m_losses_rebuilds_the_original(kernel, k, m, total_len):
    original = random_bytes(total_len, seed=total_len)
    codec = ReedSolomon(k, m, kernel)
    data, layout = split_into_shards(original, k)
    every_shard = data + codec.encode(data)
    for lost_count in range(m + 1):
        for lost in itertools.combinations(range(codec.n), lost_count):
            survivors = {i: shard for i, shard in enumerate(every_shard) if i not in lost}
            rebuilt = codec.decode(survivors, layout.shard_len)
            np.testing.assert_array_equal(join_shards(rebuilt, layout), original, err_msg=f"lost {lost}")


@pytest.mark.parametrize("k,m", GROUPS)
def test_more_than_m_losses_raise(k, m):
    codec = ReedSolomon(k, m)
    data, layout = split_into_shards(random_bytes(100), k)
    every_shard = data + codec.encode(data)
    survivors = {i: every_shard[i] for i in range(k - 1)}
    message = f"lost {m + 1} of {k + m} shards; group of k={k}, m={m} survives at most {m}"
    with pytest.raises(ValueError, match=message):
        codec.decode(survivors, layout.shard_len)


@pytest.mark.parametrize("total_len,k,padding", [(0, 4, 0), (1, 4, 3), (5, 4, 3), (8, 4, 0), (11, 3, 1)])
def test_split_records_padding_and_join_drops_it(total_len, k, padding):
    original = random_bytes(total_len)
    shards, layout = split_into_shards(original, k)
    assert layout.padding == padding and len(shards) == k
    assert all(shard.nbytes == layout.shard_len for shard in shards)
    np.testing.assert_array_equal(join_shards(shards, layout), original)


def test_full_shards_are_views_of_the_buffer():
    original = random_bytes(4 * 1000 - 3)
    shards, layout = split_into_shards(original, 4)
    assert all(np.shares_memory(shard, original) for shard in shards[:3])
    assert not np.shares_memory(shards[3], original)  # the padded tail is a copy
    out = np.empty(layout.total_len, dtype=np.uint8)
    assert np.shares_memory(join_shards(shards, layout, out=out), out)
    np.testing.assert_array_equal(out, original)


def test_encode_into_writes_into_the_given_buffers():
    codec = ReedSolomon(4, 2)
    data = [random_bytes(4096, seed=i) for i in range(4)]
    parity = [np.zeros(4096, dtype=np.uint8), torch.zeros(4096, dtype=torch.uint8)]
    addresses = [parity[0].ctypes.data, parity[1].data_ptr()]
    codec.encode_into(data, parity)
    assert [parity[0].ctypes.data, parity[1].data_ptr()] == addresses
    expected = codec.encode(data)
    np.testing.assert_array_equal(parity[0], expected[0])
    np.testing.assert_array_equal(parity[1].numpy(), expected[1])


def test_decode_writes_rebuilt_shards_into_out_and_returns_survivors_as_given():
    codec = ReedSolomon(4, 2)
    data = [random_bytes(512, seed=i) for i in range(4)]
    parity = codec.encode(data)
    destination = {0: np.empty(512, dtype=np.uint8), 2: bytearray(512)}
    survivors = {1: data[1], 3: data[3], 4: parity[0], 5: parity[1]}
    rebuilt = codec.decode(survivors, 512, out=destination)
    assert rebuilt[1] is data[1] and rebuilt[3] is data[3]
    assert np.shares_memory(rebuilt[0], destination[0])
    np.testing.assert_array_equal(destination[0], data[0])
    np.testing.assert_array_equal(np.frombuffer(destination[2], dtype=np.uint8), data[2])


def test_float_torch_tensors_are_coded_as_their_bytes():
    codec = ReedSolomon(2, 2)
    weights = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    data = [weights[0], weights[1]]
    parity = codec.encode(data)
    rebuilt = codec.decode({2: parity[0], 3: parity[1]}, weights[0].nbytes)
    restored = torch.from_numpy(np.concatenate(rebuilt)).view(torch.float32).view(2, 1000)
    assert torch.equal(restored, weights)


def test_shards_longer_than_one_native_call_are_sliced(monkeypatch):
    monkeypatch.setattr(erasure, "_MAX_SLICE", 4096)
    data = [random_bytes(3 * 4096 + 5, seed=i) for i in range(4)]
    sliced = ReedSolomon(4, 2).encode(data)
    oracle = ReedSolomon(4, 2, NumpyKernel()).encode(data)
    for got, want in zip(sliced, oracle):
        np.testing.assert_array_equal(got, want)


def test_bad_buffers_are_rejected():
    codec = ReedSolomon(4, 2)
    data = [random_bytes(64, seed=i) for i in range(4)]
    with pytest.raises(ValueError, match="equal length"):
        codec.encode(data[:3] + [random_bytes(65)])
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.encode(data[:3] + [random_bytes(128)[::2]])
    with pytest.raises(ValueError, match="writable"):
        codec.encode_into(data, [bytes(64), bytes(64)])
    with pytest.raises(ValueError, match="expected 64"):
        codec.decode({0: data[0], 1: data[1], 2: data[2], 3: random_bytes(65)}, 64)
    with pytest.raises(ValueError, match="k \\+ m <= 256"):
        ReedSolomon(200, 57)


def test_missing_library_falls_back_to_numpy_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(erasure, "_library_candidates", lambda: ["/nonexistent/libisal.so"])
    erasure.load_isal.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=erasure.__name__):
            assert ReedSolomon(4, 2).backend == "numpy"
            assert ReedSolomon(3, 1).backend == "numpy"
        assert sum("ISA-L not found" in record.message for record in caplog.records) == 1
    finally:
        erasure.load_isal.cache_clear()
