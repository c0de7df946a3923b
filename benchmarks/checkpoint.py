"""End-to-end cost of checkpointing: training iteration time per method, as a ratio to no checkpointing.

The model is a Llama whose training state (parameters + AdamW moments, fp32) is >= 1 GiB by default.

Both harnesses train the same model, optimizer (AdamW with torch's fused kernel, the default and the fastest here),
LR schedule, grad clip and data, composed from the same overrides as ``orchestrate launch``, torch using every
core. orchestrate: ``python -m orchestrate launch parallel.dp=1`` (one worker), ``step_time`` per step from
``metrics.jsonl``. Plain PyTorch: one process, no Ray, wall time per iteration (data, forward, backward, clip,
optimizer step, checkpoint call).

A run's iteration time is the MEAN over steps 3..N (steps 1-2 are warm-up): a save every 10 steps is amortized as
a user pays it, where a median would hide it; the default N=12 puts exactly one every-10 save (step 10) in the
window. Background writes still running after step N are not counted, on either harness. A row's ratio is the
median over repeats of its ratio to the same harness's no-checkpointing run of that repeat; every repeat runs
each method once, one process at a time, in alternating order, so a change in machine load hits all alike. The
95% interval of a row's median ratio is distribution-free (order statistics, as a sign test), so it says whether a
goal is met beyond this machine's run-to-run swings: only an interval wholly under the goal shows it. The last
column is when step 1 ended, in seconds from the controller's start (orchestrate only; median over repeats): what a
method adds to the start of a run, e.g. the keepers' shared memory reserved and mapped before the first step.

Run: ``.venv/bin/python -m benchmarks.checkpoint [--repeats 5] [--steps 12] [--dim 1024] [--layers 8]``
(``--quick``: a tiny model and 2 repeats, a smoke test; ``--only keepers``: only the orchestrate rows without
checkpointing and with keepers every step, ``--only headline``: only the first and the headline row, so that more
repeats fit: on this kind of machine a 12-step run's mean moves by up to +-15% with the host's load, so a 5% goal
needs more than 5 repeats to be told apart; ``--joined``: every orchestrate run joins one Ray cluster the benchmark
starts instead of starting its own, which saves Ray's start and stop per run and changes nothing in the steps
measured). Prints a markdown table; the goal counts as shown only when the row's whole interval is under it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict

from benchmarks.stats import median_interval
from orchestrate.cli import compose_config
from orchestrate.cluster.ray_cluster import RayRuntime
from orchestrate.data import ResumableSampler
from orchestrate.models.llama import Llama, build_llama, cross_entropy_loss
from orchestrate.trainer import build_lr_scheduler, build_optimizer, clip_grad_norm_
from orchestrate.worker import build_data

REPO = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))
WARMUP_STEPS = 2
GOAL_RATIO = 1.05  # issue 12: orchestrate with keepers every step, as a ratio to no checkpointing
EVERY_STEP_KEEPERS = "orchestrate, snapshot every step + keepers, disk every 10"
ORCHESTRATE_METHODS = {
    "orchestrate, no checkpointing": ["checkpoint.every=0", "checkpoint.persist_every=0", "checkpoint.keepers=false"],
    EVERY_STEP_KEEPERS: ["checkpoint.every=1", "checkpoint.keepers=true", "checkpoint.persist_every=10"],
    "orchestrate, snapshot every step + keepers, no disk":  # the row above without its level-2 writes
        ["checkpoint.every=1", "checkpoint.keepers=true", "checkpoint.persist_every=0"],
    "orchestrate, snapshot every step, disk every 10, no keepers":
        ["checkpoint.every=1", "checkpoint.keepers=false", "checkpoint.persist_every=10"],
    "orchestrate, snapshot every 10 steps + keepers, disk every 10":
        ["checkpoint.every=10", "checkpoint.keepers=true", "checkpoint.persist_every=1"],
}
PLAIN_METHODS = {  # label -> (saver, save every N steps)
    "plain PyTorch, no checkpointing": ("none", 0),
    "plain PyTorch, torch.save every 10": ("torch.save", 10),
    "plain PyTorch, DCP async_save every 10": ("dcp.async_save", 10),
    "plain PyTorch, torch.save every step": ("torch.save", 1),
}
BASELINE = {"orchestrate": "orchestrate, no checkpointing", "plain": "plain PyTorch, no checkpointing"}
# --only: fewer rows, so that more repeats fit in the same time. keepers: the headline row, its no-disk twin and
# their baseline; headline: the headline row and its baseline
ONLY_ROWS = {"keepers": (BASELINE["orchestrate"], EVERY_STEP_KEEPERS,
                         "orchestrate, snapshot every step + keepers, no disk"),
             "headline": (BASELINE["orchestrate"], EVERY_STEP_KEEPERS)}


class RunOutcome(NamedTuple):
    step_times: Optional[list[float]]  # None: the run failed
    error: str = ""  # the last line of its stderr when it failed
    first_step_s: Optional[float] = None  # orchestrate: from the controller's start to the end of step 1


@dataclass
class MethodResults:
    step_times: list[Optional[list[float]]] = field(default_factory=list)  # per repeat; None: that run failed
    first_step_s: list[Optional[float]] = field(default_factory=list)  # per repeat, where the harness has it
    errors: list[str] = field(default_factory=list)

    def iteration_s(self, repeat: int) -> Optional[float]:
        times = self.step_times[repeat]
        return statistics.fmean(times[WARMUP_STEPS:]) if times else None


def attention_heads(dim: int) -> tuple[int, int]:
    heads = max(2, dim // 64)
    return heads, heads // 2  # grouped-query attention: two query heads per key/value head


def shared_overrides(args) -> list[str]:
    """What both harnesses compose (recipe quickstart + these), so model, optimizer and batch are identical."""
    heads, kv_heads = attention_heads(args.dim)
    return [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={heads}",
            f"model.n_kv_heads={kv_heads}", "model.vocab_size=256", f"train.global_batch_size={args.batch}",
            f"train.seq_len={args.seq_len}", f"train.steps={args.steps}", "train.eval_batches=0",
            "data.max_bytes=2000000", "parallel.dp=1", f"cluster.cpus_per_worker={CORES}"]


def run_subprocess(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """In its own process group, so a run that hangs is stopped with everything it started (its Ray cluster)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # KeyboardInterrupt: the CLI stops the Ray processes it started
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        err += f"\ntimed out after {timeout_s:.0f} s"
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip().replace("|", "/") if lines else "(no output)"


