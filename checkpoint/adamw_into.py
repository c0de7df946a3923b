"""An AdamW step whose results land in other tensors: the next snapshot's slot, so the snapshot costs no copy.

Why by hand: torch's optimizers update parameters and moments in place, so keeping the previous version intact
while the new one is written needs a copy of the whole state every step. Here each first operation of torch's
single-tensor AdamW (``torch/optim/adam.py: _single_tensor_adam``, the path ``foreach=False`` takes) reads the
old tensor and writes the target (``torch.mul(..., out=)``, ``torch.lerp(..., out=)``) and the rest runs in place
on the target: the same kernels in the same order, so the results are bit-identical to ``optimizer.step()`` and
the memory traffic is the same as the in-place step's. A target may be the very tensor it replaces (an
element-wise op on identical memory is the in-place op).

The step count goes to its target too (``torch.add(..., out=)``; the fused path fills it), so a version's slot
holds all of the step's results. The caller then points the parameters, moments and step counts at the targets (``tensor.data =
target``), which keeps every Python object (the module's parameters, the optimizer's state, DDP's references) the
same.

With ``fused=True`` the step is torch's fused kernel's, reproduced bit for bit by checkpoint/fused_adamw_into.py
(float32 parameters; where that kernel is not available here the caller falls back to a copy).
"""
from __future__ import annotations

from typing import Optional

import torch

from orchestrate.checkpoint import fused_adamw_into

# the settings under which torch's AdamW/Adam takes the single-tensor or fused path mirrored here
_REQUIRED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def unsupported_reason(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why ``step_into`` cannot stand in for ``optimizer.step()`` bit for bit, or None when it can."""
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        return f"the optimizer is {type(optimizer).__name__}, not AdamW"
    for group in optimizer.param_groups:
        for key, wanted in _REQUIRED.items():
            if group.get(key) is not wanted:
                return f"{key}={group.get(key)!r}"
        if group.get("fused"):
            if any(p.dtype != torch.float32 or not p.is_contiguous() for p in group["params"]):
                return "fused=True with a parameter that is not contiguous float32"
            if fused_adamw_into.kernel() is None:
                return "fused=True and the fused kernel into snapshot slots is not available here (see the log)"
        elif group.get("foreach") is not False:
            return f"foreach={group.get('foreach')!r}"
        if not isinstance(group["lr"], float) or any(isinstance(b, torch.Tensor) for b in group["betas"]):
            return "a tensor lr or beta"
        if group["weight_decay"] and not group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)):
            return "coupled weight decay"
        if any(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in group["params"]):
            return "a parameter that is not a plain tensor"
        if any(p.device.type != "cpu" or torch.is_complex(p) for p in group["params"]):
            return "a parameter that is not a real CPU tensor"
    return None


def ensure_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the moments and step count torch would create at the first step, for parameters with a gradient."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None and not optimizer.state.get(param):
                optimizer.state[param] = {
                    "step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


Targets = dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def step_into(optimizer: torch.optim.Optimizer, targets: Targets) -> list[torch.Tensor]:
    """``optimizer.step()`` with parameter, ``exp_avg``, ``exp_avg_sq`` and ``step`` of each parameter in
    ``targets`` written to its (param, exp_avg, exp_avg_sq, step) targets instead (parameters without a gradient
    are skipped, as torch skips them). Returns the parameters it updated; their old tensors are left as they
    were."""
    ensure_state(optimizer)
    updated = []
    for group in optimizer.param_groups:
        if group.get("fused"):
            updated += _fused_group_into(optimizer, group, targets)
            continue
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = optimizer.state[param]
            param_out, exp_avg_out, exp_avg_sq_out, step_out = targets[param]
            grad = param.grad
            step_t = torch.add(state["step"], 1, out=step_out)
            if weight_decay != 0:
                torch.mul(param, 1 - lr * weight_decay, out=param_out)
            elif param_out.data_ptr() != param.data_ptr():
                param_out.copy_(param)
            torch.lerp(state["exp_avg"], grad, 1 - beta1, out=exp_avg_out)
            torch.mul(state["exp_avg_sq"], beta2, out=exp_avg_sq_out).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            denom = (exp_avg_sq_out.sqrt() / bias_correction2_sqrt).add_(eps)
            param_out.addcdiv_(exp_avg_out, denom, value=-step_size)
            updated.append(param)
    optimizer._opt_called = True  # what the step torch's LR schedulers patch in records (else they warn)
    return updated


def _fused_group_into(optimizer: torch.optim.Optimizer, group: dict, targets: Targets) -> list[torch.Tensor]:
    """One group's step with torch's fused arithmetic (its step counts incremented first, as torch does)."""
    params = [p for p in group["params"] if p.grad is not None]
    states = [optimizer.state[p] for p in params]
    steps = [targets[p][3] for p in params]
    for step, state in zip(steps, states):  # torch's float32 ``step + 1``: the double sum rounded once to float32
        step.fill_(state["step"].item() + 1)
    (beta1, beta2), weight_decay = group["betas"], group["weight_decay"]
    if not group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)):
        weight_decay = 0.0  # plain Adam reaches here only without weight decay (``unsupported_reason``)
    fused_adamw_into.kernel().step(
        [(p.detach(), s["exp_avg"], s["exp_avg_sq"]) for p, s in zip(params, states)],
        [p.grad.contiguous() for p in params], [targets[p][:3] for p in params],
        [step.item() for step in steps], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=weight_decay)
    return params
