import torch

from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss
from orchestrate.models.llama import apply_rope, rope_tables


def test_parameter_names_are_global_and_stable():
    model = build_llama(LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2), seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "tok_embeddings.weight" and names[-1] == "output.weight"
    assert "layers.2.feed_forward.w3.weight" in names and "layers.0.attention.wk.weight" in names
    assert model.layers["1"].attention.wk.weight.shape == (16, 32)  # GQA: 2 kv heads of dim 8


def test_same_seed_same_weights_and_tied_embeddings():
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4)
    a, b = build_llama(cfg, seed=1), build_llama(cfg, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.output.weight, build_llama(cfg, seed=2).output.weight)
    tied = build_llama(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, tie_embeddings=True), seed=0)
    assert tied.output.weight is tied.tok_embeddings.weight


def test_forward_is_causal_and_learns():
    torch.manual_seed(0)
    model = build_llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2), seed=0)
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    out, out_changed = model(tokens), model(changed)
    assert torch.equal(out[:, :8], out_changed[:, :8])  # no position sees the future
    assert not torch.equal(out[:, 8:], out_changed[:, 8:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_positions_select_rope_rows():
    cos, sin = rope_tables(8, 32, 10000.0)
    x = torch.randn(1, 4, 2, 8)
    positions = torch.tensor([3, 7, 20, 21])
    assert torch.equal(apply_rope(x, cos[positions], sin[positions]),
                       apply_rope(x, cos[3:25][[0, 4, 17, 18]], sin[3:25][[0, 4, 17, 18]]))
    assert torch.allclose(apply_rope(x, cos[:4], sin[:4]).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
