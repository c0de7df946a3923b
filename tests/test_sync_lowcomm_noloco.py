"""NoLoCo on real gloo ranks: the checks of docs/lowcomm.md section 3.3 plus byte accounting and checkpoint resume."""
import copy

import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import TinyNet, adamw, batch, fingerprint, flat_params, loss_fn, sgd, train_step


def _noloco(group, config, make_optimizer=adamw, seed=0):
    from orchestrate.parallel.sync.noloco import NoLoCoSync

    model = TinyNet(seed=seed)
    sync = NoLoCoSync(group, config=config)
    sync.wrap_model(model)
    return model, sync, make_optimizer(model)


def _one_group_is_heavy_ball_diloco(rank, group, consensus_lr):
    """Oracle 3.3.1: n = W keeps replicas identical and follows DiLoCo with heavy-ball SGD(beta, alpha)."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig, DiLoCoSync
    from orchestrate.parallel.sync.noloco import NoLoCoConfig

    noloco = _noloco(group, NoLoCoConfig(sync_every=3, momentum=0.5, outer_lr=0.7, consensus_lr=consensus_lr))
    model = TinyNet()
    diloco_sync = DiLoCoSync(group, config=DiLoCoConfig(sync_every=3, outer_lr=0.7, outer_momentum=0.5,
                                                        nesterov=False))
    diloco_sync.wrap_model(model)
    diloco = (model, diloco_sync, adamw(model))
    sent = []
    for step in range(9):
        before = noloco[1].counter.total
        for run in (noloco, diloco):
            train_step(*run, step, batch(rank, step))
        sent.append(noloco[1].counter.total - before)
    noloco[1].wait_for_exchanges()
    return {"noloco": flat_params(noloco[0]), "diloco": flat_params(diloco[0]),
            "fingerprint": fingerprint(noloco[0].parameters()), "sent": sent, "peak": noloco[1].counter.peak,
            "param_bytes": 8 * flat_params(model).numel()}


def _checkpoint_resume(rank, group):
    """A checkpoint taken while the next phi exchange is in flight (gamma != beta) resumes bitwise."""
    from orchestrate.parallel.sync.noloco import NoLoCoConfig

    config = NoLoCoConfig(sync_every=3, consensus_lr=0.9)
    model, sync, optimizer = _noloco(group, config, seed=rank)
    for step in range(4):
        train_step(model, sync, optimizer, step, batch(rank, step))
    assert sync._slow_exchange is not None
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             {k: v.clone() for k, v in sync.state_dict().items()})
    resumed = _noloco(group, config)
    resumed[0].load_state_dict(saved[0])
    resumed[2].load_state_dict(saved[1])
    resumed[1].load_state_dict(saved[2])
    for step in range(4, 10):
        for run in ((model, sync, optimizer), resumed):
            train_step(*run, step, batch(rank, step))
    sync.wait_for_exchanges()
    resumed[1].wait_for_exchanges()
    return [fingerprint(run[0].parameters()) for run in ((model,), resumed)]


def _global_mean_trace(rank, group):
    """Oracle 3.3.2 inputs: phi_i and theta_i before each outer step and phi_i after it (n=2 of W=4)."""
    from orchestrate.parallel.sync.noloco import NoLoCoConfig

    model, sync, optimizer = _noloco(group, NoLoCoConfig(sync_every=2, consensus_lr=0.9), seed=rank)
    trace = []
    for step in range(8):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()
        slow_before, live_before = sync.slow.clone(), sync.flat.flatten()
        sync.after_optimizer(step)
        if (step + 1) % 2 == 0:
            trace.append((slow_before, live_before, sync.slow.clone()))
    sync.wait_for_exchanges()
    return trace


def _consensus(rank, group, rate, outer_steps):
    """Oracle 3.3.4: with no inner progress and alpha=0 the replicas contract towards their group means."""
    from orchestrate.parallel.sync.noloco import NoLoCoConfig

    config = NoLoCoConfig(sync_every=1, momentum=0.0, outer_lr=rate, consensus_lr=rate)
    model, sync, optimizer = _noloco(group, config, lambda m: sgd(m, lr=0.0), seed=rank)
    live = [flat_params(model)]
    for step in range(outer_steps):
        train_step(model, sync, optimizer, step, batch(rank, step))
        live.append(flat_params(model))
    return {"live": live, "groups": [sync.my_group(k) for k in range(outer_steps)]}


def _world2(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"fast_only": _one_group_is_heavy_ball_diloco(rank, group, 0.7),
            "general": _one_group_is_heavy_ball_diloco(rank, group, 0.9),
            "checkpoint": _checkpoint_resume(rank, group)}


def _world4(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"trace": _global_mean_trace(rank, group), "pairs": _consensus(rank, group, 1.0, 1),
            "contraction": _consensus(rank, group, 0.5, 4),
            "groups": [_noloco(group, _default_config())[1].my_group(k) for k in range(10)]}


def _default_config():
    from orchestrate.parallel.sync.noloco import NoLoCoConfig

    return NoLoCoConfig()


def test_noloco_world2():
    results = run_ranks(2, _world2, timeout_s=120)
    for name in ("fast_only", "general"):
        runs = [r[name] for r in results]
        assert runs[0]["fingerprint"] == runs[1]["fingerprint"]  # one group: replicas stay identical
        for run in runs:
            torch.testing.assert_close(run["noloco"], run["diloco"], rtol=0, atol=1e-12)
        n_bytes = runs[0]["param_bytes"]
        if name == "fast_only":  # only theta travels: N values per outer step, nothing in between
            assert runs[0]["sent"] == [0, 0, n_bytes] * 3 and runs[0]["peak"] == n_bytes
        else:  # Delta now plus phi for the next step (posted early to overlap); the first also fetches phi
            assert runs[0]["sent"] == [0, 0, 3 * n_bytes, 0, 0, 2 * n_bytes, 0, 0, 2 * n_bytes]
    for result in results:
        original, resumed = result["checkpoint"]
        assert original == resumed


def test_noloco_world4():
    results = run_ranks(4, _world4, timeout_s=120)
    world = 4
    # Oracle 3.3.2: mean_i phi_i follows the heavy-ball step on mean_i Delta_i (any gamma).
    velocity = torch.zeros_like(results[0]["trace"][0][0])
    for k in range(len(results[0]["trace"])):
        slow_before = torch.stack([r["trace"][k][0] for r in results]).mean(0)
        delta = torch.stack([r["trace"][k][0] - r["trace"][k][1] for r in results]).mean(0)
        velocity = 0.5 * velocity - 0.7 * delta
        slow_after = torch.stack([r["trace"][k][2] for r in results]).mean(0)
        torch.testing.assert_close(slow_after, slow_before + velocity, rtol=0, atol=1e-12)
    # Oracle 3.3.5: one partition, the same on every rank, every rank in exactly one group.
    for k in range(10):
        groups = {tuple(r["groups"][k]) for r in results}
        assert sorted(rank for g in groups for rank in g) == list(range(world))
        assert all(len(g) == 2 for g in groups)
    assert len({tuple(r["groups"][0]) for r in results}) == 2
    # Oracle 3.3.4: alpha=0, gamma=1 and no inner progress make pair members identical after one outer step.
    for result in results:
        partner = next(r for r in range(world) if r in result["pairs"]["groups"][0] and results[r] is not result)
        torch.testing.assert_close(result["pairs"]["live"][1], results[partner]["pairs"]["live"][1],
                                   rtol=0, atol=1e-15)
        assert not torch.equal(result["pairs"]["live"][0], results[partner]["pairs"]["live"][0])
    spreads = [torch.stack([r["contraction"]["live"][k] for r in results]).std(0).sum().item()
               for k in range(5)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(spreads, spreads[1:]))
    assert spreads[-1] < spreads[0]