def run_orchestrate(overrides: list[str], timeout_s: float) -> RunOutcome:
    """Step times of one ``orchestrate launch`` and when its first step ended (``wall_time``: seconds since the
    controller started, so Python's start and imports are not in it), or None and the last line of its stderr."""
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        done = run_subprocess([sys.executable, "-m", "orchestrate", "launch", *overrides, "logging.progress=false",
                               f"run.dir={tmp}/run"], timeout_s)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if done.returncode != 0:
        return RunOutcome(None, last_line(done.stderr))
    steps = sorted((r["step"], r["step_time"], r["wall_time"]) for r in records if "step_time" in r)
    return RunOutcome([seconds for _, seconds, _ in steps], first_step_s=steps[0][2] if steps else None)


def run_plain(overrides: list[str], saver: str, every: int, timeout_s: float) -> RunOutcome:
    """Step times of the plain loop, run in a fresh process like the CLI runs (see ``plain_worker``)."""
    request = json.dumps({"overrides": overrides, "saver": saver, "every": every})
    done = run_subprocess([sys.executable, "-m", "benchmarks.checkpoint", "--plain-worker", request], timeout_s)
    if done.returncode != 0:
        return RunOutcome(None, last_line(done.stderr))
    return RunOutcome(json.loads(done.stdout.strip().splitlines()[-1]))


class TorchSave:
    """``torch.save`` of the model's and optimizer's state dicts, synchronous, over one file, no fsync."""

    def __init__(self, model, optimizer, folder: Path, every: int):
        self.model, self.optimizer, self.path, self.every = model, optimizer, folder / "state.pt", every

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, self.path)

    def finish(self) -> None:
        pass


class DcpAsyncSave(TorchSave):
    """``dcp.async_save`` the best way a CPU user can: one reused ``DefaultStager`` (its staging buffers are
    allocated once) copying in a background thread while the next forward/backward runs. Pinned memory and
    non-blocking copies need an accelerator, shared memory only serves the process-based writer: all off. The
    copy must finish before the next optimizer step (or the checkpoint would be torn), and the previous save
    must be written before the next starts, as DCP's docs ask."""

    def __init__(self, model, optimizer, folder: Path, every: int):
        super().__init__(model, optimizer, folder, every)
        self.folder = folder
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                   use_async_staging=True, use_non_blocking_copy=False))
        self.staging, self.upload = None, None

    def before_optimizer_step(self) -> None:
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def after_step(self, step: int) -> None:
        saving = self.every and step % self.every == 0
        if step != 1 and not saving:
            return
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if step == 1:  # warm-up: allocate the staging buffers once, as a long run's first save did long ago
            self.stager.stage(state).result()
        if not saving:
            return
        if self.upload is not None:
            self.upload.result()
        response = dcp.async_save(state, checkpoint_id=self.folder / f"step-{step}", async_stager=self.stager,
                                  no_dist=True)
        self.staging, self.upload = response.staging_completion, response.upload_completion

    def finish(self) -> None:
        if self.upload is not None:
            self.upload.result()
        self.stager.close()


