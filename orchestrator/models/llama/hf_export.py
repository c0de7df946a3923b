"""Export a universal checkpoint of our Llama as a Hugging Face Llama folder (config.json + model.safetensors).

Only model weights are exported: the tensors are picked by name, so optimizer (``optim.*``) and sync state are
never read. Head counts, layer count, norm eps, RoPE theta and embedding tying come from the run config in the
manifest's trainer state; vocab, hidden and MLP sizes come from the tensors' global shapes.

RoPE: our model rotates interleaved pairs (x[2j], x[2j+1]) of each head, HF Llama rotates (x[j], x[j + D/2])
("rotate_half"), so the rows of each q/k head are reordered: HF row ``half * D/2 + j`` is our row ``2j + half``.
That is the permutation HF's ``convert_llama_weights_to_hf.py`` applies to Meta's (also interleaved) weights.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from orchestrate.checkpoint.reshard import load_slices
from orchestrate.checkpoint.universal import CheckpointError, Manifest, SliceSpec, read_manifest, resolve_version_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_POSITIONS = 2048  # LlamaConfig.max_seq_len when the run config has no train.seq_len


@dataclass(frozen=True)
class LlamaHyperParameters:
    vocab_size: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _model_config(manifest: Manifest) -> dict[str, Any]:
    model = manifest.trainer_state.config.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{manifest.directory}: the trainer state has no model config to export from")
    name = model.get("name", "llama")
    if name != "llama":
        raise CheckpointError(f"{manifest.directory}: model.name={name!r}, only 'llama' can be exported")
    return model


def _global_shape(manifest: Manifest, name: str) -> tuple[int, ...]:
    record = manifest.tensors.get(name)
    if record is None:
        raise CheckpointError(f"{manifest.directory}: tensor {name!r} is not in the checkpoint")
    return record.global_shape


def hyper_parameters(manifest: Manifest) -> LlamaHyperParameters:
    model = _model_config(manifest)
    required = ("n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta")
    if missing := [key for key in required if key not in model]:
        raise CheckpointError(f"{manifest.directory}: model config lacks {', '.join(missing)}")
    vocab_size, dim = _global_shape(manifest, "tok_embeddings.weight")
    hidden_dim = _global_shape(manifest, "layers.0.feed_forward.w1.weight")[0]
    train = manifest.trainer_state.config.get("train") or {}
    return LlamaHyperParameters(
        vocab_size=vocab_size, dim=dim, hidden_dim=hidden_dim, n_layers=int(model["n_layers"]),
        n_heads=int(model["n_heads"]), n_kv_heads=int(model["n_kv_heads"]), norm_eps=float(model["norm_eps"]),
        rope_theta=float(model["rope_theta"]), tie_embeddings=bool(model.get("tie_embeddings", False)),
        max_positions=int(train.get("seq_len", DEFAULT_MAX_POSITIONS)))


def weight_names(hp: LlamaHyperParameters) -> dict[str, str]:
    """Our parameter name -> HF parameter name, for every tensor the export writes."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    block = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for layer in range(hp.n_layers):
        for ours, theirs in block.items():
            names[f"layers.{layer}.{ours}.weight"] = f"model.layers.{layer}.{theirs}.weight"
    if not hp.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def expected_shape(hp: LlamaHyperParameters, name: str) -> tuple[int, ...]:
    suffix = name.removeprefix("layers.").partition(".")[2] if name.startswith("layers.") else name
    shapes = {"tok_embeddings.weight": (hp.vocab_size, hp.dim), "output.weight": (hp.vocab_size, hp.dim),
              "norm.weight": (hp.dim,), "attention_norm.weight": (hp.dim,), "ffn_norm.weight": (hp.dim,),
              "attention.wq.weight": (hp.n_heads * hp.head_dim, hp.dim),
              "attention.wk.weight": (hp.n_kv_heads * hp.head_dim, hp.dim),
              "attention.wv.weight": (hp.n_kv_heads * hp.head_dim, hp.dim),
              "attention.wo.weight": (hp.dim, hp.n_heads * hp.head_dim),
              "feed_forward.w1.weight": (hp.hidden_dim, hp.dim), "feed_forward.w3.weight": (hp.hidden_dim, hp.dim),
              "feed_forward.w2.weight": (hp.dim, hp.hidden_dim)}
    return shapes[suffix]


def _check_heads(directory: Path, hp: LlamaHyperParameters) -> None:
    positive = hp.n_heads > 0 and hp.n_kv_heads > 0
    if not positive or hp.dim % hp.n_heads or hp.n_heads % hp.n_kv_heads or hp.head_dim % 2:
        raise CheckpointError(f"{directory}: dim={hp.dim}, n_heads={hp.n_heads}, n_kv_heads={hp.n_kv_heads} do "
                              f"not describe a Llama (heads must divide dim and kv heads, head dim must be even)")


def _read_weights(manifest: Manifest, hp: LlamaHyperParameters, names: list[str]) -> dict[str, torch.Tensor]:
    wanted = {}
    for name in names:
        shape = _global_shape(manifest, name)
        if shape != expected_shape(hp, name):
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} has shape {list(shape)}, the model config "
                                  f"implies {list(expected_shape(hp, name))}")
        wanted[name] = SliceSpec(shape, (0,) * len(shape), shape)
    return load_slices(manifest.directory, wanted, manifest)


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection [n_heads * D, dim] from interleaved RoPE pairs to rotate_half."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def hf_state_dict(weights: dict[str, torch.Tensor], hp: LlamaHyperParameters) -> dict[str, torch.Tensor]:
    state = {}
    for ours, theirs in weight_names(hp).items():
        tensor = weights[ours].float()
        if ours.endswith("attention.wq.weight"):
            tensor = interleaved_to_rotate_half(tensor, hp.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = interleaved_to_rotate_half(tensor, hp.n_kv_heads)
        state[theirs] = tensor.contiguous()
    return state


def hf_config(hp: LlamaHyperParameters) -> dict[str, Any]:
    # rope_theta at top level is what transformers 4.x reads; 5.x reads rope_parameters (and accepts both).
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": hp.vocab_size, "hidden_size": hp.dim, "intermediate_size": hp.hidden_dim,
        "num_hidden_layers": hp.n_layers, "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads, "head_dim": hp.head_dim, "hidden_act": "silu",
        "max_position_embeddings": hp.max_positions, "rms_norm_eps": hp.norm_eps,
        "rope_theta": hp.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": hp.tie_embeddings, "torch_dtype": "float32", "initializer_range": 0.02,
        "use_cache": True,
        # The byte tokenizer has no special tokens.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _write_folder(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                  tokenizer: Optional[Path]) -> None:
    """Write into a temp sibling and rename, so ``out_dir`` is either absent or complete."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: export destination exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Optional[Path] = None) -> Path:
    """Write the model weights of a committed checkpoint as a HF Llama folder, with the run's ``tokenizer.json``
    when it had one (the byte tokenizer has no file); returns ``out_dir``."""
    manifest = read_manifest(resolve_version_dir(ckpt_dir))
    hp = hyper_parameters(manifest)
    _check_heads(manifest.directory, hp)
    weights = _read_weights(manifest, hp, list(weight_names(hp)))
    out_dir = Path(out_dir)
    _write_folder(out_dir, hf_state_dict(weights, hp), hf_config(hp), tokenizer)
    return out_dir
