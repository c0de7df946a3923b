"""`orchestrate report` on a run directory written through MetricsLog, and `orchestrate bench` on a toy suite."""
import math
import struct
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from orchestrate import job_commands
from orchestrate.config import WandbConfig
from orchestrate.metrics import MetricsLog
from orchestrate.report import PLOTS, increasing_stretches, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_ROOT = Path(__file__).resolve().parents[1]


def step_record(step: int, wall_time: float) -> dict:
    """A record with the keys the controller writes for every step."""
    return {"step": step, "loss": 5.5 * math.exp(-step / 15) + 1.0, "lr": 3e-3, "tokens": step * 1024,
            "tokens_per_s": 9000.0 + 50 * (step % 7), "step_time": 0.11, "comm_bytes": step * 2_000_000,
            "comm_peak_bytes": 2_000_000, "wall_time": wall_time, "time": 1.8e9 + wall_time}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """30 steps; rank 1 died at step 14, the run resumed from version 10 and finished; then an eval."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("run:\n  name: toy-run\n  dir: null\n")
    log = MetricsLog(folder, WandbConfig(enabled=False), "toy-run", {})
    for step in range(1, 14):
        log.log(step_record(step, 0.2 * step))
    log.log({"step": 10, "recovery": {"lost_rank": 1, "restored_from": "L1"}})
    for step in range(11, 31):
        log.log(step_record(step, 3.0 + 0.2 * step))
    log.log({"step": 30, "eval_loss": 1.61})
    log.close()
    return folder


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_report_writes_real_plots_and_a_summary(run_dir):
    report = write_report(run_dir)
    assert sorted(p.name for p in report.plots) == sorted(PLOTS)
    for path in report.plots:
        width, height = png_size(path)
        assert width >= 300 and height >= 200 and path.stat().st_size > 5_000
        assert len(Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # something is drawn
    summary = report.summary.read_text()
    final = step_record(30, 0)["loss"]
    assert report.final_loss == pytest.approx(final)
    assert f"| final loss | {final:.4f} |" in summary
    assert "| eval loss | 1.6100 |" in summary and "| steps | 30 |" in summary
    assert "| recoveries | 1; step 10 (lost_rank 1, restored_from L1) |" in summary
    assert "# Run report: toy-run" in summary and "![loss](loss.png)" in summary


def test_rollback_after_recovery_starts_a_new_line():
    records = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 3, "recovery": "x"}] + \
              [{"step": s, "loss": 0.5} for s in (3, 4, 5)]
    assert [steps for steps, _ in increasing_stretches(records, "loss")] == [[1, 2, 3, 4], [3, 4, 5]]


def test_report_command_prints_the_files_and_rejects_a_folder_without_metrics(run_dir, tmp_path, capsys):
    assert job_commands.main(["report", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'summary.md'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert job_commands.main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"orchestrate: error: {empty}: no metrics.jsonl (is this a run directory?)"]


TOY_BENCHMARKS = {
    "fast.py": '''
        import argparse
        def main():
            parser = argparse.ArgumentParser()
            parser.add_argument("--quick", action="store_true")
            args = parser.parse_args()
            print("| case | quick |\\n|---|---|\\n| a | %s |" % args.quick)
        if __name__ == "__main__":
            main()
        ''',
    "full.py": '''
        import sys
        def main():
            print("| case | args |\\n|---|---|\\n| b | %d |" % (len(sys.argv) - 1))
        if __name__ == "__main__":
            main()
        ''',
    "broken.py": '''
        def main():
            raise SystemExit("broken on purpose")
        if __name__ == "__main__":
            main()
        ''',
    "helpers.py": "def not_a_benchmark():\n    pass\n",
}


@pytest.fixture
def toy_suite(tmp_path) -> Path:
    folder = tmp_path / "toybench"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name, source in TOY_BENCHMARKS.items():
        (folder / name).write_text(textwrap.dedent(source))
    return folder


def bench_runner():
    return job_commands.load_bench_runner()


def test_bench_runs_every_benchmark_in_its_own_process_and_prints_one_table(toy_suite, capsys):
    assert bench_runner().main(["--dir", str(toy_suite)]) == 1  # one benchmark fails
    out = capsys.readouterr().out
    assert out.startswith("| benchmark | mode | status | seconds |\n|---|---|---|---|\n")
    rows = out.splitlines()[2:5]
    assert rows[0].startswith("| broken | full | failed (exit 1): broken on purpose |")
    assert rows[1].startswith("| fast | quick | ok |") and rows[2].startswith("| full | full | ok |")
    assert "| a | True |" in out and "| b | 0 |" in out and "helpers" not in out


def test_bench_suite_selects_one_and_an_unknown_suite_is_exit_2(toy_suite, capsys):
    assert bench_runner().main(["fast", "--dir", str(toy_suite)]) == 0
    out = capsys.readouterr().out
    assert "| fast | quick | ok |" in out and "| full |" not in out
    assert bench_runner().main(["nope", "--dir", str(toy_suite)]) == 2
    assert "unknown benchmark suite 'nope'; valid: broken, fast, full" in capsys.readouterr().err


def test_bench_discovers_the_project_benchmarks_without_importing_them():
    names = [b.name for b in bench_runner().discover(RUN_ROOT / "benchmarks")]
    assert {"checkpoint", "erasure", "pipeline"} <= set(names) and "run_all" not in names
