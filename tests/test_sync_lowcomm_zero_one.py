"""0/1 Adam (docs/lowcomm.md section 4.5): its schedules against DeepSpeed's counters, and on real gloo ranks the
full-precision variance steps (= reference Adam), the frozen variance, identical replicas after every sync, local
steps in between, the W=1 update rule, bytes per step and a bitwise resume in the middle of a local-step interval."""
import copy

import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import (TinyNet, batch, fingerprint, flat_params, reference_adam, singleton_group,
                                   train_step)

LR, WEIGHT_DECAY = 0.01, 0.1

# Variance steps 1, 2, 4, 6, 8, 12; local steps from 13 with intervals 1, 1, 2, 2, 4, 4, ... (syncs 13 14 16 20 24).
STAGED = dict(var_freeze_step=12, var_update_scaler=2, local_step_scaler=2, local_step_clipper=4)
STEPS = 24


def _deepspeed_schedules(config, steps):
    """DeepSpeed zoadam.py's counters, stepped one step at a time (freezing right after var_freeze_step)."""
    variance, syncs = [], []
    var_interval, var_counter, local_interval, local_counter = 1, 0, 1, 0
    for t in range(1, steps + 1):
        if t <= config.var_freeze_step:
            if t % var_interval == 0:
                variance.append(t)
                var_counter += 1
                if var_counter == config.var_update_scaler:
                    var_counter, var_interval = 0, var_interval * 2
        else:
            if t % local_interval == 0:
                syncs.append(t)
            local_counter += 1
            if local_counter == config.local_step_scaler:
                local_counter, local_interval = 0, min(config.local_step_clipper, local_interval * 2)
    return variance, syncs


def test_schedules_match_deepspeed_counters():
    from orchestrate.parallel.sync.zero_one_adam import VarianceSchedule, ZeroOneAdamConfig

    for config in (ZeroOneAdamConfig(**STAGED), ZeroOneAdamConfig(var_freeze_step=300, var_update_scaler=3,
                                                                  local_step_scaler=5, local_step_clipper=16),
                   ZeroOneAdamConfig(var_freeze_step=1000)):
        schedule = VarianceSchedule(config)
        steps = config.var_freeze_step + 200
        variance, syncs = _deepspeed_schedules(config, steps)
        assert [t for t in range(1, steps + 1) if schedule.updates_variance(t)] == variance
        assert [t for t in range(config.var_freeze_step + 1, steps + 1) if schedule.syncs(t)] == syncs
    assert _deepspeed_schedules(ZeroOneAdamConfig(**STAGED), STEPS) == ([1, 2, 4, 6, 8, 12], [13, 14, 16, 20, 24])


def _zero_one(group, weight_decay=WEIGHT_DECAY, **config):
    from orchestrate.parallel.sync.zero_one_adam import ZeroOneAdamConfig, ZeroOneAdamSync

    model = TinyNet()
    sync = ZeroOneAdamSync(group, config=ZeroOneAdamConfig(**config))
    sync.wrap_model(model)
    optimizer = sync.build_optimizer(
        model.parameters(), lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=weight_decay))
    return model, sync, optimizer


def _variance(optimizer):
    return fingerprint(optimizer.state[p]["exp_avg_sq"] for p in optimizer.params)


def _staged_training(rank, group):
    """Per step (t = step + 1): bytes sent, parameter and variance fingerprints; then a resume at t = 18."""
    model, sync, optimizer = _zero_one(group, **STAGED)
    record = []
    for step in range(STEPS):
        before = sync.counter.total
        train_step(model, sync, optimizer, step, batch(rank, step))
        record.append({"sent": sync.counter.total - before, "params": fingerprint(model.parameters()),
                       "variance": _variance(optimizer)})
        if step + 1 == 18:  # mid-interval: local steps since the sync at 16
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                     {k: v.clone() for k, v in sync.state_dict().items()})
    resumed = _zero_one(group, **STAGED)
    resumed[0].load_state_dict(saved[0])
    resumed[2].load_state_dict(saved[1])
    resumed[1].load_state_dict(saved[2])
    for step in range(18, STEPS):
        train_step(*resumed, step, batch(rank, step))
    return {"record": record, "resumed": fingerprint(resumed[0].parameters()), "numel": flat_params(model).numel(),
            "padded": sync.momentum_mean.padded}


def _single_replica(rank):
    """W=1 after the freeze (no weight decay): local Adam steps with the frozen v, and at every sync the momentum
    becomes the lr-weighted mean of the momenta used since the previous sync; nothing is sent."""
    model, sync, optimizer = _zero_one(singleton_group(), weight_decay=0.0, **STAGED)
    worst, used = 0.0, []
    for step in range(STEPS):
        t = step + 1
        previous = [optimizer.state[p]["exp_avg"].clone() for p in optimizer.params] if step else None
        train_step(model, sync, optimizer, step, batch(rank, step))
        if t > STAGED["var_freeze_step"]:
            used.append([0.9 * m + 0.1 * p.grad for m, p in zip(previous, optimizer.params)])
            if optimizer.schedule.syncs(t):
                for i, p in enumerate(optimizer.params):  # constant lr: the weighted mean is the plain mean
                    expected = sum(momenta[i] for momenta in used) / len(used)
                    worst = max(worst, (optimizer.state[p]["exp_avg"] - expected).abs().max().item())
                used = []
    return {"worst": worst, "sent": sync.counter.total}


def _all_variance_steps(rank, group):
    """kappa and var_freeze_step beyond the run: every step is a full-precision Adam step."""
    model, sync, optimizer = _zero_one(group, var_freeze_step=100, var_update_scaler=100)
    for step in range(5):
        train_step(model, sync, optimizer, step, batch(rank, step))
    return flat_params(model)


def _world2(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"adam": _all_variance_steps(rank, group), "staged": _staged_training(rank, group),
            "single": _single_replica(rank)}


def test_zero_one_adam_world2():
    from orchestrate.parallel import comm

    world = 2
    results = run_ranks(world, _world2, timeout_s=120)
    reference = reference_adam(world, 5, False, LR, WEIGHT_DECAY)
    for result in results:
        torch.testing.assert_close(result["adam"], reference, rtol=0, atol=1e-12)
        assert result["single"]["sent"] == 0 and result["single"]["worst"] < 1e-12

    staged = [result["staged"] for result in results]
    full = comm.all_reduce_bytes(8 * staged[0]["numel"], world)
    signs = staged[0]["padded"] // 8
    one_bit = (comm.all_to_all_bytes(signs, world) + comm.all_gather_bytes(signs // world, world)
               + 2 * comm.all_gather_bytes(8, world))
    variance_steps, syncs = [1, 2, 4, 6, 8, 12], [13, 14, 16, 20, 24]
    for t in range(1, STEPS + 1):
        rows = [s["record"][t - 1] for s in staged]
        if t <= STAGED["var_freeze_step"]:
            expected = full if t in variance_steps else one_bit
        else:
            expected = one_bit if t in syncs else 0
        assert all(row["sent"] == expected for row in rows), t
        # Replicas are identical through the variance stage and after every sync, apart between syncs.
        identical = t <= STAGED["var_freeze_step"] or t in syncs
        assert (rows[0]["params"] == rows[1]["params"]) == identical, t
        previous = staged[0]["record"][t - 2]["variance"] if t > 1 else None
        assert (rows[0]["variance"] != previous) == (t in variance_steps), t
    for s in staged:
        assert s["resumed"] == s["record"][-1]["params"]
