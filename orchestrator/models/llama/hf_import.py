"""Read a Hugging Face Llama folder (``config.json`` + safetensors, sharded or not) as our Llama's weights.

The inverse of ``hf_export``: the same name map, and q/k rows reordered back from HF's rotate_half RoPE
layout to our interleaved pairs. ``read_hf_llama`` checks the folder without reading a tensor (the config and
the safetensors headers), so a wrong architecture, a missing tensor or a wrong shape is reported before a run
starts; ``load_hf_weights`` then reads the tensors (memory-mapped by safetensors) as float32.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from orchestrate.models.llama.hf_export import CONFIG_FILE, WEIGHTS_FILE, LlamaHyperParameters, expected_shape, weight_names
from orchestrate.checkpoint.universal import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"


# our model section's key -> the field of the folder's hyper-parameters it takes its value from
MODEL_KEYS_FROM_HF = {"vocab_size": "vocab_size", "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
                      "n_kv_heads": "n_kv_heads", "ffn_hidden": "hidden_dim", "rope_theta": "rope_theta",
                      "norm_eps": "norm_eps", "tie_embeddings": "tie_embeddings"}


@dataclass(frozen=True)
class HFLlama:
    folder: Path
    hp: LlamaHyperParameters
    files: dict[str, Path]  # HF tensor name -> the safetensors file that holds it

    @property
    def model_values(self) -> dict[str, Any]:
        """The run's ``model`` section as this folder's config.json gives it (key -> value)."""
        return {key: getattr(self.hp, attribute) for key, attribute in MODEL_KEYS_FROM_HF.items()}


def _error(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"model.init_from={folder}: {problem}")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise _error(folder, "not a folder (valid: a Hugging Face Llama folder with config.json and safetensors)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise _error(folder, f"no {CONFIG_FILE}") from None
    except (OSError, ValueError) as err:
        raise _error(folder, f"{CONFIG_FILE} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise _error(folder, f"{CONFIG_FILE} is not a JSON object")
    return config


def _check_llama(folder: Path, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" and LLAMA_ARCHITECTURE not in architectures:
        found = ", ".join(architectures) or config.get("model_type") or "no architecture"
        raise _error(folder, f"{CONFIG_FILE} describes {found}; valid: {LLAMA_ARCHITECTURE} (model_type llama)")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
        "rope_scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
    }
    if bad := [key for key, is_bad in unsupported.items() if is_bad]:
        values = ", ".join(f"{key}={config.get(key)!r}" for key in bad)
        raise _error(folder, f"{values}: not supported (valid: silu, no biases, default RoPE)")


def hyper_parameters(folder: Path, config: dict[str, Any]) -> LlamaHyperParameters:
    _check_llama(folder, config)
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        hp = LlamaHyperParameters(
            vocab_size=int(config["vocab_size"]), dim=dim, hidden_dim=int(config["intermediate_size"]),
            n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=int(config.get("max_position_embeddings", 2048)))
    except KeyError as err:
        raise _error(folder, f"{CONFIG_FILE} lacks {err.args[0]!r}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise _error(folder, f"head_dim={head_dim}: not supported (valid: hidden_size / num_attention_heads = "
                             f"{dim // n_heads})")
    return hp


def _weights(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Tensor name -> its file (a sharded index, or the one model.safetensors), and tensor name -> shape from
    the files' headers, each header read once."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise _error(folder, f"{INDEX_FILE} has no readable weight_map ({err})") from None
        files = {name: folder / file for name, file in weight_map.items()}
    else:
        single = folder / WEIGHTS_FILE
        if not single.is_file():
            raise _error(folder, f"no {WEIGHTS_FILE} or {INDEX_FILE}")
        files = {"": single}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        shapes.update(_header_shapes(folder, file))
    if "" in files:
        files = {name: files[""] for name in shapes}
    return files, shapes


def _header_shapes(folder: Path, file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a missing or corrupt file
        raise _error(folder, f"{file.name}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def read_hf_llama(folder: str | Path) -> HFLlama:
    """The folder's hyper-parameters, checked against every tensor header; no tensor is read."""
    folder = Path(folder).expanduser().resolve()
    hp = hyper_parameters(folder, _read_config(folder))
    files, shapes = _weights(folder)
    for ours, theirs in weight_names(hp).items():
        if theirs not in files or theirs not in shapes:
            raise _error(folder, f"tensor {theirs!r} is missing (a Llama with this config.json needs it)")
        if shapes[theirs] != expected_shape(hp, ours):
            raise _error(folder, f"tensor {theirs!r} has shape {list(shapes[theirs])}, config.json implies "
                                 f"{list(expected_shape(hp, ours))}")
    return HFLlama(folder, hp, files)


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``export.interleaved_to_rotate_half``: HF row ``half * D/2 + j`` -> our row ``2j + half``."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def load_hf_weights(source: HFLlama) -> dict[str, torch.Tensor]:
    """Our parameter name -> float32 tensor, for every weight of the model (``output.weight`` only untied)."""
    weights = {}
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                   for file in sorted(set(source.files.values()))}
        for ours, theirs in weight_names(source.hp).items():
            tensor = handles[source.files[theirs]].get_tensor(theirs).float()
            if ours.endswith("attention.wq.weight"):
                tensor = rotate_half_to_interleaved(tensor, source.hp.n_heads)
            elif ours.endswith("attention.wk.weight"):
                tensor = rotate_half_to_interleaved(tensor, source.hp.n_kv_heads)
            weights[ours] = tensor.contiguous()
    return weights


def load_hf_into(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the folder's weights into a whole (not yet parallelized) model of the same config, in place."""
    source = read_hf_llama(folder)
    weights = load_hf_weights(source)
    params = dict(model.named_parameters())  # a tied output head is the embedding's parameter, listed once
    if missing := sorted(set(params) - set(weights)):
        raise _error(source.folder, f"has no weights for {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(param.shape) != tuple(weights[name].shape):
                raise _error(source.folder, f"{name}: shape {list(weights[name].shape)}, the model has "
                                            f"{list(param.shape)}")
            param.copy_(weights[name])
