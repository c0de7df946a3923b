"""DiLoCo and Streaming DiLoCo on real gloo ranks: the checks of docs/lowcomm.md sections 1.3 and 2.3 plus byte
accounting.

Each spawn runs many checks (spawning is the slow part); the parent compares against references.
"""
import copy

import torch

from orchestrate.parallel.local_ranks import run_ranks
from tests.support.lowcomm import (TinyNet, adamw, batch, fingerprint, flat_params, full_batch, loss_fn, sgd,
                                   singleton_group, train_step)


def _diloco(group, config, make_optimizer, seed=0):
    from orchestrate.parallel.sync.diloco import DiLoCoSync

    model = TinyNet(seed=seed)
    sync = DiLoCoSync(group, config=config)
    sync.wrap_model(model)
    return model, sync, make_optimizer(model)


def _streaming(group, config, make_optimizer, n_layers=4):
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoSync

    model = TinyNet(n_layers=n_layers)
    sync = StreamingDiLoCoSync(group, config=config)
    sync.wrap_model(model, model.layers)
    return model, sync, make_optimizer(model)


def _linear_equivalence(rank, group):
    """Oracle 1.3.1: H=1 with SGD inner optimisers is DDP SGD."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    runs = {
        "outer_identity": (DiLoCoConfig(sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False),
                           lambda m: sgd(m, lr=0.1, momentum=0.9, weight_decay=0.01)),
        "outer_nesterov": (DiLoCoConfig(sync_every=1, outer_lr=0.7, outer_momentum=0.9, nesterov=True),
                           lambda m: sgd(m, lr=0.1)),
    }
    results = {}
    for name, (config, make_optimizer) in runs.items():
        model, sync, optimizer = _diloco(group, config, make_optimizer)
        for step in range(5):
            train_step(model, sync, optimizer, step, batch(rank, step))
        results[name] = flat_params(model)
    return results


def _single_replica(rank):
    """Oracle 1.3.2: W=1, outer SGD(1, 0) is plain training (live params compared every step)."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    config = DiLoCoConfig(sync_every=3, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    model, sync, optimizer = _diloco(singleton_group(), config, adamw)
    plain = TinyNet()
    plain_optimizer = adamw(plain)
    worst = 0.0
    for step in range(7):
        train_step(model, sync, optimizer, step, batch(rank, step))
        plain_optimizer.zero_grad()
        loss_fn(plain, *batch(rank, step)).backward()
        plain_optimizer.step()
        worst = max(worst, (flat_params(model) - flat_params(plain)).abs().max().item())
    return worst, sync.counter.total


def _averaging_and_invariants(rank, group, world):
    """Oracles 1.3.3 (outer SGD(1,0) averages), 1.3.4 (cross-rank invariants), 1.3.5 (bytes)."""
    from orchestrate.parallel import comm
    from orchestrate.parallel.sync.diloco import DiLoCoConfig

    results = {"averaging": []}
    model, sync, optimizer = _diloco(group, DiLoCoConfig(sync_every=3, outer_lr=1.0, outer_momentum=0.0,
                                                         nesterov=False), adamw)
    for step in range(6):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()
        before = flat_params(model)
        sync.after_optimizer(step)
        if (step + 1) % 3 == 0:
            results["averaging"].append((before, flat_params(model)))

    model, sync, optimizer = _diloco(group, DiLoCoConfig(sync_every=2), adamw)
    results["sent_per_step"], results["fingerprints"] = [], []
    for step in range(6):
        sent = sync.counter.total
        train_step(model, sync, optimizer, step, batch(rank, step))
        results["sent_per_step"].append(sync.counter.total - sent)
        if (step + 1) % 2 == 0:
            fragment = sync.fragments[0]
            inner = [s["exp_avg"] for s in optimizer.state.values()]
            results["fingerprints"].append({"live": fingerprint(model.parameters()),
                                            "global": fingerprint([fragment.global_params]),
                                            "momentum": fingerprint([fragment.momentum]),
                                            "inner": fingerprint(inner)})
    param_bytes = sum(comm.tensor_nbytes(p) for p in model.parameters())
    results["sync_bytes"] = comm.all_reduce_bytes(param_bytes, world)
    results["peak"] = sync.counter.peak
    return results


