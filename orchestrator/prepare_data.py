"""``orchestrate prepare-data``: tokenize a corpus once into memory-mapped token shards for ``data.path``.

    orchestrate prepare-data --tokenizer tokenizer.json --out data/tokens corpus/ extra.jsonl
    orchestrate prepare-data --train-tokenizer 8192 --out data/tokens corpus/

Inputs are files or folders (every .txt, .md, .py, .jsonl and .parquet file under them, in sorted order of their
relative POSIX path). A .jsonl line or a .parquet row is one document (its ``--text-field``); any other file is
one UTF-8 document. Each document's tokens are followed by the tokenizer's end-of-document token when it has one.
The last ``--val-fraction`` of the documents (at least one) is the val split; a single document gives the tail
of its tokens instead.

The output folder holds ``tokenizer.json`` (a copy of the tokenizer used; none for ``bytes``), the shards
``train-00000.bin``, ... and ``val-00000.bin``, ... (flat little-endian uint16, or uint32 for vocabularies over
65536 ids) and ``manifest.json`` (``orchestrate.token_shards.TokenManifest``). It is written next to its
destination and renamed into place at the end, so a half-written folder is never visible.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

import numpy as np

from orchestrate.token_shards import MANIFEST_FILE, TokenManifest, Shard, file_dtype, token_dtype_for
from orchestrate.tokenizer import (BYTES_SPEC, MIN_BPE_VOCAB_SIZE, TOKENIZER_FILE, DataError, JsonTokenizer,
                                    Tokenizer, load_tokenizer, train_bpe_tokenizer)

INPUT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
DEFAULT_SHARD_TOKENS = 50_000_000
ENCODE_BATCH_DOCUMENTS = 256
EXIT_BAD_INPUT = 2
DESCRIPTION = ("Tokenize text, .jsonl and .parquet files into token shards with a manifest; train on them with "
               "data.source=path data.path=DIR.")


# ---- documents ------------------------------------------------------------------------------------------

def input_files(inputs: Sequence[str]) -> list[Path]:
    """The files of the inputs, in order: a folder contributes its files with INPUT_SUFFIXES, sorted."""
    files = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix in INPUT_SUFFIXES and p.is_file())
            files += sorted(found, key=lambda p: p.relative_to(path).as_posix())
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {given}: no such file or folder; valid: files or folders of "
                            f"{', '.join(INPUT_SUFFIXES)} files")
    return files


def jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{number}: not valid JSON; valid: one JSON object per line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: no string field '{text_field}' (--text-field names it)")
            yield text


def parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column '{text_field}' (--text-field names it); its columns: "
                        f"{', '.join(columns)}")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row} of column '{text_field}' is {type(text).__name__}, not text")
            row += 1
            yield text


def file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from jsonl_texts(path, text_field)
    elif path.suffix == ".parquet":
        yield from parquet_texts(path, text_field)
    else:
        # a corpus is rarely spotless: a stray non-UTF-8 byte becomes U+FFFD rather than stopping the run
        yield path.read_bytes().decode("utf-8", errors="replace")


def documents(files: Sequence[Path], text_field: str) -> Iterator[str]:
    """Every non-empty document of the files, in order."""
    for path in files:
        yield from (text for text in file_texts(path, text_field) if text)


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of n items (documents, or the tokens of a single one) the val split takes from the end."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(n * val_fraction)))


# ---- tokens and shards ----------------------------------------------------------------------------------

def tokenized(texts: Iterable[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Each document's ids, then its end-of-document id when the tokenizer has one; encoded in batches."""
    end = tokenizer.end_of_document_id
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCUMENTS:
            yield from _encode(batch, tokenizer, end)
            batch = []
    yield from _encode(batch, tokenizer, end)


def _encode(batch: list[str], tokenizer: Tokenizer, end: Optional[int]) -> Iterator[np.ndarray]:
    for ids in tokenizer.encode_batch(batch) if batch else []:
        yield ids if end is None else np.append(ids, end)


