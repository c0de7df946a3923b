"""Byte-level tokenizer, corpus sources and the deterministic, resumable, data-parallel-sharded sampler.

Default corpus (``data.source=stdlib``): the ``.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), excluding ``site-packages``, read in sorted order of their relative
POSIX path and joined with a blank line, up to ``data.max_bytes``. Real text that needs no download, and the same
bytes on every machine with the same Python version.

The token stream is cut into windows of ``seq_len + 1`` tokens at a stride of ``seq_len``; the tail
``data.val_fraction`` of the windows is held out for evaluation. Training samples are window indices drawn from
a permutation per epoch seeded by ``(seed, epoch)``. The sampler's whole state is the number of global samples
consumed, so a resume on any data-parallel degree continues the same sample stream: step s always trains on
global samples [s*B, (s+1)*B), and dp rank r takes the r-th contiguous block of B/dp of them.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

TOKEN_FILE_SUFFIX = ".u16"


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    raise FileNotFoundError(f"data.path={path}: no such file or folder")


def read_corpus_bytes(files: list[Path], max_bytes: int) -> bytes:
    parts, size = [], 0
    for file in files:
        if size >= max_bytes:
            break
        data = file.read_bytes()
        parts.append(data)
        size += len(data) + 2
    return b"\n\n".join(parts)[:max_bytes]


def write_token_file(tokens: np.ndarray, path: str | Path) -> None:
    """The pre-tokenized format: a flat little-endian uint16 array, memory-mapped when read."""
    np.asarray(tokens, dtype="<u2").tofile(path)


def load_tokens(source: str, path: Optional[str], max_bytes: int) -> np.ndarray:
    if source == "stdlib":
        files = stdlib_source_files()
    else:
        target = Path(path).expanduser()
        if target.suffix == TOKEN_FILE_SUFFIX and target.is_file():
            return np.memmap(target, dtype="<u2", mode="r")
        files = text_files_under(target)
    data = read_corpus_bytes(files, max_bytes)
    if not data:
        raise ValueError(f"data.path={path}: the corpus is empty")
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


@dataclass(frozen=True)
class WindowedTokens:
    """Windows of seq_len+1 tokens at stride seq_len over a token array; [0, n_train) train, the rest eval."""

    tokens: np.ndarray
    seq_len: int
    val_fraction: float

    @property
    def n_windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    @property
    def n_train(self) -> int:
        n_val = int(self.n_windows * self.val_fraction)
        return self.n_windows - n_val

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1])
                         for i in window_ids])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class ResumableSampler:
    """Deterministic global sample stream, sharded in contiguous blocks over data-parallel ranks."""

    def __init__(self, n_windows: int, global_batch: int, dp_rank: int, dp_size: int, seed: int,
                 consumed: int = 0):
        if n_windows < 1:
            raise ValueError("the corpus is shorter than one sequence (lower train.seq_len or add data)")
        if global_batch % dp_size:
            raise ValueError(f"train.global_batch_size={global_batch} not divisible by parallel.dp={dp_size}")
        self.n_windows, self.global_batch = n_windows, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = consumed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _window(self, sample: int) -> int:
        epoch = sample // self.n_windows
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return int(self._order[sample % self.n_windows])

    def next_window_ids(self) -> np.ndarray:
        local = self.global_batch // self.dp_size
        first = self.consumed + self.dp_rank * local
        ids = np.array([self._window(s) for s in range(first, first + local)], dtype=np.int64)
        self.consumed += self.global_batch
        return ids

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


def eval_window_ids(data: WindowedTokens, n_batches: int, global_batch: int, dp_rank: int,
                    dp_size: int) -> list[np.ndarray]:
    """Fixed held-out batches (the first eval windows, in order), the same for every run and layout."""
    local = global_batch // dp_size
    n_val = data.n_windows - data.n_train
    batches = []
    for b in range(n_batches):
        first = data.n_train + (b * global_batch + dp_rank * local) % max(n_val, 1)
        ids = [data.n_train + (first - data.n_train + j) % max(n_val, 1) for j in range(local)]
        batches.append(np.array(ids, dtype=np.int64))
    return batches