def _streaming_equals_diloco(rank, group):
    """Oracle 2.3.1: P=1, tau=0 Streaming DiLoCo is DiLoCo, bitwise."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig

    plain = _diloco(group, DiLoCoConfig(sync_every=3), adamw)
    streaming = _streaming(group, StreamingDiLoCoConfig(sync_every=3, outer_lr=0.7, quantization="none",
                                                        layers_per_fragment=0, overlap_steps=0), adamw)
    for step in range(7):
        for model, sync, optimizer in (plain, streaming):
            train_step(model, sync, optimizer, step, batch(rank, step))
    return {"live": [fingerprint(run[0].parameters()) for run in (plain, streaming)],
            "global": [fingerprint(run[1].outer_parameters().values()) for run in (plain, streaming)],
            "bytes": [(run[1].counter.total, run[1].counter.peak) for run in (plain, streaming)]}


def _streaming_merge(rank, group, alpha):
    """Oracle 2.3.3 (tau=1): alpha=0 leaves theta_p == phi_p; alpha=1 leaves theta_p alone while phi_p moves.
    Also records the bytes of every step (oracles 2.3.2 and 2.3.5)."""
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig

    config = StreamingDiLoCoConfig(sync_every=6, quantization="none", layers_per_fragment=2, overlap_steps=1,
                                   merge_alpha=alpha)
    model, sync, optimizer = _streaming(group, config, adamw)
    checks, sent_per_step, fragment_sizes = [], [], [f.numel for f in sync.fragments]
    for step in range(12):
        optimizer.zero_grad()
        loss_fn(model, *batch(rank, step)).backward()
        optimizer.step()
        applying = sync.inflight_fragment
        live_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        global_before = {n: v.clone() for n, v in sync.outer_parameters().items()}
        sent = sync.counter.total
        sync.after_optimizer(step)
        sent_per_step.append(sync.counter.total - sent)
        if applying is None:
            continue
        live = dict(model.named_parameters())
        names = sync.fragments[applying].flat.names
        outer = sync.outer_parameters()
        checks.append({
            "fragment": applying,
            "live_equals_global": all(torch.equal(live[n], outer[n].to(live[n].dtype)) for n in names),
            "live_unchanged": all(torch.equal(live[n], live_before[n]) for n in names),
            "global_moved": all(not torch.equal(outer[n], global_before[n]) for n in names),
        })
    return {"checks": checks, "sent_per_step": sent_per_step, "fragment_sizes": fragment_sizes,
            "peak": sync.counter.peak}


def _replica_means(rank, group):
    """ReplicaMean quantised: the result for the parent to recompute, identical on all ranks."""
    from orchestrate.parallel import comm
    from orchestrate.parallel.quantize import build_quantizer
    from orchestrate.parallel.sync.diloco import ReplicaMean

    results = {}
    for name in ("e3m0", "int8"):
        local = torch.randn(1001, generator=torch.Generator().manual_seed(rank))
        counter = comm.CommCounter()
        pending = ReplicaMean(local.clone(), group, counter, build_quantizer(name, 32))
        results[name] = (local, pending.result(), counter.total)
    return results


def _checkpoint_in_flight(rank, group):
    """A checkpoint taken while a quantised fragment sync is in flight resumes bitwise identically."""
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig

    config = StreamingDiLoCoConfig(sync_every=12, layers_per_fragment=2, overlap_steps=2, quant_block=32)
    model, sync, optimizer = _streaming(group, config, adamw)
    for step in range(16):
        train_step(model, sync, optimizer, step, batch(rank, step))
    assert sync.inflight_fragment is not None
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             {k: v.clone() for k, v in sync.state_dict().items()})
    resumed, resumed_sync, resumed_optimizer = _streaming(group, config, adamw)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_sync.load_state_dict(saved[2])
    for step in range(16, 24):
        for run_model, run_sync, run_optimizer in ((model, sync, optimizer),
                                                   (resumed, resumed_sync, resumed_optimizer)):
            train_step(run_model, run_sync, run_optimizer, step, batch(rank, step))
    return [fingerprint(m.parameters()) for m in (model, resumed)], \
        [fingerprint(s.state_dict().values()) for s in (sync, resumed_sync)]


def _llama_streaming_e3m0(rank, group, world):
    """Streaming DiLoCo with 4-bit Delta trains the Llama model; the peak is one fragment's packed bytes."""
    from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss
    from orchestrate.parallel import comm
    from orchestrate.parallel.quantize import build_quantizer, round_up
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig, StreamingDiLoCoSync

    model = build_llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2), seed=0)
    sync = StreamingDiLoCoSync(group, config=StreamingDiLoCoConfig(sync_every=6, layers_per_fragment=1,
                                                                   outer_lr=0.7, quant_block=64))
    sync.wrap_model(model, model.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(rank))
    losses = []
    for step in range(24):
        optimizer.zero_grad()
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
        sync.before_optimizer(step)
        optimizer.step()
        sync.after_optimizer(step)
    quantizer = build_quantizer("e3m0", 64)

    def packed_sync_bytes(numel):
        chunk = round_up(-(-numel // world), 64)
        payload, scales = chunk * world // 2, chunk * world // 64 * 4
        return (comm.all_to_all_bytes(payload, world) + comm.all_to_all_bytes(scales, world)
                + comm.all_gather_bytes(payload // world, world) + comm.all_gather_bytes(scales // world, world))

    largest = max(f.numel for f in sync.fragments)
    return {"losses": losses, "peak": sync.counter.peak, "expected_peak": packed_sync_bytes(largest),
            "names": [f.flat.names for f in sync.fragments], "quantizer_bits": quantizer.bits,
            "fp32_diloco_bytes": comm.all_reduce_bytes(4 * sum(f.numel for f in sync.fragments), world),
            "total": sync.counter.total}


def _ddp_warmup(rank, group):
    """ddp_warmup_steps=W: W steps of DDP (the replicas stay identical), then exactly DiLoCo (and Streaming DiLoCo)
    started afresh from the common parameters; the warm-up's gradient all-reduces are counted."""
    from orchestrate.parallel.sync.diloco import DiLoCoConfig, DiLoCoSync
    from orchestrate.parallel.sync.streaming_diloco import StreamingDiLoCoConfig, StreamingDiLoCoSync

    diloco = dict(sync_every=2, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    streaming = dict(sync_every=6, outer_lr=0.7, quantization="none", layers_per_fragment=2, overlap_steps=1)
    return {"diloco": _warmup_then(rank, group, DiLoCoSync, DiLoCoConfig, diloco),
            "streaming": _warmup_then(rank, group, StreamingDiLoCoSync, StreamingDiLoCoConfig, streaming)}


def _warmup_then(rank, group, sync_class, config_class, outer):
    from orchestrate.parallel.sync.ddp import DDPSync

    warmup, steps = 3, 7
    model = TinyNet()
    sync = sync_class(group, config=config_class(ddp_warmup_steps=warmup, **outer))
    sync.wrap_model(model, model.layers)
    optimizer = sgd(model)
    after_warmup = None
    for step in range(warmup + steps):
        train_step(model, sync, optimizer, step, batch(rank, step))
        if step == warmup - 1:
            after_warmup, warmup_bytes = fingerprint([flat_params(model)]), sync.counter.total
    reference = TinyNet()
    reference_optimizer = sgd(reference)
    ddp = DDPSync(group, use_torch_ddp=False)
    ddp.wrap_model(reference)
    for step in range(warmup):
        train_step(reference, ddp, reference_optimizer, step, batch(rank, step))
    fresh = sync_class(group, config=config_class(**outer))
    fresh.wrap_model(reference, reference.layers)
    for step in range(steps):
        train_step(reference, fresh, reference_optimizer, step, batch(rank, warmup + step))
    return {"after_warmup": after_warmup, "same_as_reference": flat_params(model).equal(flat_params(reference)),
            "warmup_bytes": warmup_bytes, "ddp_bytes": ddp.counter.total}


def _world2(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"linear": _linear_equivalence(rank, group), "single": _single_replica(rank),
            "invariants": _averaging_and_invariants(rank, group, world),
            "streaming_equals_diloco": _streaming_equals_diloco(rank, group),
            "merge0": _streaming_merge(rank, group, 0.0), "merge1": _streaming_merge(rank, group, 1.0),
            "means": _replica_means(rank, group), "checkpoint": _checkpoint_in_flight(rank, group),
            "llama": _llama_streaming_e3m0(rank, group, world), "warmup": _ddp_warmup(rank, group)}


def _world4(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    return {"invariants": _averaging_and_invariants(rank, group, world), "means": _replica_means(rank, group),
            "merge0": _streaming_merge(rank, group, 0.0)}


def _reference_sgd(world, steps, **kwargs):
    model = TinyNet()
    optimizer = sgd(model, **kwargs)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, *full_batch(world, step)).backward()
        optimizer.step()
    return flat_params(model)


def _expected_mean(inputs, name, world):
    """Quantise each replica's input, sum chunk-wise in fp32 in rank order, average, re-quantise."""
    from orchestrate.parallel.quantize import Packed, build_quantizer, pad_to, round_up

    quantizer = build_quantizer(name, 32)
    chunk = round_up(-(-inputs[0].numel() // world), 32)
    decoded = [quantizer.decode(quantizer.encode(pad_to(x, chunk * world))) for x in inputs]
    total = torch.zeros(chunk * world)
    for values in decoded:
        total += values
    chunks = [quantizer.encode(c / world) for c in total.split(chunk)]
    packed = Packed(torch.cat([c.payload for c in chunks]), torch.cat([c.scales for c in chunks]))
    return quantizer.decode(packed)[: inputs[0].numel()]


def _check_invariants(results, world):
    invariants = [r["invariants"] for r in results]
    for sync_index in range(2):
        mean_before = torch.stack([inv["averaging"][sync_index][0] for inv in invariants]).mean(0)
        for inv in invariants:
            torch.testing.assert_close(inv["averaging"][sync_index][1], mean_before, rtol=0, atol=1e-14)
    for rank_fps in zip(*[inv["fingerprints"] for inv in invariants]):
        assert len({fp["live"] for fp in rank_fps}) == 1
        assert len({fp["global"] for fp in rank_fps}) == 1
        assert len({fp["momentum"] for fp in rank_fps}) == 1
        assert len({fp["inner"] for fp in rank_fps}) == world  # inner Adam state is never synced
    for inv in invariants:
        assert inv["sent_per_step"] == [0, inv["sync_bytes"]] * 3
        assert inv["peak"] == inv["sync_bytes"]


def _check_merge(merge, alpha, world):
    from orchestrate.parallel import comm

    assert merge["checks"] and {c["fragment"] for c in merge["checks"]} == {0, 1, 2}
    for check in merge["checks"]:
        assert check["global_moved"]
        assert check["live_equals_global"] if alpha == 0.0 else check["live_unchanged"]
    sizes = merge["fragment_sizes"]
    events = [b for b in merge["sent_per_step"] if b]
    # fragment p is sent after step s with (s + 1) % 6 == 2p: once per 6-step window, in order
    expected = [comm.all_reduce_bytes(8 * sizes[p], world) for p in (1, 2, 0, 1, 2, 0)]
    assert events == expected
    assert sum(comm.all_reduce_bytes(8 * n, world) for n in sizes) == sum(merge["sent_per_step"][5:11])
    assert merge["peak"] == max(expected)


def _check_means(results, world):
    for name in ("e3m0", "int8"):
        inputs = [r["means"][name][0] for r in results]
        expected = _expected_mean(inputs, name, world)
        for result in results:
            assert torch.equal(result["means"][name][1], expected)
        exact = torch.stack(inputs).mean(0)
        tolerance = 0.5 if name == "e3m0" else 0.05
        assert (expected - exact).abs().max() < tolerance * exact.abs().max()


def test_diloco_and_streaming_world2():
    world = 2
    results = run_ranks(world, _world2, timeout_s=120)
    identity = _reference_sgd(world, 5, lr=0.1, momentum=0.9, weight_decay=0.01)
    nesterov = _reference_sgd(world, 5, lr=0.07, momentum=0.9, nesterov=True)
    for result in results:
        torch.testing.assert_close(result["linear"]["outer_identity"], identity, rtol=0, atol=1e-14)
        torch.testing.assert_close(result["linear"]["outer_nesterov"], nesterov, rtol=0, atol=1e-14)
        worst, sent = result["single"]
        assert worst <= 1e-14 and sent == 0
        same = result["streaming_equals_diloco"]
        assert same["live"][0] == same["live"][1] and same["global"][0] == same["global"][1]
        assert same["bytes"][0] == same["bytes"][1]
        _check_merge(result["merge0"], 0.0, world)
        _check_merge(result["merge1"], 1.0, world)
        live, state = result["checkpoint"]
        assert live[0] == live[1] and state[0] == state[1]
    _check_invariants(results, world)
    _check_means(results, world)
    for name in ("diloco", "streaming"):
        warmups = [result["warmup"][name] for result in results]
        assert warmups[0]["after_warmup"] == warmups[1]["after_warmup"]
        assert all(w["same_as_reference"] and w["warmup_bytes"] == w["ddp_bytes"] > 0 for w in warmups)
    assert results[0]["merge0"]["sent_per_step"] == results[1]["merge0"]["sent_per_step"]

    llama = results[0]["llama"]
    assert [n for n in llama["names"][0] if "layers" in n] and all("layers.0." in n for n in llama["names"][0])
    assert all("layers" not in n for n in llama["names"][-1])
    assert llama["peak"] == llama["expected_peak"]
    assert llama["total"] * 6 < llama["fp32_diloco_bytes"] * 4  # 4 windows of 4-bit vs fp32, with scales
    for result in results:
        losses = result["llama"]["losses"]
        assert sum(losses[-4:]) / 4 < 0.8 * losses[0]


def test_diloco_world4():
    world = 4
    results = run_ranks(world, _world4, timeout_s=120)
    _check_invariants(results, world)
    _check_means(results, world)
    for result in results:
        _check_merge(result["merge0"], 0.0, world)
