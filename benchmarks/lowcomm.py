"""Low-communication sync strategies vs DDP on the toy task of shared/specs/lowcomm.md section 5, as markdown.

Teacher-student 10-class classification (32-dim inputs; student MLP 32-128-10), W workers (default 4), batch 64
per worker, AdamW lr 3e-3 without weight decay as the inner/base optimizer, the same data stream for every run.
Reported per run: final eval cross-entropy on 4096 held-out samples (averaged over replicas: NoLoCo's differ;
Streaming DiLoCo is evaluated on its outer parameters), its ratio to DDP, and the bytes rank 0 sent in total and
in its largest single sync, relative to DDP. The gates are the spec's suggested ones (one seed: calibrate first).

    .venv/bin/python -m benchmarks.lowcomm [--steps 1500] [--workers 4]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch import nn

from tests.distributed import run_ranks

INPUTS, HIDDEN, CLASSES, BATCH, LR = 32, 128, 10, 64, 3e-3


@dataclass
class Run:
    name: str
    sync: str  # a parallel.sync.STRATEGIES name
    options: dict = field(default_factory=dict)
    single_worker: bool = False


def runs(steps: int) -> list[Run]:
    return [
        Run("DDP AdamW", "ddp"),
        Run("single worker", "ddp", single_worker=True),
        Run("DiLoCo H=10", "diloco", dict(sync_every=10)),
        Run("DiLoCo H=50", "diloco", dict(sync_every=50)),
        Run("FedAvg H=50", "diloco", dict(sync_every=50, outer_lr=1.0, outer_momentum=0.0, nesterov=False)),
        Run("Streaming DiLoCo H=50 P=2 tau=1 e3m0", "streaming_diloco",
            dict(sync_every=50, outer_lr=0.7, layers_per_fragment=1, quant_block=64)),
        Run("NoLoCo H=10", "noloco", dict(sync_every=10)),
        Run("NoLoCo H=50", "noloco", dict(sync_every=50)),
        Run("1-bit Adam T_w=20%", "onebit_adam", dict(freeze_step=max(1, steps // 5))),
        Run("uncompressed twin (no-bias-correction Adam)", "onebit_adam", dict(freeze_step=steps + 1)),
    ]


class Student(nn.Module):
    """32-128-10 MLP; blocks are named ``layers.<i>`` so Streaming DiLoCo can fragment them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"0": nn.Linear(INPUTS, HIDDEN), "1": nn.Linear(HIDDEN, CLASSES)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["1"](torch.relu(self.layers["0"](x)))


def teacher() -> nn.Module:
    torch.manual_seed(1234)
    net = nn.Sequential(nn.Linear(INPUTS, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    return net.requires_grad_(False)


def samples(net: nn.Module, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(count, INPUTS, generator=generator)
    return x, net(x).argmax(-1)


def _train(run: Run, steps: int, rank: int, net: nn.Module, eval_set) -> dict:
    import torch.distributed as dist

    from parallel.sync import build_sync

    singletons = [dist.new_group([r]) for r in range(dist.get_world_size())] if run.single_worker else None
    group = singletons[rank] if run.single_worker else dist.group.WORLD
    model = Student()
    sync = build_sync(run.sync, group, options=run.options)
    wrapped = sync.wrap_model(model)
    optimizer = sync.build_optimizer(model.parameters(),
                                     lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0))
    generator = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x, y = samples(net, BATCH, generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        sync.before_optimizer(step)
        optimizer.step()
        sync.after_optimizer(step)
    if hasattr(sync, "wait_for_exchanges"):
        sync.wait_for_exchanges()
    params = sync.outer_parameters() if run.sync == "streaming_diloco" else dict(model.named_parameters())
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (eval_set[0],))
        loss = nn.functional.cross_entropy(logits, eval_set[1]).item()
    return {"loss": loss, "total": sync.counter.total, "peak": sync.counter.peak}


def _worker(rank: int, world: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    net = teacher()
    eval_set = samples(net, 4096, torch.Generator().manual_seed(99))
    return [_train(run, steps, rank, net, eval_set) for run in runs(steps)]


def _gates(losses: dict[str, float], single: float, ddp: float) -> dict[str, tuple[str, bool]]:
    gates = {}
    for name, loss in losses.items():
        if name.startswith(("DiLoCo", "Streaming")):
            gates[name] = ("<= 1.10x DDP and < single", loss <= 1.10 * ddp and loss < single)
        elif name.startswith("NoLoCo"):
            gates[name] = ("<= 1.25x DDP and < single", loss <= 1.25 * ddp and loss < single)
    twin = losses["uncompressed twin (no-bias-correction Adam)"]
    gates["1-bit Adam T_w=20%"] = ("<= 1.05x uncompressed twin", losses["1-bit Adam T_w=20%"] <= 1.05 * twin)
    gates["FedAvg H=50"] = ("(soft) DiLoCo H=50 < FedAvg", losses["DiLoCo H=50"] < losses["FedAvg H=50"])
    return gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    per_rank = run_ranks(args.workers, _worker, args.steps, timeout_s=600)
    names = [run.name for run in runs(args.steps)]
    losses = {name: sum(r[i]["loss"] for r in per_rank) / args.workers for i, name in enumerate(names)}
    rank0 = dict(zip(names, per_rank[0]))
    ddp = rank0["DDP AdamW"]
    gates = _gates(losses, losses["single worker"], losses["DDP AdamW"])
    print(f"{args.workers} workers, {args.steps} steps, batch {BATCH} per worker\n")
    print("| run | eval CE | CE / DDP | total bytes / DDP | peak bytes / DDP | gate | pass |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        gate, passed = gates.get(name, ("", None))
        verdict = "" if passed is None else ("yes" if passed else "NO")
        print(f"| {name} | {losses[name]:.3f} | {losses[name] / losses['DDP AdamW']:.3f} | "
              f"{rank0[name]['total'] / ddp['total']:.4f} | {rank0[name]['peak'] / ddp['peak']:.4f} | "
              f"{gate} | {verdict} |")


if __name__ == "__main__":
    main()
