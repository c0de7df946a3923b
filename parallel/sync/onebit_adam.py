"""1-bit Adam (arXiv 2102.02888, as DeepSpeed implements it).

Warmup (the first ``freeze_step`` optimizer steps): plain Adam on gradients averaged over the replica group in
full precision (the DDP reference all-reduce). After it the variance v is frozen, the gradient all-reduce stops,
and what travels is the momentum: every replica updates its momentum with its local gradient, and the momenta
are averaged by an error-compensated 1-bit all-reduce (``OneBitAllReduce``), about N/4 bytes per step instead of
8N. The update is p <- p - lr * (m / (sqrt(v) + eps) + wd * p) with decoupled weight decay; no bias correction
by default (DeepSpeed's behaviour), optional ``bias_correction`` as in torch's AdamW.

Not copied from DeepSpeed: its first step() only allocates buffers without moving the params (here every step
updates); error buffers are per worker and checkpointed (DeepSpeed resets them on load; here they are kept
unless the replica count changed). All momenta travel in one flat buffer, not one collective per tensor.

Trainer contract: no DDP wrapper (``wrap_model`` returns the model); ``build_optimizer`` replaces the default
optimizer by ``OneBitAdam`` with the default's per-group lr, weight decay, betas and eps; call ``before_optimizer``
(it averages gradients during warmup) and ``after_optimizer`` every step. Restore ``load_state_dict`` after the
optimizer's own state (it restores the step count and the frozen variance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from orchestrate.parallel import comm
from orchestrate.parallel.quantize import pad_to, round_up, sign_compress, unpack_signs
from orchestrate.parallel.sync.base import SyncStrategy
from orchestrate.parallel.sync.ddp import DDPSync
from orchestrate.parallel.sync.tensors import local_tensor, outer_dtype


@dataclass(frozen=True)
class OneBitAdamConfig:
    freeze_step: int = 1000  # warmup steps with full-precision gradients; set to 15-25% of the total steps
    bias_correction: bool = False  # DeepSpeed applies none despite its flag

    def __post_init__(self):
        if self.freeze_step < 1:
            raise ValueError(f"freeze_step={self.freeze_step}: must be >= 1 (v must be estimated before freezing)")


def padded_numel(numel: int, world: int) -> int:
    """A multiple of W * lcm(W, 8): every rank's chunk packs into whole bytes."""
    return round_up(max(numel, 1), world * math.lcm(world, 8))