def plain_worker(request: dict) -> list[float]:
    """The training loop a user would write around the project's model, optimizer and data."""
    warnings.filterwarnings("ignore")  # DCP warns about no_dist and experimental APIs on every call
    torch.set_num_threads(CORES)
    cfg = compose_config(request["overrides"])
    model = build_llama(cfg.model, seed=cfg.train.seed, max_seq_len=cfg.train.seq_len)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_lr_scheduler(cfg.optim, cfg.train.steps, optimizer)
    data = build_data(cfg)
    sampler = ResumableSampler(data.n_train, cfg.train.global_batch_size, 0, 1, cfg.train.seed)
    saver_class = DcpAsyncSave if request["saver"] == "dcp.async_save" else TorchSave
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        saver = saver_class(model, optimizer, Path(tmp), request["every"])
        step_times = []
        for step in range(1, cfg.train.steps + 1):
            started = time.perf_counter()
            inputs, targets = data.batch(sampler.next_window_ids())
            cross_entropy_loss(model(inputs), targets).backward()
            clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            saver.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            saver.after_step(step)
            step_times.append(time.perf_counter() - started)
        saver.finish()
    return step_times


Run = Callable[[], RunOutcome]  # one run of a method


def method_runs(args, orchestrate_only: Sequence[str] = ()) -> dict[str, Run]:
    """``orchestrate_only``: overrides of the orchestrate runs alone (the plain loop runs no Ray)."""
    overrides = shared_overrides(args)
    runs = {label: partial(run_orchestrate, overrides + list(orchestrate_only) + extra, args.timeout)
            for label, extra in ORCHESTRATE_METHODS.items()}
    runs.update({label: partial(run_plain, overrides, saver, every, args.timeout)
                 for label, (saver, every) in PLAIN_METHODS.items()})
    return {label: run for label, run in runs.items() if args.only == "all" or label in ONLY_ROWS[args.only]}


@contextlib.contextmanager
def one_cluster_for_all_runs():
    """An embedded Ray cluster (every core, on 127.0.0.1) that the orchestrate runs join: the override that
    joins it. Every run then shares the same Ray processes and none pays Ray's start and stop."""
    with RayRuntime(address=None, num_cpus=CORES):
        import ray

        yield f"cluster.address={ray.get_runtime_context().gcs_address}"


def run_all(args) -> dict[str, MethodResults]:
    if not args.joined:
        return run_alternating(method_runs(args), args.repeats)
    with one_cluster_for_all_runs() as join:
        return run_alternating(method_runs(args, [join]), args.repeats)


def run_alternating(runs: dict[str, Run], repeats: int) -> dict[str, MethodResults]:
    """Every run once per repeat, one at a time, in alternating order (so a change in machine load hits all)."""
    results = {label: MethodResults() for label in runs}
    for repeat in range(repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for label in order:
            started = time.monotonic()
            outcome = runs[label]()
            os.sync()  # write back this run's checkpoints now, not during the next method's run
            results[label].step_times.append(outcome.step_times)
            results[label].first_step_s.append(outcome.first_step_s)
            if outcome.error:
                results[label].errors.append(f"repeat {repeat + 1}: {outcome.error}")
            print(f"repeat {repeat + 1}/{repeats} {label}: {time.monotonic() - started:.0f} s"
                  f"{' FAILED: ' + outcome.error if outcome.error else ''}", file=sys.stderr, flush=True)
    return results


def training_state_size(args) -> tuple[int, float]:
    """Parameter count of the composed model (built on the meta device: no memory) and params+moments GiB."""
    with torch.device("meta"):
        model = Llama(compose_config(shared_overrides(args)).model)
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, 3 * 4 * n_params / 2**30


def median_or_none(values) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: Optional[float]) -> str:
    return "failed" if value is None else f"{value:.3f}"


def paired_ratios(result: MethodResults, baseline: MethodResults) -> list[Optional[float]]:
    pairs = [(result.iteration_s(r), baseline.iteration_s(r)) for r in range(len(result.step_times))]
    return [None if m is None or b is None else m / b for m, b in pairs]


def first_step(result: MethodResults) -> str:
    """Median seconds from the controller's start to the end of step 1 (orchestrate only: the plain loop has no
    controller)."""
    seconds = [s for s in result.first_step_s if s is not None]
    return f"{statistics.median(seconds):.1f}" if seconds else "-"


def goal(ratio: Optional[float], interval: Optional[tuple[float, float]]) -> str:
    """Shown only when the whole interval is at or under the goal; a median under it alone is not enough."""
    if ratio is None:
        return f"<= {GOAL_RATIO} **missed** (no result)"
    if ratio > GOAL_RATIO:
        return f"<= {GOAL_RATIO} **missed**"
    if interval is not None and interval[1] <= GOAL_RATIO:
        return f"<= {GOAL_RATIO} shown"
    return f"<= {GOAL_RATIO} met at the median, not shown (" + \
        ("too few repeats for an interval)" if interval is None else f"interval up to {fmt(interval[1])})")


