"""A run directory's metrics.jsonl as PNG plots (loss, tokens/s, bytes on the wire) and a short summary.md.

Records with a ``"recovery"`` key mark a recovery at their step: a dashed vertical line on every plot and a
row in the summary. After a recovery the step counter can go back to the restored version; each stretch of
increasing steps is drawn as its own line so a rollback shows as a restart, not a stroke backwards.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from orchestrate.metrics import read_metrics
from orchestrate.progress import human_bytes


@dataclass(frozen=True)
class Plot:
    key: str  # metric in the records
    title: str
    label: str  # y axis and legend
    scale: float = 1.0  # applied to the values


PLOTS = {
    "loss.png": Plot("loss", "training loss", "loss"),
    "throughput.png": Plot("tokens_per_s", "throughput", "tokens / s"),
    "communication.png": Plot("comm_bytes", "bytes on the wire across replicas (rank 0)", "MiB sent, cumulative",
                              1.0 / (1 << 20)),
}
SUMMARY_FILE = "summary.md"


class ReportError(ValueError):
    """The run directory cannot be reported on (one line; the CLI exits with code 2)."""


@dataclass
class RunMetrics:
    steps: list[dict]  # records of finished training steps, in file order
    evals: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: list[dict]) -> "RunMetrics":
        return cls(steps=[r for r in records if r.get("loss") is not None or "tokens_per_s" in r],
                   evals=[r for r in records if r.get("eval_loss") is not None],
                   recoveries=[r for r in records if "recovery" in r])

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.steps if r.get(key) is not None]


def load_run(run_dir: Path) -> RunMetrics:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    try:
        metrics = RunMetrics.from_records(read_metrics(run_dir))
    except ValueError as err:
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: not JSON lines ({err})") from None
    if not metrics.steps:
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: no training steps recorded")
    return metrics


def increasing_stretches(records: list[dict], key: str) -> list[tuple[list[int], list[float]]]:
    """(steps, values) pairs, split wherever the step goes back (a recovery restored an older version)."""
    stretches: list[tuple[list[int], list[float]]] = []
    last_step = None
    for record in records:
        if record.get(key) is None:
            continue
        if last_step is None or record["step"] <= last_step:
            stretches.append(([], []))
        stretches[-1][0].append(record["step"])
        stretches[-1][1].append(record[key])
        last_step = record["step"]
    return stretches


def plot_metric(metrics: RunMetrics, plot: Plot, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for i, (steps, values) in enumerate(increasing_stretches(metrics.steps, plot.key)):
            ax.plot(steps, [v * plot.scale for v in values], color="tab:blue", linewidth=1.5,
                    label=plot.label if i == 0 else None)
        if plot.key == "loss" and metrics.evals:
            ax.scatter([r["step"] for r in metrics.evals], [r["eval_loss"] for r in metrics.evals],
                       color="tab:orange", zorder=3, label="eval loss")
        for i, record in enumerate(metrics.recoveries):
            ax.axvline(record["step"], color="tab:red", linestyle="--", linewidth=1,
                       label="recovery" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(plot.label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def run_name(run_dir: Path) -> str:
    """The run's name from its saved config, else the folder name."""
    config = run_dir / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        try:
            name = OmegaConf.select(OmegaConf.load(config), "run.name")
        except Exception:  # noqa: BLE001 - a damaged config only costs the title
            name = None
        if name:
            return str(name)
    return run_dir.name


def _describe_recovery(record: dict) -> str:
    detail = record["recovery"]
    if isinstance(detail, dict):
        detail = ", ".join(f"{k} {v}" for k, v in detail.items())
    return f"step {record['step']}" + (f" ({detail})" if detail not in (None, "", True) else "")


def summary_markdown(name: str, metrics: RunMetrics, plots: list[str]) -> str:
    losses, rates = metrics.values("loss"), metrics.values("tokens_per_s")
    last = metrics.steps[-1]
    rows = [("steps", str(last["step"]))]
    if losses:
        rows += [("final loss", f"{losses[-1]:.4f}"), ("first loss", f"{losses[0]:.4f}"),
                 ("lowest loss", f"{min(losses):.4f}")]
    if metrics.evals:
        rows.append(("eval loss", f"{metrics.evals[-1]['eval_loss']:.4f}"))
    if rates:
        rows.append(("tokens/s (median)", f"{statistics.median(rates):,.0f}"))
    if last.get("comm_bytes") is not None:
        rows.append(("bytes sent across replicas (rank 0)", human_bytes(last["comm_bytes"])))
    if last.get("wall_time") is not None:
        rows.append(("wall time", f"{last['wall_time']:.1f} s"))
    rows.append(("recoveries", str(len(metrics.recoveries)) + "".join(
        f"; {_describe_recovery(r)}" for r in metrics.recoveries)))
    lines = [f"# Run report: {name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    summary: Path
    plots: list[Path]
    final_loss: Optional[float]


def write_report(run_dir: str | Path) -> Report:
    """Write the plots and summary.md into ``run_dir``."""
    run_dir = Path(run_dir)
    metrics = load_run(run_dir)
    name = run_name(run_dir)
    plots = []
    for file_name, plot in PLOTS.items():
        if metrics.values(plot.key):
            plot_metric(metrics, plot, f"{name}: {plot.title}", run_dir / file_name)
            plots.append(run_dir / file_name)
    summary = run_dir / SUMMARY_FILE
    summary.write_text(summary_markdown(name, metrics, [p.name for p in plots]))
    losses = metrics.values("loss")
    return Report(summary=summary, plots=plots, final_loss=losses[-1] if losses else None)
