"""Corpus sources, the windows cut from their tokens, and the deterministic, resumable, data-parallel-sharded
sampler.

Default corpus (``data.source=stdlib``): the ``.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), excluding ``site-packages``, read in sorted order of their relative
POSIX path and joined with a blank line, up to ``data.max_bytes``. Real text that needs no download, and the same
bytes on every machine with the same Python version. ``data.source=path`` reads a text file or a folder of them
the same way, a pre-tokenized ``*.u16`` file, or a folder written by ``orchestrate prepare-data`` (a manifest
and memory-mapped token shards, see ``orchestrator.prepare_data``). Text is tokenized at load time with
``data.tokenizer``.

The token stream is cut into windows of ``seq_len + 1`` tokens at a stride of ``seq_len``; the tail
``data.val_fraction`` of the windows is held out for evaluation (a prepared folder holds out its own val shards
instead). Training samples are window indices drawn from a permutation per epoch seeded by ``(seed, epoch)``. The
sampler's whole state is the number of global samples consumed, so a resume on any data-parallel degree continues
the same sample stream: step s always trains on global samples [s*B, (s+1)*B), and dp rank r takes the r-th
contiguous block of B/dp of them.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from orchestrate.token_shards import (ShardedTokens, is_prepared_folder, open_prepared, read_manifest,
                                       token_dtype_for)
from orchestrate.tokenizer import (BYTES_SPEC, TOKENIZER_FILE, ByteTokenizer, DataError, Tokenizer,
                                    load_tokenizer)

if TYPE_CHECKING:
    import torch

TOKEN_FILE_SUFFIX = ".u16"


# ---- text sources ---------------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    raise DataError(f"data.path={path}: no such file or folder")


def read_corpus_bytes(files: list[Path], max_bytes: int) -> bytes:
    parts, size = [], 0
    for file in files:
        if size >= max_bytes:
            break
        data = file.read_bytes()
        parts.append(data)
        size += len(data) + 2
    return b"\n\n".join(parts)[:max_bytes]


def tokenize_corpus(data: bytes, tokenizer: Tokenizer) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    # the max_bytes cut may split a character: it becomes U+FFFD, like any invalid UTF-8 in the corpus
    ids = tokenizer.encode(data.decode("utf-8", errors="replace"))
    return ids.astype(token_dtype_for(tokenizer.vocab_size))


def write_token_file(tokens: np.ndarray, path: str | Path) -> None:
    """The pre-tokenized format: a flat little-endian uint16 array, memory-mapped when read."""
    np.asarray(tokens, dtype="<u2").tofile(path)


# ---- loading and inspecting -----------------------------------------------------------------------------

TokenSequence = Union[np.ndarray, ShardedTokens]


def _data_path(path: Optional[str]) -> Path:
    if not path:
        raise DataError(f"data.path={path}: data.source=path needs a file or folder")
    return Path(path).expanduser()


def load_tokens(source: str, path: Optional[str], max_bytes: int, tokenizer: str = BYTES_SPEC) -> TokenSequence:
    """The tokens of a source. Text is tokenized with ``tokenizer``; token files and prepared folders are
    memory-mapped (a prepared folder's tokenizer is checked by ``inspect_data``, not here)."""
    if source == "stdlib":
        files = stdlib_source_files()
    else:
        target = _data_path(path)
        if is_prepared_folder(target):
            return open_prepared(target)
        if target.suffix == TOKEN_FILE_SUFFIX and target.is_file():
            return np.memmap(target, dtype="<u2", mode="r")
        files = text_files_under(target)
    data = read_corpus_bytes(files, max_bytes)
    if not data:
        raise DataError(f"data.path={path}: the corpus is empty")
    return tokenize_corpus(data, load_tokenizer(tokenizer))


@dataclass(frozen=True)
class DataInfo:
    vocab_size: int
    tokenizer_hash: str
    tokenizer: str  # the spec, or the prepared folder's tokenizer.json
    description: str


def inspect_data(data_cfg) -> DataInfo:
    """Check ``data_cfg`` (a ``DataConfig``) before anything starts, from file metadata only: no corpus is read
    or tokenized. Raises DataError (one line) for a source that cannot load."""
    if data_cfg.source == "stdlib":
        tokenizer = load_tokenizer(data_cfg.tokenizer)
        description = f"stdlib: the .py files under {stdlib_root()}"  # listing them all here would cost seconds
        return DataInfo(tokenizer.vocab_size, tokenizer.hash, data_cfg.tokenizer, description)
    if data_cfg.source != "path":
        raise DataError(f"data.source={data_cfg.source}: valid: stdlib, path")
    target = _data_path(data_cfg.path)
    where = f"data.path={data_cfg.path}"
    check_readable(target, where)
    if is_prepared_folder(target):
        return inspect_prepared(target, data_cfg.tokenizer)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if target.suffix == TOKEN_FILE_SUFFIX and target.is_file():
        description = describe_token_file(target, where)
    else:
        description = describe_text(target, where)
    return DataInfo(tokenizer.vocab_size, tokenizer.hash, data_cfg.tokenizer, description)


def check_readable(path: Path, where: str) -> None:
    """A folder we may list, or a regular file we can open (FIFOs and devices would block or never end)."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{where}: a broken symbolic link")
    if not path.exists():
        raise DataError(f"{where}: no such file or folder")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise DataError(f"{where}: the folder is not readable")
        return
    if not path.is_file():
        raise DataError(f"{where}: not a regular file or folder (a FIFO, socket or device)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"{where}: cannot read it ({err.strerror})") from None


def describe_token_file(path: Path, where: str) -> str:
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise DataError(f"{where}: {size} bytes is not a whole, non-zero number of uint16 tokens")
    return f"token file {path}: {size // 2:,} tokens"


def describe_text(path: Path, where: str) -> str:
    files = text_files_under(path)
    if not files:
        raise DataError(f"{where}: the folder has no files")
    unreadable = next((f for f in files if not os.access(f, os.R_OK)), None)
    if unreadable is not None:
        raise DataError(f"{where}: {unreadable} is not readable")
    size = sum(f.stat().st_size for f in files)
    if size == 0:
        raise DataError(f"{where}: {'the file is' if path.is_file() else 'every file is'} empty (0 bytes)")
    return f"text under {path}: {len(files)} files, {size:,} bytes"


def inspect_prepared(folder: Path, tokenizer_spec: str) -> DataInfo:
    """A prepared folder's tokenizer is its own; a ``data.tokenizer`` other than bytes must be the same one."""
    where = f"data.path={folder}"
    manifest = read_manifest(folder)
    tokenizer = BYTES_SPEC if manifest.tokenizer_hash == BYTES_SPEC else str(folder / TOKENIZER_FILE)
    if tokenizer != BYTES_SPEC and not (folder / TOKENIZER_FILE).is_file():
        raise DataError(f"{where}: {TOKENIZER_FILE} is missing")
    if tokenizer_spec != BYTES_SPEC:
        given = load_tokenizer(tokenizer_spec)
        if given.hash != manifest.tokenizer_hash:
            raise DataError(f"{where}: prepared with tokenizer {manifest.tokenizer_hash[:12]}, but "
                            f"data.tokenizer={tokenizer_spec} is {given.hash[:12]}")
        tokenizer = tokenizer_spec
    description = (f"prepared {folder}: {manifest.train_tokens:,} train tokens in {len(manifest.train)} shards, "
                   f"{manifest.val_tokens:,} val tokens, {manifest.dtype}")
    return DataInfo(manifest.vocab_size, manifest.tokenizer_hash, tokenizer, description)


# ---- windows and sampling -------------------------------------------------------------------------------

def _window_count(tokens: TokenSequence, seq_len: int) -> int:
    return max(len(tokens) - 1, 0) // seq_len


@dataclass(frozen=True)
class WindowedTokens:
    """Windows of seq_len+1 tokens at stride seq_len; [0, n_train) train, [n_train, n_windows) eval.

    The eval windows are the tail ``val_fraction`` of the windows of ``tokens``, or, when there is a held-out
    split, the windows of that split: ``held_out`` if given, else the ``held_out`` that a prepared folder's
    tokens carry (so ``WindowedTokens(load_tokens(...), seq_len, val_fraction)`` serves every source)."""

    tokens: TokenSequence
    seq_len: int
    val_fraction: float
    held_out: Optional[TokenSequence] = None

    def __post_init__(self):
        if self.held_out is None:
            object.__setattr__(self, "held_out", getattr(self.tokens, "held_out", None))

    @property
    def n_windows(self) -> int:
        n = _window_count(self.tokens, self.seq_len)
        return n if self.held_out is None else n + _window_count(self.held_out, self.seq_len)

    @property
    def n_train(self) -> int:
        if self.held_out is not None:
            return _window_count(self.tokens, self.seq_len)
        n_val = int(self.n_windows * self.val_fraction)
        return self.n_windows - n_val

    def window(self, window_id: int) -> np.ndarray:
        tokens, index = self.tokens, window_id
        if self.held_out is not None and window_id >= self.n_train:
            tokens, index = self.held_out, window_id - self.n_train
        start = index * self.seq_len
        return np.asarray(tokens[start: start + self.seq_len + 1])

    def batch(self, window_ids: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(inputs, targets): int64 tensors of shape (len(window_ids), seq_len)."""
        import torch  # here, not at the top: prepare-data imports this module and needs no torch

        rows = np.stack([self.window(int(i)) for i in window_ids])
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