class ShardWriter:
    """Appends tokens to ``{split}-00000.bin``, ``{split}-00001.bin``, ... of at most ``shard_tokens`` each."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: str):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = file_dtype(dtype)
        self.shards: list[Shard] = []
        self._file: Optional[BinaryIO] = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shards[-1].tokens == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1].tokens
            self._file.write(tokens[:room].tobytes())
            self.shards[-1] = Shard(self.shards[-1].file, self.shards[-1].tokens + min(room, len(tokens)))
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append(Shard(name, 0))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_splits(texts: Iterable[str], n_documents: int, tokenizer: Tokenizer, folder: Path,
                 val_fraction: float, shard_tokens: int, progress: "DocumentProgress") -> tuple[list, list]:
    """The train and val shards of the documents (``n_documents`` of them); returns their Shard lists."""
    dtype = token_dtype_for(tokenizer.vocab_size)
    train, val = (ShardWriter(folder, split, shard_tokens, dtype) for split in ("train", "val"))
    n_train_documents = n_documents - held_out_count(n_documents, val_fraction)
    try:
        for index, ids in enumerate(tokenized(texts, tokenizer)):
            if n_documents == 1:
                cut = len(ids) - held_out_count(len(ids), val_fraction)
                train.write(ids[:cut])
                val.write(ids[cut:])
            else:
                (train if index < n_train_documents else val).write(ids)
            progress.advance()
    finally:
        train.close()
        val.close()
    return train.shards, val.shards


# ---- the command ----------------------------------------------------------------------------------------

class DocumentProgress:
    """Documents tokenized: a rich progress bar on a terminal, else a plain line at each quarter."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self._bar = None

    def __enter__(self) -> "DocumentProgress":
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("tokenizing documents", total=self.total)
        return self

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.done * 4 // self.total > (self.done - 1) * 4 // self.total:
            print(f"prepare-data: {self.done}/{self.total} documents tokenized", file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def check_options(val_fraction: float, shard_tokens: int, train_vocab: Optional[int]) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction={val_fraction}: valid: 0 <= F < 1")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens={shard_tokens}: valid: a positive number of tokens")
    if train_vocab is not None and train_vocab < MIN_BPE_VOCAB_SIZE:
        raise DataError(f"--train-tokenizer={train_vocab}: valid: a vocabulary size of at least "
                        f"{MIN_BPE_VOCAB_SIZE} (256 bytes + an end-of-text token)")


def check_destination(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(f"--out={out}: exists and is not an empty folder; valid: a new or empty folder")


def prepare(inputs: Sequence[str], out: str, tokenizer_spec: Optional[str] = None,
            train_vocab: Optional[int] = None, val_fraction: float = 0.02,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text", log=None) -> TokenManifest:
    """Write the prepared folder ``out`` (see the module docstring); exactly one of ``tokenizer_spec`` (a spec
    for ``load_tokenizer``) and ``train_vocab`` (train a byte-level BPE of that size on the inputs)."""
    if (tokenizer_spec is None) == (train_vocab is None):
        raise DataError("give one of --tokenizer PATH and --train-tokenizer VOCAB")
    log = log or sys.stderr
    check_options(val_fraction, shard_tokens, train_vocab)
    destination = Path(out).expanduser()
    check_destination(destination)
    tokenizer = load_tokenizer(tokenizer_spec, "--tokenizer") if tokenizer_spec is not None else None
    files = input_files(inputs)
    n_documents = sum(1 for _ in documents(files, text_field))  # also finds bad records before any work
    if n_documents == 0:
        raise DataError(f"inputs {' '.join(inputs)}: no documents; valid: non-empty "
                        f"{', '.join(INPUT_SUFFIXES)} files")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        if tokenizer is None:
            print(f"prepare-data: training a {train_vocab}-token BPE tokenizer on {n_documents} documents",
                  file=log, flush=True)
            tokenizer = train_bpe_tokenizer(documents(files, text_field), train_vocab, staging / TOKENIZER_FILE)
        elif isinstance(tokenizer, JsonTokenizer):
            shutil.copyfile(tokenizer.path, staging / TOKENIZER_FILE)
        with DocumentProgress(n_documents, log) as progress:
            train, val = write_splits(documents(files, text_field), n_documents, tokenizer, staging,
                                      val_fraction, shard_tokens, progress)
        manifest = TokenManifest(tokenizer.hash, tokenizer.vocab_size, token_dtype_for(tokenizer.vocab_size),
                            tuple(train), tuple(val), n_documents, tuple(str(i) for i in inputs))
        if not manifest.train_tokens:
            raise DataError(f"inputs {' '.join(inputs)}: no tokens for the train split")
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(staging, destination)  # an empty destination folder is replaced too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", metavar="PATH",
                           help=f"a tokenizer.json (or a folder holding one), or {BYTES_SPEC}")
    tokenizer.add_argument("--train-tokenizer", metavar="VOCAB", type=int,
                           help="train a byte-level BPE tokenizer of this vocabulary size on the inputs first")
    parser.add_argument("--out", metavar="DIR", required=True, help="the output folder (new or empty)")
    parser.add_argument("--val-fraction", metavar="F", type=float, default=0.02,
                        help="the last fraction of the documents held out for eval_loss (default 0.02)")
    parser.add_argument("--shard-tokens", metavar="N", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:_})")
    parser.add_argument("--text-field", metavar="NAME", default="text",
                        help="the field of .jsonl records and the column of .parquet files (default text)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"files or folders (folders: their {', '.join(INPUT_SUFFIXES)} files)")


def add_command(subparsers) -> None:
    parser = subparsers.add_parser("prepare-data", help="tokenize a corpus into memory-mapped shards for data.path",
                                   description=DESCRIPTION)
    add_arguments(parser)


def run_command(args: argparse.Namespace) -> int:
    try:
        manifest = prepare(args.inputs, args.out, args.tokenizer, args.train_tokenizer, args.val_fraction,
                           args.shard_tokens, args.text_field)
    except DataError as err:
        print(f"orchestrate: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    shards = len(manifest.train) + len(manifest.val)
    print(f"prepared {manifest.train_tokens:,} train + {manifest.val_tokens:,} val tokens ({manifest.dtype}) "
          f"from {manifest.documents} documents in {shards} shards: {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrate prepare-data", description=DESCRIPTION)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
