"""What a run reads before it starts: a Hugging Face model to start from, the data and its tokenizer.

Checked and folded into a derived config before Ray starts or a run directory exists, so bad input is one line and
exit code 2 with nothing started. The model section follows the Hugging Face folder's ``config.json`` (an
explicit command-line value that disagrees is an error naming both); the vocabulary follows the tokenizer; the
tokenizer's hash is recorded in the config, so a resume on data made with another tokenizer is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Iterable

from orchestrate.models import family
from orchestrate.checkpoint.universal import CheckpointError
from orchestrate.config import Config, ConfigError, derive
from orchestrate.data import DataError, inspect_data

HF_TOKENIZER_FILE = "tokenizer.json"
BYTES = "bytes"


def explicit_keys(overrides: Iterable[str]) -> set[str]:
    """The config keys set on the command line (``key=value``)."""
    return {o.split("=", 1)[0].strip().lstrip("+~") for o in overrides if "=" in o}


def apply_init_from(cfg: Config, explicit: Collection[str]) -> Config:
    """``model.init_from``: the model section becomes the folder's; its weights are checked (headers only)."""
    if not cfg.model.init_from:
        return cfg
    try:
        source = family(cfg.model.name).read_hf(cfg.model.init_from)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    changes = {"model.init_from": str(source.folder)}
    for key, theirs in source.model_values.items():
        ours = getattr(cfg.model, key)
        if f"model.{key}" in explicit and ours != theirs:
            raise ConfigError(f"model.{key}={ours}: conflicts with model.init_from={source.folder}, whose "
                              f"config.json gives {theirs}")
        changes[f"model.{key}"] = theirs
    tokenizer = source.folder / HF_TOKENIZER_FILE
    if tokenizer.is_file() and "data.tokenizer" not in explicit and cfg.data.tokenizer == BYTES:
        changes["data.tokenizer"] = str(tokenizer)  # the model's own tokenizer, unless the user names another
    return derive(cfg, changes)


def apply_data(cfg: Config, explicit: Collection[str]) -> Config:
    """The data is there and readable; the vocabulary follows its tokenizer; its hash is recorded. A config that
    already records a hash (a resume) must read data made with the same tokenizer."""
    try:
        info = inspect_data(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None
    recorded = cfg.data.tokenizer_hash
    if recorded is not None and recorded != info.tokenizer_hash:
        raise ConfigError(f"data.path={cfg.data.path}: tokenized with {_short(info.tokenizer_hash)}, but the "
                          f"checkpoint was trained on tokens of {_short(recorded)}; use data made with the "
                          f"checkpoint's tokenizer")
    model_is_given = "model.vocab_size" in explicit or bool(cfg.model.init_from) or recorded is not None
    if model_is_given and cfg.model.vocab_size < info.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({info.vocab_size}, {info.description})")
    vocab_size = cfg.model.vocab_size if model_is_given else info.vocab_size
    return derive(cfg, {"model.vocab_size": vocab_size, "data.tokenizer_hash": info.tokenizer_hash})


def _short(tokenizer_hash: str) -> str:
    return tokenizer_hash if tokenizer_hash == BYTES else f"tokenizer {tokenizer_hash[:12]}"


def resolve_inputs(cfg: Config, explicit: Collection[str]) -> Config:
    return apply_data(apply_init_from(cfg, explicit), explicit)


def tokenizer_file(data_section: dict) -> Path | None:
    """The tokenizer.json a run's data section used, if it still exists: ``data.tokenizer``, or the one a
    prepared data folder carries (for ``export``, which puts it next to the weights)."""
    candidates = [data_section.get("tokenizer") or BYTES, data_section.get("path") or ""]
    for spec in candidates:
        if not spec or spec == BYTES:
            continue
        path = Path(spec)
        path = path / HF_TOKENIZER_FILE if path.is_dir() else path
        if path.name == HF_TOKENIZER_FILE and path.is_file():
            return path
    return None
