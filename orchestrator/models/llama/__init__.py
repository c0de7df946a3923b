"""Llama: the model (model.py), how tensor, pipeline and context parallelism apply to it (parallel_plan.py), and
its Hugging Face conversion both ways (hf_import.py, hf_export.py, one name map)."""
from orchestrate.models.llama.hf_export import export_hf
from orchestrate.models.llama.hf_import import load_hf_into, read_hf_llama as read_hf
from orchestrate.models.llama.model import (DEFAULT_MAX_SEQ_LEN, Llama, LlamaConfig, apply_rope, build_llama,
                                            cross_entropy_loss, rope_tables)
from orchestrate.models.llama.parallel_plan import PARTS, validate_tp

build = build_llama
Config = LlamaConfig

__all__ = ["DEFAULT_MAX_SEQ_LEN", "PARTS", "Config", "Llama", "LlamaConfig", "apply_rope", "build", "build_llama",
           "cross_entropy_loss", "export_hf", "load_hf_into", "read_hf", "rope_tables", "validate_tp"]
