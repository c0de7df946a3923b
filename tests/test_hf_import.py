"""Starting from Hugging Face weights: a transformers LlamaForCausalLM saved with save_pretrained (sharded) loads
into our model with the same logits and trains; a folder that is not such a Llama is one line naming the problem."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrate.models.llama.hf_import import load_hf_into, read_hf_llama
from orchestrate.checkpoint.universal import CheckpointError
from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss

transformers = pytest.importorskip("transformers")
SEQ_LEN = 16


@pytest.fixture
def hf_folder(tmp_path):
    """A small random transformers Llama (GQA, non-default theta and eps), saved in several safetensors shards."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # not all ones, so a swapped or missing norm changes the logits
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    return tmp_path / "hf", model


def _ours(folder):
    hp = read_hf_llama(folder).hp
    model = build_llama(LlamaConfig(vocab_size=hp.vocab_size, dim=hp.dim, n_layers=hp.n_layers, n_heads=hp.n_heads,
                                    n_kv_heads=hp.n_kv_heads, ffn_hidden=hp.hidden_dim,
                                    rope_theta=hp.rope_theta, norm_eps=hp.norm_eps,
                                    tie_embeddings=hp.tie_embeddings), seed=1, max_seq_len=SEQ_LEN)
    load_hf_into(model, folder)
    return model


def test_a_sharded_transformers_llama_loads_with_the_same_logits_and_trains(hf_folder):
    folder, hf_model = hf_folder
    assert (folder / "model.safetensors.index.json").is_file()  # really sharded
    model = _ours(folder)
    tokens = torch.randint(0, 300, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens[:, :-1]), hf_model(tokens[:, :-1]).logits, atol=1e-5, rtol=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = cross_entropy_loss(model.train()(tokens[:, :-1]), tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_tensor(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"][name]
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_config(f, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     "config.json describes GPT2LMHeadModel; valid: LlamaForCausalLM"),
    (lambda f: _drop_tensor(f, "model.layers.1.mlp.up_proj.weight"),
     "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda f: _edit_config(f, intermediate_size=128),
     "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [160, 64], config.json implies [128, 64]"),
    (lambda f: _edit_config(f, hidden_act="gelu"), "hidden_act='gelu': not supported"),
    (lambda f: (f / "config.json").unlink(), "no config.json"),
])
def test_a_folder_that_is_not_our_llama_is_one_line(hf_folder, damage, message):
    folder, _ = hf_folder
    damage(folder)
    with pytest.raises(CheckpointError) as raised:
        read_hf_llama(folder)
    assert message in str(raised.value) and str(raised.value).startswith(f"model.init_from={folder}: ")
    assert len(str(raised.value).splitlines()) == 1
