"""Model families, one folder each (``orchestrate.models.<name>``, picked by ``model.name``). A family's package
gives ``build(cfg, seed, max_seq_len)``, its config type, ``PARTS`` (how the parallel mechanisms apply to it:
orchestrate.parallel.model_parts), ``validate_tp(cfg, tp, local_seq_len)``, the loss, and its Hugging Face
conversion (``load_hf_into``, ``read_hf``, ``export_hf``). Adding a family means adding a folder."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def family_names() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


def family(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")
