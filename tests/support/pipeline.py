"""The pipeline oracle: a tiny Llama trained on learnable batches by a single process on the full batch, the
losses and first gradients every pipeline schedule and composition must reproduce."""
from functools import lru_cache

import torch

MODEL = dict(dim=32, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=64)
BATCH, SEQ = 8, 16


def model_config():
    from orchestrate.models.llama import LlamaConfig

    return LlamaConfig(**MODEL)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences with random start and stride: learnable, so the loss curves actually move."""
    generator = torch.Generator().manual_seed(step)
    start, stride = (torch.randint(0, MODEL["vocab_size"], (2, BATCH, 1), generator=generator))
    tokens = (start + stride * torch.arange(SEQ + 1)) % MODEL["vocab_size"]
    return tokens[:, :-1], tokens[:, 1:]


def build_optimizer(name: str, params):
    # Moderate rates: at AdamW lr=1e-2 fp32 summation-order noise (1e-7) grows to 5e-3 within 20 steps on
    # either side, so the curves would differ for reasons that are not the pipeline's.
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


def train(forward_backward, params, n_steps: int, optimizer_name: str, sync=None):
    """Losses per step and the (synced) gradients of step 0; forward_backward(step) returns the loss or None."""
    optimizer = build_optimizer(optimizer_name, list(params))
    losses, first_grads = [], None
    for step in range(n_steps):
        optimizer.zero_grad()
        loss = forward_backward(step)
        if sync is not None:
            sync.before_optimizer(step)
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in params.named() if p.grad is not None}
        optimizer.step()
        losses.append(None if loss is None else loss.item())
    return losses, first_grads


class Params(list):
    """Parameters in optimizer order plus their global names."""

    def __init__(self, named):
        named = list(named)
        super().__init__(p for _, p in named)
        self._named = named

    def named(self):
        return self._named


@lru_cache(maxsize=None)
def full_batch_reference(n_steps: int, optimizer_name: str):
    from orchestrate.models.llama import build_llama, cross_entropy_loss

    model = build_llama(model_config(), seed=0)

    def forward_backward(step):
        tokens, targets = batch(step)
        loss = cross_entropy_loss(model(tokens), targets)
        loss.backward()
        return loss

    return train(forward_backward, Params(model.named_parameters()), n_steps, optimizer_name)
