import numpy as np
import pytest

from orchestrator.data import (ByteTokenizer, ResumableSampler, WindowedTokens, load_tokens, stdlib_source_files,
                               write_token_file)


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
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_tokens("path", str(tmp_path / "missing"), 10)


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
