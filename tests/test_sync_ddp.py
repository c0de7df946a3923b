import torch

from orchestrate.parallel.local_ranks import run_ranks


def _ddp_grads(rank, world, use_torch_ddp):
    import torch.distributed as dist

    from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss
    from orchestrate.parallel import comm
    from orchestrate.parallel.sync.ddp import DDPSync

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = build_llama(cfg, seed=0)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(1))
    local = tokens[rank * 2: rank * 2 + 2]
    sync = DDPSync(dist.group.WORLD, use_torch_ddp=use_torch_ddp)
    wrapped = sync.wrap_model(model)
    cross_entropy_loss(wrapped(local[:, :-1]), local[:, 1:]).backward()
    sync.before_optimizer(0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, sync.counter.total, sum(comm.tensor_nbytes(p) for p in model.parameters())


def _reference_grads():
    from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = build_llama(cfg, seed=0)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(1))
    cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_ddp_gradients_match_full_batch_and_bytes_are_counted():
    reference = _reference_grads()
    for use_torch_ddp in (True, False):
        results = run_ranks(2, _ddp_grads, use_torch_ddp)
        for grads, sent, param_bytes in results:
            for name, grad in grads.items():
                torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)
            # ring all-reduce over 2 ranks sends 2*(W-1)/W = 1x the gradient bytes
            assert sent == param_bytes


def _fsdp_grads(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from orchestrate.models.llama import LlamaConfig, build_llama, cross_entropy_loss
    from orchestrate.parallel.sync.fsdp import FSDPSync

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = build_llama(cfg, seed=0)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(1))
    local = tokens[rank * 2: rank * 2 + 2]
    sync = FSDPSync(init_device_mesh("cpu", (world,)))
    wrapped = sync.wrap_model(model, model.layers)  # each block its own unit
    cross_entropy_loss(wrapped(local[:, :-1]), local[:, 1:]).backward()
    sync.before_optimizer(0)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return grads, sync.counter.total


def test_fsdp_gradients_match_full_batch_and_bytes_are_counted():
    reference = _reference_grads()
    layer_bytes = sum(g.numel() * 4 for n, g in reference.items() if n.startswith("layers."))
    root_bytes = sum(g.numel() * 4 for n, g in reference.items() if not n.startswith("layers."))
    for grads, sent in run_ranks(2, _fsdp_grads):
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)
        # W=2: every all-gather / reduce-scatter sends half of the bytes. Blocks are gathered in forward and
        # again in backward (resharded after forward); the root keeps its parameters gathered; one reduce-scatter.
        assert sent == (2 * layer_bytes + root_bytes) // 2 + (layer_bytes + root_bytes) // 2
