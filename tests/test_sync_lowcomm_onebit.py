"""1-bit Adam on real gloo ranks: the checks of docs/lowcomm.md section 4.3 plus byte accounting and checkpoint
resume."""
import copy

import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import (TinyNet, batch, fingerprint, flat_params, loss_fn, reference_adam,
                                   singleton_group, train_step)

LR, WEIGHT_DECAY = 0.01, 0.1


def _default_adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def _onebit(group, freeze_step, bias_correction=False, seed=0):
    from orchestrate.parallel.sync.onebit_adam import OneBitAdamConfig, OneBitAdamSync

    model = TinyNet(seed=seed)
    sync = OneBitAdamSync(group, config=OneBitAdamConfig(freeze_step=freeze_step, bias_correction=bias_correction))
    sync.wrap_model(model)
    return model, sync, sync.build_optimizer(model.parameters(), _default_adamw)


def _warmup(rank, group):
    """Oracle 4.3.1 inputs: warmup steps in both bias-correction modes."""
    results = {}
    for bias_correction in (False, True):
        model, sync, optimizer = _onebit(group, freeze_step=100, bias_correction=bias_correction)
        for step in range(5):
            train_step(model, sync, optimizer, step, batch(rank, step))
        results[bias_correction] = flat_params(model)
    return results


def _single_replica_after_freeze(rank):
    """Oracle 4.3.2: W=1 sends nothing; after the freeze v is bit-identical and the step is v-preconditioned
    momentum SGD."""
    model, sync, optimizer = _onebit(singleton_group(), freeze_step=3)
    worst, frozen_variance = 0.0, None
    for step in range(8):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        sync.before_optimizer(step)
        frozen = optimizer.frozen
        params = list(model.parameters())
        expected = []
        if frozen:
            for p in params:
                state = optimizer.state[p]
                momentum = 0.9 * state["exp_avg"] + 0.1 * p.grad
                decayed = p.detach() * (1 - LR * WEIGHT_DECAY)
                expected.append(decayed - LR * momentum / (state["exp_avg_sq"].sqrt() + 1e-8))
        optimizer.step()
        sync.after_optimizer(step)
        if step == 2:
            frozen_variance = fingerprint(optimizer.state[p]["exp_avg_sq"] for p in params)
        for p, value in zip(params, expected):
            worst = max(worst, (p.detach() - value).abs().max().item())
    variance = fingerprint(optimizer.state[p]["exp_avg_sq"] for p in model.parameters())
    return {"worst": worst, "variance_frozen": variance == frozen_variance, "sent": sync.counter.total}


def _collective(rank, group, world):
    """Oracle 4.3.4: bitwise-identical outputs, two values per chunk, fixed point, bytes."""
    from orchestrate.parallel import comm
    from orchestrate.parallel.sync.onebit_adam import OneBitAllReduce

    numel = 1001
    counter = comm.CommCounter()
    reduce = OneBitAllReduce(numel, torch.float32, group, counter)
    outputs, chunk_magnitudes = [], []
    for call in range(5):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(10 * call + rank))
        out = reduce(x)
        outputs.append(fingerprint([out]))
        chunk = reduce.padded // world
        chunk_magnitudes.append([out[i * chunk: (i + 1) * chunk].abs().unique().numel()
                                 for i in range(world) if i * chunk < numel])
    sent_per_call = counter.total // 5

    fixed = OneBitAllReduce(numel, torch.float64, group, comm.CommCounter())
    x = torch.randn(numel, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    out = fixed(x)
    padded = torch.cat([x, torch.zeros(fixed.padded - numel, dtype=torch.float64)])
    scale = padded.norm() / fixed.padded ** 0.5
    expected = scale * torch.where(x >= 0, 1.0, -1.0).double()
    return {"outputs": outputs, "chunk_magnitudes": chunk_magnitudes, "sent_per_call": sent_per_call,
            "padded": reduce.padded, "fixed_error": (out - expected).abs().max().item(),
            "server_error": fixed.server_error.abs().max().item()}


def _compressed_training(rank, group, world):
    """Bytes per step in both stages, and a checkpoint after the freeze resumes bitwise (error buffers kept)."""
    model, sync, optimizer = _onebit(group, freeze_step=3)
    sent = []
    for step in range(8):
        before = sync.counter.total
        train_step(model, sync, optimizer, step, batch(rank, step))
        sent.append(sync.counter.total - before)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             {k: v.clone() for k, v in sync.state_dict().items()})
    resumed = _onebit(group, freeze_step=3)
    resumed[0].load_state_dict(saved[0])
    resumed[2].load_state_dict(saved[1])
    resumed[1].load_state_dict(saved[2])
    for step in range(8, 12):
        for run in ((model, sync, optimizer), resumed):
            train_step(*run, step, batch(rank, step))
    return {"sent": sent, "padded": sync.momentum_mean.padded,
            "numel": flat_params(model).numel(),
            "resumed": [fingerprint(run[0].parameters()) for run in ((model,), resumed)],
            "errors_nonzero": bool(sync.momentum_mean.worker_error.abs().sum() > 0)}


def _world2(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"warmup": _warmup(rank, group), "single": _single_replica_after_freeze(rank),
            "collective": _collective(rank, group, world), "training": _compressed_training(rank, group, world)}


def _world4(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"collective": _collective(rank, group, world), "training": _compressed_training(rank, group, world)}


def _check_collective(results, world):
    from orchestrate.parallel import comm

    collectives = [r["collective"] for r in results]
    assert all(c["outputs"] == collectives[0]["outputs"] for c in collectives)
    for c in collectives:
        assert all(count == 1 for call in c["chunk_magnitudes"] for count in call)
        padded = c["padded"]
        assert padded % (world * 8) == 0
        signs = padded // 8
        expected = (comm.all_to_all_bytes(signs, world) + comm.all_gather_bytes(signs // world, world)
                    + 2 * comm.all_gather_bytes(4, world))
        assert c["sent_per_call"] == expected
        assert c["fixed_error"] < 1e-12 and c["server_error"] < 1e-12


def _check_training(results, world):
    from orchestrate.parallel import comm

    for result in results:
        training = result["training"]
        full = comm.all_reduce_bytes(8 * training["numel"], world)
        signs = training["padded"] // 8
        compressed = (comm.all_to_all_bytes(signs, world) + comm.all_gather_bytes(signs // world, world)
                      + 2 * comm.all_gather_bytes(8, world))
        assert training["sent"] == [full] * 3 + [compressed] * 5
        assert compressed * 20 < full  # ~N/4 (W large) vs 8N bytes, float64 here
        assert training["resumed"][0] == training["resumed"][1] and training["errors_nonzero"]


def test_onebit_adam_world2():
    world = 2
    results = run_ranks(world, _world2, timeout_s=120)
    for bias_correction in (False, True):
        reference = reference_adam(world, 5, bias_correction, LR, WEIGHT_DECAY)
        for result in results:
            torch.testing.assert_close(result["warmup"][bias_correction], reference, rtol=0, atol=1e-12)
    for result in results:
        single = result["single"]
        assert single["sent"] == 0 and single["variance_frozen"] and single["worst"] <= 1e-15
    _check_collective(results, world)
    _check_training(results, world)


def test_onebit_adam_world4():
    world = 4
    results = run_ranks(world, _world4, timeout_s=120)
    _check_collective(results, world)
    _check_training(results, world)
