"""Shared pieces of the low-communication sync tests: a tiny float64 model with transformer-like parameter names,
deterministic per-rank data, the training-step contract, and cross-rank fingerprints."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from orchestrate.parallel.sync.base import sync_step

DIM = 8
INPUTS = 4
BATCH = 4


class TinyNet(nn.Module):
    """embed -> tanh blocks (``layers.<i>.*``) -> head, in float64 so oracles can be checked to 1e-12."""

    def __init__(self, n_layers: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(INPUTS, DIM)
        self.layers = nn.ModuleDict({str(i): nn.Linear(DIM, DIM) for i in range(n_layers)})
        self.head = nn.Linear(DIM, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers.values():
            h = torch.tanh(layer(h))
        return self.head(h).squeeze(-1)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, INPUTS, generator=generator, dtype=torch.float64)
    return x, torch.sin(x.sum(-1)) + 0.1 * rank


def full_batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [batch(rank, step) for rank in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def train_step(model, sync, optimizer, step: int, data) -> None:
    """One step of the trainer contract on the loss of ``data``."""
    sync_step(sync, optimizer, step, lambda: loss_fn(model, *data).backward())


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def singleton_group():
    """This rank alone, as a process group (a W=1 replica group inside a multi-rank test)."""
    groups = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
    return groups[dist.get_rank()]


def sgd(model, lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, foreach=False)


def adamw(model, lr=0.01):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False)


def reference_adam(world: int, steps: int, bias_correction: bool, lr: float, weight_decay: float) -> torch.Tensor:
    """Adam on the full batch of ``world`` ranks (= DDP-averaged gradients): torch AdamW, or DeepSpeed's form without
    bias correction (1-bit and 0/1 Adam follow it)."""
    model = TinyNet()
    if bias_correction:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
        for step in range(steps):
            optimizer.zero_grad()
            loss_fn(model, *full_batch(world, step)).backward()
            optimizer.step()
        return flat_params(model)
    moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()}
    for step in range(steps):
        model.zero_grad()
        loss_fn(model, *full_batch(world, step)).backward()
        with torch.no_grad():
            for p, (m, v) in moments.items():
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                p.mul_(1 - lr * weight_decay).sub_(lr * m / (v.sqrt() + 1e-8))
    return flat_params(model)