class OneBitAllReduce:
    """Mean over the replica group with error feedback on the worker and on the server (DeepSpeed's
    compressed_allreduce). Phase 1: every rank compresses x + e_w to one scale and its signs, and an all-to-all
    gives rank k chunk k of every rank's signs (the scales are all-gathered). Phase 2: rank k averages its chunk,
    compresses it with e_s, and an all-gather of the signs and scales rebuilds the whole mean on every rank."""

    def __init__(self, numel: int, dtype: torch.dtype, group, counter: comm.CommCounter):
        self.group, self.counter, self.numel = group, counter, numel
        self.world = comm.group_size(group)
        self.padded = padded_numel(numel, self.world)
        self.worker_error = torch.zeros(self.padded, dtype=dtype)
        self.server_error = torch.zeros(self.padded // self.world, dtype=dtype)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return flat
        signs, scale = self._compress_worker(pad_to(flat, self.padded))
        chunks, scales = self._exchange(signs, scale, all_to_all=True)
        server_signs, server_scale = self._compress_server(chunks, scales)
        chunks, scales = self._exchange(server_signs, server_scale, all_to_all=False)
        mean = torch.cat([s * unpack_signs(chunk, flat.dtype) for s, chunk in zip(scales, chunks)])
        return mean[: self.numel]

    def _compress_worker(self, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signs, scale, error = sign_compress(padded + self.worker_error)
        self.worker_error.copy_(error)
        return signs, scale

    def _compress_server(self, chunks: list[torch.Tensor], scales: torch.Tensor):
        total = torch.zeros_like(self.server_error)
        for scale, chunk in zip(scales, chunks):  # rank order
            total += scale * unpack_signs(chunk, total.dtype)
        signs, scale, error = sign_compress(total / self.world + self.server_error)
        self.server_error.copy_(error)
        return signs, scale

    def _exchange(self, signs: torch.Tensor, scale: torch.Tensor, all_to_all: bool):
        """Phase 1 (all-to-all of my signs' chunks) or phase 2 (all-gather of my chunk), plus the scales."""
        received = torch.empty(signs.numel() * (1 if all_to_all else self.world), dtype=torch.uint8)
        scales = torch.empty(self.world, dtype=scale.dtype)
        if all_to_all:
            work = comm.all_to_all(received, signs, self.group, self.counter, async_op=True)
        else:
            work = comm.all_gather_into(received, signs, self.group, self.counter, async_op=True)
        comm.all_gather_into(scales, scale.reshape(1), self.group, self.counter)
        work.wait()
        return list(received.chunk(self.world)), scales

    def state(self) -> dict[str, torch.Tensor]:
        return {"worker_error": self.worker_error, "server_error": self.server_error}


class OneBitAdam(torch.optim.Optimizer):
    """Adam whose momentum is averaged by ``momentum_mean`` once v is frozen (gradients must be averaged by the
    caller before that). Works on each parameter's local shard."""

    def __init__(self, params, momentum_mean: Callable[[torch.Tensor], torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 1000, bias_correction: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.momentum_mean = momentum_mean
        self.freeze_step = freeze_step
        self.bias_correction = bias_correction
        self.step_count = 0
        self.state_dtype = outer_dtype([p for group in self.param_groups for p in group["params"]])

    @property
    def frozen(self) -> bool:
        """True once the next step uses the frozen variance and compressed momentum."""
        return self.step_count >= self.freeze_step

    def _moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state[param]
        if "exp_avg" not in state:
            shape = local_tensor(param).shape
            state["exp_avg"] = torch.zeros(shape, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=self.state_dtype)
        return state["exp_avg"], state["exp_avg_sq"]

    @staticmethod
    def _local_grad(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if param.grad is None:
            return torch.zeros_like(like)
        return local_tensor(param.grad).to(like.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        frozen = self.frozen
        self.step_count += 1
        # After the freeze every parameter takes part (a missing gradient counts as zero): the flat momentum
        # layout must be the same on all replicas. Before it, parameters without gradients are skipped, as in torch.
        updated = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None and not frozen:
                    continue
                exp_avg, exp_avg_sq = self._moments(param)
                grad = self._local_grad(param, exp_avg)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                if not frozen:
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                updated.append((param, group))
        if frozen:
            self._average_momenta()
        for param, group in updated:
            self._update(param, group)
        return loss

    def _average_momenta(self) -> None:
        momenta = [self._moments(p)[0] for group in self.param_groups for p in group["params"]]
        mean = self.momentum_mean(torch.cat([m.reshape(-1) for m in momenta]))
        for momentum, chunk in zip(momenta, mean.split([m.numel() for m in momenta])):
            momentum.copy_(chunk.view_as(momentum))

    def _update(self, param: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq = self.state[param]["exp_avg"], self.state[param]["exp_avg_sq"]
        variance_steps = min(self.step_count, self.freeze_step)
        correction1 = 1 - beta1 ** self.step_count if self.bias_correction else 1.0
        correction2 = 1 - beta2 ** variance_steps if self.bias_correction else 1.0
        local = local_tensor(param)
        value = local.to(self.state_dtype)
        value.mul_(1 - lr * weight_decay)  # torch AdamW's order: decay first, then the Adam step
        denominator = (exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(eps)
        value.addcdiv_(exp_avg, denominator, value=-lr / correction1)
        local.copy_(value)


class OneBitAdamSync(SyncStrategy):
    name = "onebit_adam"
    state_prefix = "onebit_adam"

    def __init__(self, replica_group, counter: Optional[comm.CommCounter] = None,
                 config: Optional[OneBitAdamConfig] = None):
        super().__init__(replica_group, counter)
        self.config = config or OneBitAdamConfig()
        self._gradient_mean = DDPSync(replica_group, self.counter, use_torch_ddp=False)
        self.momentum_mean: Optional[OneBitAllReduce] = None
        self._names: dict[int, str] = {}

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        self.model = model
        self._names = {id(param): name for name, param in model.named_parameters()}
        self._gradient_mean.wrap_model(model, blocks)
        return model

    @staticmethod
    def _default_groups(params: Iterable[nn.Parameter], build_default) -> list[dict]:
        """The default optimizer's param groups with their lr, weight decay, betas and eps."""
        default = build_default(list(params))
        return [{"params": group["params"], "lr": group["lr"], "weight_decay": group.get("weight_decay", 0.0),
                 "betas": group.get("betas", (0.9, 0.999)), "eps": group.get("eps", 1e-8)}
                for group in default.param_groups]

    def _one_bit_mean(self, groups: list[dict]) -> OneBitAllReduce:
        """One flat error-compensated 1-bit mean over all the groups' local shards."""
        all_params = [p for group in groups for p in group["params"]]
        numel = sum(local_tensor(p).numel() for p in all_params)
        self.momentum_mean = OneBitAllReduce(numel, outer_dtype(all_params), self.replica_group, self.counter)
        return self.momentum_mean

    def build_optimizer(self, params: Iterable[nn.Parameter], build_default) -> torch.optim.Optimizer:
        groups = self._default_groups(params, build_default)
        self.optimizer = OneBitAdam(groups, self._one_bit_mean(groups), freeze_step=self.config.freeze_step,
                                    bias_correction=self.config.bias_correction)
        return self.optimizer

    def before_optimizer(self, step: int) -> None:
        if not self.optimizer.frozen:
            self._gradient_mean.before_optimizer(step)

    def after_optimizer(self, step: int) -> None:
        self.counter.end_event()

    def _variance_views(self) -> dict[str, torch.Tensor]:
        views = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                views[f"{self.state_prefix}.exp_avg_sq.{self._names[id(param)]}"] = self.optimizer._moments(param)[1]
        return views

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.state_prefix}.step": torch.tensor(self.optimizer.step_count, dtype=torch.int64)}
        state.update(self._variance_views())
        state.update({f"{self.state_prefix}.{k}": v for k, v in self.momentum_mean.state().items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Error buffers saved with another replica count do not fit this layout and restart at zero."""
        if f"{self.state_prefix}.step" not in state:
            return
        self.optimizer.step_count = int(state[f"{self.state_prefix}.step"])
        for key, target in self._variance_views().items():
            target.copy_(state[key])
        for key, target in self.momentum_mean.state().items():
            saved = state.get(f"{self.state_prefix}.{key}")
            if saved is not None and saved.shape == target.shape:
                target.copy_(saved)
            else:
                target.zero_()
