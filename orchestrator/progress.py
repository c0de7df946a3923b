"""The live progress line: a rich bar in a terminal, plain log lines in a pipe (CI, Ray job logs)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def describe(record: dict) -> str:
    loss = "-" if record.get("loss") is None else f"{record['loss']:.4f}"
    ckpt = ""
    if record.get("ckpt_l0") is not None:
        ckpt = f" | ckpt L0 {record['ckpt_l0']}" + "".join(
            f" {level.upper()[5:]} {record[level]}" for level in ("ckpt_l1", "ckpt_l2") if record.get(level))
    return (f"loss {loss} | {record['tokens_per_s']:,.0f} tok/s | comm {human_bytes(record['comm_bytes'])}"
            f"{ckpt} | {record['wall_time']:.1f}s")


class ProgressLine:
    def __init__(self, total_steps: int, enabled: bool = True, log_every: int = 1):
        self.console = Console(stderr=False)
        self.total, self.enabled, self.log_every = total_steps, enabled, log_every
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total_steps, info="starting")
            self.bar.start()

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # one line each, whatever the width

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=describe(record))
        elif record["step"] % self.log_every == 0 or record["step"] == self.total:
            self.console.print(f"step {record['step']}/{self.total} | {describe(record)}", highlight=False,
                               soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
