"""Low-communication strategies compose with tensor parallelism: 2 replicas x 2 tp ranks, DTensor parameters.

Each strategy must act on the replica group only and on this rank's local shard of every parameter.
"""
import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import TinyNet


def _sharded_model(tp_mesh):
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    model = TinyNet(n_layers=2)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 2 and param.shape[0] % 2 == 0:
                setattr(module, name, nn.Parameter(distribute_tensor(param.detach(), tp_mesh, [Shard(0)])))
    return model


def _local_shards(model):
    from orchestrate.parallel.sync.tensors import local_tensor

    return [local_tensor(p).detach().clone() for p in model.parameters()]


def _perturb(model, amount):
    from orchestrate.parallel.sync.tensors import local_tensor

    with torch.no_grad():
        for p in model.parameters():
            local_tensor(p).add_(amount)


def _diloco_on_shards(dp, tp, mesh):
    """Outer SGD(1, 0) averages each local shard over the replica group only; bytes are local-shard bytes."""
    from orchestrate.parallel import comm
    from orchestrate.parallel.sync.diloco import DiLoCoConfig, DiLoCoSync
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig, StreamingDiLoCoSync

    results = {}
    strategies = {
        "diloco": lambda group: DiLoCoSync(group, config=DiLoCoConfig(sync_every=1, outer_lr=1.0,
                                                                      outer_momentum=0.0, nesterov=False)),
        "streaming": lambda group: StreamingDiLoCoSync(group, config=StreamingDiLoCoConfig(
            sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False, quantization="none",
            layers_per_fragment=0, overlap_steps=0)),
    }
    for name, build in strategies.items():
        model = _sharded_model(mesh["tp"])
        sync = build(mesh["dp"].get_group())
        sync.wrap_model(model, model.layers)
        before = _local_shards(model)
        _perturb(model, 1.0 + dp + 10 * tp)
        sync.after_optimizer(0)
        local_bytes = sum(t.numel() * 8 for t in before)
        results[name] = {"before": before, "after": _local_shards(model),
                         "bytes_ok": sync.counter.total == comm.all_reduce_bytes(local_bytes, 2)}
    return results


def _onebit_on_shards(dp, tp, mesh):
    """1-bit Adam with DTensor params and gradients keeps the replicas' shards identical."""
    from torch.distributed.tensor import DTensor

    from orchestrate.parallel.sync.onebit_adam import OneBitAdamConfig, OneBitAdamSync

    model = _sharded_model(mesh["tp"])
    sync = OneBitAdamSync(mesh["dp"].get_group(), config=OneBitAdamConfig(freeze_step=1))
    sync.wrap_model(model)
    optimizer = sync.build_optimizer(model.parameters(), lambda params: torch.optim.AdamW(params, lr=0.01))
    generator = torch.Generator().manual_seed(100 * dp + tp)
    for step in range(3):
        for p in model.parameters():
            if isinstance(p, DTensor):
                local = torch.randn(p.to_local().shape, generator=generator, dtype=p.dtype)
                p.grad = DTensor.from_local(local, p.device_mesh, p.placements)
            else:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        sync.before_optimizer(step)
        optimizer.step()
        sync.after_optimizer(step)
    return _local_shards(model)


def _world4(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    return {"coords": (dp, tp), "diloco": _diloco_on_shards(dp, tp, mesh), "onebit": _onebit_on_shards(dp, tp, mesh)}


def test_strategies_act_on_local_shards_across_replicas_only():
    results = run_ranks(4, _world4, timeout_s=120)
    by_coords = {r["coords"]: r for r in results}
    for tp in range(2):
        replicas = [by_coords[(dp, tp)] for dp in range(2)]
        for name in ("diloco", "streaming"):
            for i, shard in enumerate(replicas[0]["diloco"][name]["before"]):
                expected = shard + 1.5 + 10 * tp  # mean over dp of (1 + dp + 10 tp)
                for replica in replicas:
                    torch.testing.assert_close(replica["diloco"][name]["after"][i], expected, rtol=0, atol=1e-12)
                    assert replica["diloco"][name]["bytes_ok"]
        for a, b in zip(replicas[0]["onebit"], replicas[1]["onebit"]):
            assert torch.equal(a, b)
    assert not torch.equal(by_coords[(0, 0)]["onebit"][0], by_coords[(0, 1)]["onebit"][0])
