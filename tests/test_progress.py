"""Progress lines in a pipe (CI logs, Ray job logs): one line per report, whatever its length."""
from orchestrate.progress import ProgressLine


def test_plain_progress_lines_never_wrap_in_a_pipe(capsys):
    progress = ProgressLine(total_steps=100, log_every=1)
    assert progress.bar is None  # captured output is not a terminal
    progress.update({"step": 7, "loss": 1.23456, "tokens_per_s": 123456.7, "comm_bytes": 12_345_678,
                     "wall_time": 12.3, "ckpt_l0": 59, "ckpt_l1": 55, "ckpt_l2": 50})
    progress.message("recovered: " + "ranks [1] started anew, " * 8)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and len(lines[0]) > 80 and len(lines[1]) > 80
    assert lines[0].startswith("step 7/100 | loss 1.2346") and lines[0].endswith("| 12.3s")
