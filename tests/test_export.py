"""HF Llama export: folder layout and names, error cases, and (with transformers) logits equal to our forward."""
import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open

from orchestrate.models.llama.hf_export import CONFIG_FILE, WEIGHTS_FILE, export_hf
from orchestrate.models.llama.hf_import import load_hf_into
from orchestrate.checkpoint.fragments import model_fragments, optimizer_fragments
from orchestrate.checkpoint.universal import CheckpointError, TrainerState, commit_version, version_dir
from orchestrate.checkpoint.universal_tensors import write_fragments
from orchestrate.config import ModelConfig
from orchestrate.models.llama import build_llama

SEQ_LEN = 16
# Non-default theta and eps, so a value that is not carried over shows up in the logits.
BASE = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6)
VARIANTS = {"gqa": BASE, "tied": replace(BASE, tie_embeddings=True), "mha": replace(BASE, n_kv_heads=4)}


def _build(model_cfg):
    model = build_llama(model_cfg, seed=0, max_seq_len=SEQ_LEN)  # the model section is a LlamaConfig
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # not all ones, so a swapped or missing norm changes the logits
    return model


def _save(root, model, model_section, version=3):
    """Parameters spread over two ranks plus AdamW state, as a training run writes them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(8).view(1, 8)).square().mean().backward()
    optimizer.step()
    fragments = model_fragments(model) + optimizer_fragments(model, optimizer)
    for rank in (0, 1):
        write_fragments(version_dir(root, version), rank, fragments[rank::2])
    config = {"model": model_section, "train": {"seq_len": SEQ_LEN}}
    return commit_version(root, version, TrainerState(step=version, config=config), [0, 1])


@pytest.fixture(params=list(VARIANTS))
def exported(request, tmp_path):
    model_cfg = VARIANTS[request.param]
    model = _build(model_cfg)
    _save(tmp_path / "ckpt", model, asdict(model_cfg))
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    return model.eval(), model_cfg, out


def _hf_tensors(out):
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_export_writes_config_and_hf_names(exported):
    model, model_cfg, out = exported
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt", "hf"]  # no temp folder left behind
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 192, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, model_cfg.n_kv_heads)
    assert (config["rms_norm_eps"], config["rope_theta"], config["vocab_size"]) == (1e-6, 500000.0, 256)
    assert config["tie_word_embeddings"] == model_cfg.tie_embeddings
    assert config["max_position_embeddings"] == SEQ_LEN and config["torch_dtype"] == "float32"

    tensors = _hf_tensors(out)
    ours = dict(model.named_parameters())
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(2) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    if not model_cfg.tie_embeddings:
        expected.add("lm_head.weight")
        assert torch.equal(tensors["lm_head.weight"], ours["output.weight"])
    assert set(tensors) == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], ours["layers.1.feed_forward.w1.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"], ours["layers.1.feed_forward.w3.weight"])
    assert torch.equal(tensors["model.layers.0.post_attention_layernorm.weight"], ours["layers.0.ffn_norm.weight"])
    # Head 1 of q, head_dim 16: HF rows 16 + j (first half) / 24 + j (second half) are our rows 16 + 2j / 17 + 2j.
    q_hf, q_ours = tensors["model.layers.0.self_attn.q_proj.weight"], ours["layers.0.attention.wq.weight"]
    assert torch.equal(q_hf[16:24], q_ours[16:32:2]) and torch.equal(q_hf[24:32], q_ours[17:32:2])


def test_transformers_logits_match_our_forward(exported):
    transformers = pytest.importorskip("transformers")
    model, model_cfg, out = exported
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf_model.dtype == torch.float32
    if model_cfg.tie_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_export_then_init_from_gives_the_same_weights_and_logits(exported):
    model, model_cfg, out = exported
    fresh = _build(model_cfg)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    load_hf_into(fresh, out)
    for (name, theirs), ours in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(theirs, ours), name
    tokens = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens), model(tokens), atol=1e-5, rtol=0)


@pytest.fixture
def checkpoint_root(tmp_path):
    _save(tmp_path / "ckpt", _build(BASE), asdict(BASE))
    return tmp_path / "ckpt"


def test_export_from_version_directory(checkpoint_root, tmp_path):
    out = export_hf(version_dir(checkpoint_root, 3), tmp_path / "nested" / "hf")
    assert (out / WEIGHTS_FILE).exists() and (out / CONFIG_FILE).exists()


@pytest.mark.parametrize("overrides, message", [
    ({"name": "gpt2"}, "only 'llama' can be exported"),
    ({"n_kv_heads": 4}, "tensor 'layers.0.attention.wk.weight' has shape [32, 64]"),
    ({"n_heads": 3}, "do not describe a Llama"),
    ({"n_layers": 3}, "tensor 'layers.2.attention.wq.weight' is not in the checkpoint"),
])
def test_export_rejects_config_that_does_not_match_the_weights(tmp_path, overrides, message):
    _save(tmp_path / "ckpt", _build(BASE), {**asdict(BASE), **overrides})
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_rejects_missing_checkpoint_and_occupied_destination(checkpoint_root, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="nor a version directory with manifest.json"):
        export_hf(tmp_path / "empty", tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_hf(checkpoint_root, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_export_rejects_untied_config_for_tied_weights(tmp_path):
    _save(tmp_path / "ckpt", _build(VARIANTS["tied"]), asdict(BASE))
    with pytest.raises(CheckpointError, match="tensor 'output.weight' is not in the checkpoint"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_export_rejects_checkpoint_without_model_config(tmp_path):
    write_fragments(version_dir(tmp_path, 1), 0, model_fragments(_build(BASE)))
    commit_version(tmp_path, 1, TrainerState(step=1), [0])
    with pytest.raises(CheckpointError, match="no model config"):
        export_hf(tmp_path, tmp_path / "hf")
