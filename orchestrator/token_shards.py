"""The token-shard folder ``orchestrate prepare-data`` writes: ``manifest.json`` (tokenizer hash, vocabulary,
dtype, shard list), the train and val shards (flat little-endian uint16/uint32 arrays), the tokenizer.json.
Read through memory maps: a corpus of any size costs no memory until its tokens are used."""
from __future__ import annotations

import json
import operator
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from orchestrate.tokenizer import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "orchestrate-tokens/1"
TOKEN_DTYPES = ("uint16", "uint32")

def token_dtype_for(vocab_size: int) -> str:
    """The smallest stored dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def file_dtype(name: str) -> np.dtype:
    """Token files are little-endian whatever the machine."""
    return np.dtype(name).newbyteorder("<")



@dataclass(frozen=True)
class Shard:
    file: str
    tokens: int


@dataclass(frozen=True)
class TokenManifest:
    """``manifest.json`` of a folder written by ``orchestrate prepare-data``."""

    tokenizer_hash: str
    vocab_size: int
    dtype: str
    train: tuple[Shard, ...]
    val: tuple[Shard, ...]
    documents: int
    inputs: tuple[str, ...]

    @property
    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(s.tokens for s in self.val)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "tokenizer_hash": self.tokenizer_hash, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "train": [asdict(s) for s in self.train], "val": [asdict(s) for s in self.val],
                "train_tokens": self.train_tokens, "val_tokens": self.val_tokens, "documents": self.documents,
                "inputs": list(self.inputs)}

    @classmethod
    def from_json(cls, raw: Any) -> "TokenManifest":
        """Raises ValueError naming the first field that is missing or wrong."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        if raw.get("dtype") not in TOKEN_DTYPES:
            raise ValueError(f"dtype {raw.get('dtype')!r}, expected one of {', '.join(TOKEN_DTYPES)}")
        manifest = cls(_field(raw, "tokenizer_hash", str), _field(raw, "vocab_size", int), raw["dtype"],
                       _shards(raw, "train"), _shards(raw, "val"), _field(raw, "documents", int),
                       tuple(str(i) for i in _field(raw, "inputs", list)))
        for split in ("train", "val"):
            if _field(raw, f"{split}_tokens", int) != getattr(manifest, f"{split}_tokens"):
                raise ValueError(f"{split}_tokens {raw[f'{split}_tokens']} is not the sum of its shards' tokens")
        if not manifest.train_tokens:
            raise ValueError("no train tokens")
        if not 0 < manifest.vocab_size or token_dtype_for(manifest.vocab_size) != manifest.dtype:
            raise ValueError(f"vocab_size {manifest.vocab_size} does not fit dtype {manifest.dtype}")
        return manifest


def _field(raw: dict, key: str, kind: type) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"'{key}' is missing or not a {kind.__name__}")
    return value


def _shards(raw: dict, split: str) -> tuple[Shard, ...]:
    shards = []
    for entry in _field(raw, split, list):
        if not isinstance(entry, dict):
            raise ValueError(f"an entry of '{split}' is not an object")
        file, tokens = _field(entry, "file", str), _field(entry, "tokens", int)
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"shard file {file!r} is not a plain file name")
        shards.append(Shard(file, tokens))
    return tuple(shards)


def is_prepared_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).exists()


def read_manifest(folder: Path) -> TokenManifest:
    """The folder's manifest, after checking that every shard it lists is there with the size it says."""
    where = f"data.path={folder}"
    try:
        manifest = TokenManifest.from_json(json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")))
    except OSError as err:
        raise DataError(f"{where}: cannot read {MANIFEST_FILE} ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise DataError(f"{where}: {MANIFEST_FILE} is malformed ({err})") from None
    itemsize = file_dtype(manifest.dtype).itemsize
    for shard in manifest.train + manifest.val:
        file = folder / shard.file
        if not file.is_file() or not os.access(file, os.R_OK):
            raise DataError(f"{where}: {MANIFEST_FILE} lists {shard.file}, which is missing or unreadable")
        size = file.stat().st_size
        if size != shard.tokens * itemsize:
            raise DataError(f"{where}: {shard.file} has {size} bytes, the manifest says {shard.tokens} "
                            f"{manifest.dtype} tokens ({shard.tokens * itemsize} bytes)")
    return manifest


class ShardedTokens:
    """One read-only token sequence over memory-mapped shards: ``len()``, indexing and contiguous slices, which
    copy only the tokens they span. ``held_out``: a prepared folder's val split, kept with its train split."""

    def __init__(self, shards: Sequence[np.ndarray], held_out: Optional["ShardedTokens"] = None):
        self.shards = tuple(shards)
        self.held_out = held_out
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens slices must be contiguous")
            return self._span(start, stop)
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"token {index} out of range for {len(self)} tokens")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.shards[k][i - self._starts[k]]

    def _span(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, self._starts[k]), min(stop, self._starts[k + 1])
            if lo < hi:
                pieces.append(shard[lo - self._starts[k]: hi - self._starts[k]])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)


def open_prepared(folder: Path) -> ShardedTokens:
    """The train shards of a prepared folder, with its val shards as ``held_out``, all memory-mapped."""
    manifest = read_manifest(folder)
    dtype = file_dtype(manifest.dtype)

    def mapped(split: tuple[Shard, ...]) -> list[np.ndarray]:
        # np.memmap cannot map an empty file
        return [np.memmap(folder / s.file, dtype=dtype, mode="r") if s.tokens else np.empty(0, dtype)
                for s in split]

    return ShardedTokens(mapped(manifest.train), held_out=ShardedTokens(mapped(manifest.val)))
