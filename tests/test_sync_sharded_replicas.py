"""DiLoCo, Streaming DiLoCo and NoLoCo over FSDP2-sharded replicas (``parallel.dp_shard=S``): 2 replicas of 2
shards each follow 2 unsharded replicas fed the same batches, because every shard syncs with its counterpart in
the other replica and FSDP2 averages the gradients within a replica; under DDP the same layout is HSDP and follows
DDP. Built with the worker's own ``build_sync`` (parallel/sync) on real gloo process groups."""
import pytest
import torch

from orchestrate.parallel.local_ranks import run_ranks

STEPS = 8
ROWS = 4  # sequences per replica and step
OPTIONS = {
    "ddp": {},  # sharded: HSDP (FSDP2 within a replica, gradients all-reduced across replicas)
    "diloco": {"sync_every": 2},
    # quantization none: e3m0 blocks would straddle other values in a shard than in the whole vector
    "streaming_diloco": {"sync_every": 6, "layers_per_fragment": 1, "quantization": "none"},
    "noloco": {"sync_every": 2},
}


def _train_each(rank: int, world: int, dp_shard: int) -> dict:
    """Every strategy in turn in the same gang (new groups each): name -> this rank's result."""
    return {name: _train(rank, world, name, dp_shard) for name in sorted(OPTIONS)}


def _train(rank: int, world: int, name: str, dp_shard: int) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from orchestrate.config import Config, derive
    from orchestrate.models.llama import build_llama, cross_entropy_loss
    from orchestrate.parallel.mesh import build_mesh
    from orchestrate.parallel.sync import build_sync

    cfg = derive(Config(), {"parallel.dp": world, "parallel.dp_shard": dp_shard, "model.dim": 32, "model.n_layers": 2,
                            "model.n_heads": 4, "model.n_kv_heads": 2, "train.seq_len": 16, "sync.name": name,
                            **{f"sync.{name}.{key}": value for key, value in OPTIONS[name].items()}})
    dims = cfg.dims
    sync = build_sync(name, build_mesh(dims, "cpu"), dims, cfg.sync.options())
    model = build_llama(cfg.model, seed=0, max_seq_len=cfg.train.seq_len)
    wrapped = sync.wrap_model(model, model.layers)  # torch DDP wraps; FSDP2 shards in place
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
    replica, shard = divmod(rank, dims.dp_shard)
    rows = slice(shard * ROWS // dims.dp_shard, (shard + 1) * ROWS // dims.dp_shard)
    losses = []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + replica)
        tokens = torch.randint(0, 256, (ROWS, cfg.train.seq_len + 1), generator=generator)[rows]
        loss = cross_entropy_loss(wrapped(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        sync.before_optimizer(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync.after_optimizer(step)
        losses.append(float(loss.detach()))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}
    evaluations = []  # twice: a forward without backward leaves FSDP2's root unsharded
    for _ in range(2):
        with sync.evaluating(), torch.no_grad():
            evaluations.append(float(cross_entropy_loss(wrapped(tokens[:, :-1]), tokens[:, 1:])))
    after = {n: (p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()}
    return {"replica": replica, "losses": losses, "params": full, "bytes": sync.counter.total,
            "evaluations": evaluations, "live_weights_back": all(after[n].equal(t) for n, t in full.items()),
            "sharded": all(isinstance(p, DTensor) for p in model.parameters()) and dims.dp_shard > 1,
            # FSDP2 gathers each block on its own (the blocks the model's parts name), not the whole model at once
            "per_block_units": all(isinstance(block, FSDPModule) for block in model.layers.values())}


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[dict]]:
    return run_ranks(2, _train_each, 1, timeout_s=120), run_ranks(4, _train_each, 2, timeout_s=240)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sharded_replicas_follow_unsharded_replicas(runs, name):
    unsharded, sharded = ([rank[name] for rank in gang] for gang in runs)
    assert all(r["sharded"] for r in sharded) and not any(r["sharded"] for r in unsharded)
    assert all(r["per_block_units"] for r in sharded)
    for result in sharded:
        reference = unsharded[result["replica"]]
        for name_, tensor in reference["params"].items():
            # Adam's first steps divide by tiny second moments: float noise of the split batch shows at ~1e-5
            worst = float((result["params"][name_] - tensor).abs().max())
            assert worst <= 1e-4, (name_, worst)
    for replica, reference in enumerate(unsharded):
        shards = [r["losses"] for r in sharded if r["replica"] == replica]
        mean = [sum(step) / len(step) for step in zip(*shards)]
        assert max(abs(a - b) for a, b in zip(mean, reference["losses"])) <= 1e-5
        # evaluating on the strategy's weights (Streaming DiLoCo: the outer ones) gives the unsharded replica's loss
        evaluations = [r["evaluations"] for r in sharded if r["replica"] == replica]
        mean = [sum(both) / len(both) for both in zip(*evaluations)]
        assert max(abs(a - b) for a, b in zip(mean, reference["evaluations"])) <= 1e-5
        assert reference["evaluations"][0] == reference["evaluations"][1]
    assert all(r["live_weights_back"] for r in sharded + unsharded)
    if name == "diloco":  # each shard sends its slice across replicas: the two shards send one replica's bytes
        assert sharded[0]["bytes"] + sharded[1]["bytes"] == unsharded[0]["bytes"] > 0
    if name == "ddp":  # HSDP: every replica ends with the same parameters, and its all-reduces are counted
        assert sharded[0]["params"]["output.weight"].equal(sharded[2]["params"]["output.weight"])
        assert sharded[0]["bytes"] > 0
