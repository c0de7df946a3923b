"""Tokenizers: the built-in byte tokenizer and Hugging Face ``tokenizers`` files (tokenizer.json).

A tokenizer is named by a spec: ``bytes`` or a path to a tokenizer.json (or a folder holding one). Its ``hash``
identifies the token ids it produces: ``"bytes"``, or the sha256 of the tokenizer.json bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

BYTES_SPEC = "bytes"
TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# special tokens that end a document, in order of preference; the first one a tokenizer has separates documents
END_OF_DOCUMENT_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")
MIN_BPE_VOCAB_SIZE = 257  # the 256 byte symbols + <|endoftext|>


class DataError(ValueError):
    """Bad data or tokenizer input; the message is one line naming the bad value and what is valid."""


class ByteTokenizer:
    vocab_size = 256
    name = BYTES_SPEC
    hash = BYTES_SPEC
    end_of_document_id: Optional[int] = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face ``tokenizers`` file. Encoding adds no special tokens: documents are separated by the
    caller (see ``end_of_document_id``)."""

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer

        self.path = Path(path)
        file_bytes = self.path.read_bytes()
        self._tokenizer = Tokenizer.from_str(file_bytes.decode("utf-8"))
        self.name = str(self.path)
        self.hash = hashlib.sha256(file_bytes).hexdigest()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.end_of_document_id = self._end_of_document_id()

    def _end_of_document_id(self) -> Optional[int]:
        special = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        return next((special[token] for token in END_OF_DOCUMENT_TOKENS if token in special), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = Union[ByteTokenizer, JsonTokenizer]


def load_tokenizer(spec: str, setting: str = "data.tokenizer") -> Tokenizer:
    """``bytes`` or a path to a tokenizer.json (or a folder holding one); ``setting`` names the option in errors."""
    if spec == BYTES_SPEC:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    valid = f"valid: {BYTES_SPEC} or a path to a {TOKENIZER_FILE}"
    if not path.is_file():
        raise DataError(f"{setting}={spec}: no such file; {valid}")
    try:
        return JsonTokenizer(path)
    except OSError as err:
        raise DataError(f"{setting}={spec}: cannot read it ({err.strerror}); {valid}") from None
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{setting}={spec}: not a valid {TOKENIZER_FILE} ({reason}); {valid}") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: Union[str, Path]) -> JsonTokenizer:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` as its only special token, trained on ``texts`` and
    saved to ``out_path``. The same texts and vocab_size give the same file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size}: valid: at least {MIN_BPE_VOCAB_SIZE} (256 bytes + {END_OF_TEXT})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(out_path))
    return JsonTokenizer(out_path)