def table(results: dict[str, MethodResults], args, n_params: int, state_gib: float) -> str:
    heads, kv_heads = attention_heads(args.dim)
    lines = [f"Model: Llama dim {args.dim}, {args.layers} layers, {heads}/{kv_heads} heads: {n_params / 1e6:.1f}M "
             f"parameters; training state (parameters + 2 AdamW moments, fp32) {state_gib:.2f} GiB. Batch "
             f"{args.batch} x {args.seq_len} tokens, {CORES} torch threads, {args.steps} steps per run; iteration "
             f"time = mean over steps {WARMUP_STEPS + 1}..{args.steps}; median of {args.repeats} alternating "
             f"repeats.", "",
             f"| method | iteration time (s) | median step (s) | ratio to no checkpointing | 95% interval | "
             f"per repeat | repeats <= {GOAL_RATIO} | goal | first step ends at (s) |",
             "|---|---:|---:|---:|---|---|---:|---|---:|"]
    for label, result in results.items():
        harness = "orchestrate" if label in ORCHESTRATE_METHODS else "plain"
        ratios = paired_ratios(result, results[BASELINE[harness]])
        within = sum(r is not None and r <= GOAL_RATIO for r in ratios)
        iteration = median_or_none(result.iteration_s(r) for r in range(args.repeats))
        typical_step = median_or_none(statistics.median(t[WARMUP_STEPS:]) for t in result.step_times if t)
        ratio = median_or_none(ratios)
        interval = median_interval([r for r in ratios if r is not None])
        lines.append(f"| {label} | {fmt(iteration)} | {fmt(typical_step)} | {fmt(ratio)} | "
                     f"{'-' if interval is None else '-'.join(map(fmt, interval))} | "
                     f"{', '.join(map(fmt, ratios))} | {within}/{len(ratios)} | "
                     f"{goal(ratio, interval) if label == EVERY_STEP_KEEPERS else '-'} | "
                     f"{first_step(result)} |")
    if BASELINE["plain"] in results:
        framework = paired_ratios(results[BASELINE["orchestrate"]], results[BASELINE["plain"]])
        lines += ["", f"Framework overhead without checkpoints (orchestrate none / plain none): "
                      f"{fmt(median_or_none(framework))} (per repeat: {', '.join(map(fmt, framework))})"]
    failures = [f"- {label}, {error}" for label, result in results.items() for error in result.errors]
    return "\n".join(lines + (["", "Failed runs (last line of stderr):", *failures] if failures else []))


def per_step_table(results: dict[str, MethodResults], args) -> str:
    """Where the iteration time goes: each measured step's median over the repeats (a disk write every 10 steps
    shows in the step after it)."""
    steps = range(WARMUP_STEPS + 1, args.steps + 1)
    lines = ["Median over the repeats of each step's time (ms)", "",
             "| method | " + " | ".join(f"step {step}" for step in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for label, result in results.items():
        cells = [median_or_none(t[step - 1] * 1000 for t in result.step_times if t and len(t) >= step)
                 for step in steps]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.0f}" for c in cells) + " |")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int, steps: int) -> None:
    """The model and the runs: what every benchmark of the 1 GiB model takes."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--steps", type=int, default=steps, help="per run; steps 1-2 are warm-up")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="train.global_batch_size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, repeats=5, steps=12)
    parser.add_argument("--only", choices=["all", *ONLY_ROWS], default="all",
                        help="keepers: only orchestrate with no checkpointing and with keepers every step (with and "
                             "without disk writes); headline: only no checkpointing and the headline row")
    parser.add_argument("--joined", action="store_true",
                        help="every orchestrate run joins one Ray cluster this benchmark starts (no Ray start and "
                             "stop per run: more repeats in the same time)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: a smoke test")
    parser.add_argument("--raw", type=Path, help="also write every run's step times here (JSON)")
    parser.add_argument("--plain-worker", help=argparse.SUPPRESS)  # internal: one plain run, JSON request
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_worker(json.loads(args.plain_worker))))
        return
    if args.quick:
        args.dim, args.layers, args.repeats = 128, 2, 2
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS} (warm-up steps are skipped)")
    n_params, state_gib = training_state_size(args)  # also checks the overrides before any run starts
    results = run_all(args)
    if args.raw:
        args.raw.write_text(json.dumps({label: result.step_times for label, result in results.items()}))
    print(table(results, args, n_params, state_gib))
    print()
    print(per_step_table(results, args))


if __name__ == "__main__":
    main()
