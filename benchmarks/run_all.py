"""Run the benchmarks of this folder and print their results as one markdown document.

A benchmark is a module here with a ``main()``; each runs in its own process as ``python -m benchmarks.NAME``
(``--quick`` added when the module declares that flag), so one crashing or leaking benchmark cannot spoil the
next. The output is one table (benchmark, status, seconds) followed by what each benchmark printed: their own
tables have different columns, so they are kept whole under a heading rather than forced into one grid.

    .venv/bin/python -m benchmarks.run_all [SUITE] [--timeout 1800]
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

QUICK_FLAG = "--quick"
THIS_MODULE = Path(__file__).stem


@dataclass
class Benchmark:
    name: str
    package: str  # importable package holding the module, e.g. "benchmarks"
    root: Path  # the folder to run from, so that the package is importable
    quick: bool  # the module declares --quick


@dataclass
class BenchResult:
    benchmark: Benchmark
    returncode: Optional[int]  # None: timed out
    seconds: float
    output: str
    error: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def status(self) -> str:
        if self.returncode is None:
            return "timed out"
        if self.ok:
            return "ok"
        last = self.error.strip().splitlines()[-1:] or [""]
        return f"failed (exit {self.returncode}): {last[0].replace('|', '/')}".rstrip(": ")


def _declares(tree: ast.Module, text: str) -> bool:
    return any(isinstance(node, ast.Constant) and node.value == text for node in ast.walk(tree))


def _has_main(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)


def discover(folder: Path) -> list[Benchmark]:
    """Modules of ``folder`` with a top-level ``main()``, read without importing them (they import torch)."""
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.stem.startswith("_") or path.stem == THIS_MODULE:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if _has_main(tree):
            found.append(Benchmark(path.stem, folder.name, folder.parent, _declares(tree, QUICK_FLAG)))
    return found


def run(benchmark: Benchmark, timeout_s: float) -> BenchResult:
    command = [sys.executable, "-m", f"{benchmark.package}.{benchmark.name}"]
    command += [QUICK_FLAG] if benchmark.quick else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(benchmark.root),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=benchmark.root, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        return BenchResult(benchmark, done.returncode, time.monotonic() - start, done.stdout, done.stderr)
    except subprocess.TimeoutExpired as err:
        partial = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return BenchResult(benchmark, None, time.monotonic() - start, partial, "")


def markdown(results: list[BenchResult]) -> str:
    lines = ["| benchmark | mode | status | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.benchmark.name} | {'quick' if r.benchmark.quick else 'full'} | {r.status} | "
              f"{r.seconds:.1f} |" for r in results]
    for r in results:
        if r.output.strip():
            lines += ["", f"### {r.benchmark.name}", "", r.output.strip()]
    return "\n".join(lines) + "\n"


def select(benchmarks: list[Benchmark], suite: Optional[str]) -> list[Benchmark]:
    if suite is None:
        return benchmarks
    chosen = [b for b in benchmarks if b.name == suite]
    if not chosen:
        raise ValueError(f"unknown benchmark suite '{suite}'; valid: {', '.join(b.name for b in benchmarks)}")
    return chosen


def run_suites(suite: Optional[str] = None, folder: Path = Path(__file__).parent, timeout_s: float = 1800.0,
               progress=None) -> list[BenchResult]:
    """Run the chosen benchmarks one after the other; ``progress(text)`` hears about each start."""
    results = []
    for benchmark in select(discover(folder), suite):
        if progress is not None:
            progress(f"running {benchmark.name}{' --quick' if benchmark.quick else ''} ...")
        results.append(run(benchmark, timeout_s))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", help="run only this benchmark (a module name under benchmarks/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0 all benchmarks succeeded, 1 some failed, 2 unknown suite."""
    args = build_parser().parse_args(argv)
    try:
        results = run_suites(args.suite, args.dir.resolve(), args.timeout,
                             progress=lambda text: print(text, file=sys.stderr, flush=True))
    except ValueError as err:
        print(f"orchestrate: error: {err}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
