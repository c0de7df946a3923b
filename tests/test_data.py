import numpy as np
import pytest

from orchestrate.data import (ByteTokenizer, DataError, ResumableSampler, ShardedTokens, WindowedTokens,
                               eval_window_ids, load_tokens, stdlib_source_files, write_token_file)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("A")[0] == 65


def test_stdlib_corpus_is_real_text_and_deterministic():
    files = stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    a, b = load_tokens("stdlib", None, 200_000), load_tokens("stdlib", None, 200_000)
    assert len(a) == 200_000 and np.array_equal(a, b)
    assert "import" in ByteTokenizer().decode(a[:20_000])


def test_path_sources_text_folder_and_token_file(tmp_path):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.txt").write_text("hello")
    assert ByteTokenizer().decode(load_tokens("path", str(tmp_path), 1000)) == "hello\n\nworld"
    token_file = tmp_path / "corpus.u16"
    write_token_file(np.arange(1000) % 300, token_file)
    tokens = load_tokens("path", str(token_file), 0)
    assert isinstance(tokens, np.memmap) and tokens[299] == 299 and tokens[300] == 0
    with pytest.raises(DataError, match="data.path"):
        load_tokens("path", str(tmp_path / "missing"), 10)
    with pytest.raises(DataError, match="data.path=None"):
        load_tokens("path", None, 10)


def _stream(dp: int, steps: int, global_batch: int = 8, seed: int = 0, consumed: int = 0) -> list[list[int]]:
    samplers = [ResumableSampler(50, global_batch, r, dp, seed, consumed) for r in range(dp)]
    return [sum((s.next_window_ids().tolist() for s in samplers), []) for _ in range(steps)]


def test_sampler_shards_cover_the_global_batch_on_any_dp():
    one, two, four = _stream(1, 20), _stream(2, 20), _stream(4, 20)
    assert one == two == four  # the same global sample stream, whatever the data-parallel degree
    epoch = sum(one[:7], [])[:50]
    assert sorted(epoch) == list(range(50))  # a permutation per epoch
    assert _stream(1, 3, seed=1) != one[:3]


def test_sampler_resumes_on_another_layout():
    stream = _stream(2, 12)
    sampler = ResumableSampler(50, 8, 0, 2, 0)
    for _ in range(5):
        sampler.next_window_ids()
    state = sampler.state_dict()
    assert state == {"consumed": 40}
    assert _stream(4, 7, consumed=state["consumed"]) == stream[5:]


def test_windows_and_validation_split():
    data = WindowedTokens(np.arange(101, dtype=np.uint16), seq_len=10, val_fraction=0.2)
    assert data.n_windows == 10 and data.n_train == 8
    inputs, targets = data.batch(np.array([0, 3]))
    assert inputs.shape == (2, 10) and inputs[1, 0] == 30 and targets[1, -1] == 40


def test_tail_split_is_unchanged_for_single_arrays():
    """Sources without a held-out split keep the val_fraction tail: same counts, same eval batches as before."""
    data = WindowedTokens(np.arange(1001, dtype=np.uint16), seq_len=10, val_fraction=0.1)
    assert data.held_out is None and (data.n_windows, data.n_train) == (100, 90)
    batches = eval_window_ids(data, 2, global_batch=4, dp_rank=1, dp_size=2)
    assert [b.tolist() for b in batches] == [[92, 93], [96, 97]]
    inputs, _ = data.batch(batches[0])
    assert inputs[0, 0] == 920


def test_sharded_tokens_slice_across_shards():
    shards = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 20)]
    tokens = ShardedTokens(shards)
    assert len(tokens) == 20 and tokens[0] == 0 and tokens[12] == 12 and tokens[-1] == 19
    for start, stop in [(0, 20), (3, 14), (5, 12), (4, 5), (13, 19), (7, 7), (15, 40)]:
        assert np.array_equal(tokens[start:stop], np.arange(20)[start:stop])
    with pytest.raises(IndexError):
        tokens[20]
    with pytest.raises(IndexError):
        tokens[0:10:2]


def test_windows_over_an_explicit_held_out_split():
    train, val = np.arange(0, 41), np.arange(1000, 1021)
    data = WindowedTokens(ShardedTokens([train[:17], train[17:]]), seq_len=10, val_fraction=0.5,
                          held_out=ShardedTokens([val]))
    assert (data.n_train, data.n_windows) == (4, 6)  # val_fraction is not used: the split is given
    assert np.array_equal(data.window(1), train[10:21])  # crosses the shard boundary
    assert np.array_equal(data.window(4), val[:11]) and np.array_equal(data.window(5), val[10:21])
    ids = np.concatenate(eval_window_ids(data, 3, global_batch=2, dp_rank=0, dp_size=1))
    assert set(ids.tolist()) == {4, 5}
    inputs, targets = data.batch(np.array([5, 0]))
    assert inputs[0, 0] == 1010 and targets[0, -1] == 1020 and inputs[1, 0] == 0
    assert ResumableSampler(data.n_train, 2, 0, 1, 0).next_window_ids().max() < data.n_train
