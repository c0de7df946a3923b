"""Ray jobs end to end: a real ``ray start --head`` on 127.0.0.1, driven through the job commands in subprocesses.

The head is started by this module with free ports and a temp dir of its own, and stopped by the PID it started
(SIGTERM, then SIGKILL of its session, then whatever still names its temp dir); never ``ray stop``.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrate.cluster.jobs import JobsClient, JobsError
from orchestrate.cluster.ray_cluster import stop_processes_using
from orchestrate import job_commands
from orchestrate.job_commands import job_entrypoint
from orchestrate.metrics import read_metrics

# Ray's own log-tailing client passes ssl=None to aiohttp, which warns; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")
HEAD_PORT_OPTIONS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                     "node-manager-port", "object-manager-port")
HEAD_READY_TIMEOUT_S = 180
TINY = ["model.dim=64", "model.n_layers=2", "train.seq_len=64"]  # a quick model: the point is the plumbing
CLI_ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
CLI_ENV["WANDB_MODE"] = "disabled"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Head:
    """One ``ray start --head --block`` child in its own session; the jobs' cwd (and default run dirs) is ``cwd``."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="orj-", dir="/tmp")  # short: socket paths < 107 chars
        self.cwd = Path(self.temp_dir) / "head-cwd"
        self.cwd.mkdir()
        ports = {option: free_port() for option in HEAD_PORT_OPTIONS}
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        venv_bin = str(Path(sys.executable).parent)  # jobs run `python -m orchestrate` from the head's PATH
        env = {**CLI_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
        command = [str(Path(venv_bin) / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                   f"--object-store-memory={256 << 20}", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
                   *(f"--{option}={port}" for option, port in ports.items())]
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HEAD_READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}: "
                                   f"{(Path(self.temp_dir) / 'head.log').read_text()[-2000:]}")
            try:
                JobsClient(self.address, connect_timeout_s=2).list()
                return
            except JobsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its session: start_new_session made pgid == pid
            self.process.wait(timeout=10)
        stop_processes_using(self.temp_dir)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    node = Head()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def orchestrate(capsys):
    """Run one job command in this process (the CLI's code path without a Python start-up per call)."""
    def run(*args: str) -> Outcome:
        capsys.readouterr()
        returncode = job_commands.main(list(args))
        out, err = capsys.readouterr()
        return Outcome(returncode, out, err)
    return run


def submitted_job_id(result: Outcome) -> str:
    assert result.returncode == 0, result.stderr
    return re.search(r"submitted job (\S+)", result.stdout).group(1)


def assert_one_line_exit_2(result, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_entrypoint_joins_the_cluster_it_runs_on_with_the_same_overrides():
    command = job_entrypoint(["recipe=quickstart", "cluster.address=http://h:8265", "train.steps=5"], [],
                             "runs/job-1")
    assert command == ('python -m orchestrate launch recipe=quickstart train.steps=5 cluster.address=auto '
                       '"run.dir=$PWD/runs/job-1"')
    assert job_entrypoint(["run.dir=/shared/r 1"], ["my recipes"], None) == \
        "python -m orchestrate launch 'run.dir=/shared/r 1' cluster.address=auto '--recipes-dir=my recipes'"


@pytest.mark.slow
def test_submit_quickstart_follows_to_succeeded_and_writes_metrics(head, orchestrate):
    job_id = submitted_job_id(orchestrate("submit", "recipe=quickstart", f"cluster.address={head.address}",
                                          "train.steps=10", *TINY))
    followed = orchestrate("logs", job_id, "--follow", f"cluster.address={head.address}")  # launch's grammar
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr
    assert "finished 10 steps" in followed.stdout and f"job {job_id} SUCCEEDED" in followed.stderr
    run_dir = Path(re.search(r"run dir (/\S+)", followed.stdout).group(1))
    assert run_dir.is_relative_to(head.cwd / "runs")  # default: under the job's working dir
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(r["tokens_per_s"] > 0 for r in steps) and steps[-1]["comm_bytes"] > 0

    status = orchestrate("status", job_id, "--address", head.address)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    report = orchestrate("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    assert "final loss" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_status_logs_list_and_stop_a_long_job(head, orchestrate):
    job_id = submitted_job_id(orchestrate("submit", "recipe=quickstart", f"cluster.address={head.address}",
                                          "train.steps=100000", *TINY))
    client = JobsClient(head.address)
    deadline = time.monotonic() + 120
    while client.status(job_id).status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    status = orchestrate("status", job_id, f"cluster.address={head.address}")
    assert f"{job_id}: RUNNING" in status.stdout, status.stdout + status.stderr
    metadata = client.status(job_id).metadata  # what the run is, readable by any later client
    assert metadata["run_name"] == "quickstart" and "train.steps=100000" in metadata["overrides"]
    logs = orchestrate("logs", job_id, "--address", head.address)
    assert logs.returncode == 0 and f"Running entrypoint for job {job_id}" in logs.stdout
    listing = orchestrate("list", f"cluster.address={head.address}")
    assert re.search(rf"^{re.escape(job_id)}\s+RUNNING\s", listing.stdout, re.M), listing.stdout

    stopped = orchestrate("stop", job_id, f"cluster.address={head.address}")
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert client.status(job_id).status == "STOPPED"
    followed = orchestrate("logs", job_id, "--follow", "--address", head.address)
    assert followed.returncode == 1 and f"job {job_id} STOPPED" in followed.stderr


def test_unknown_job_is_one_line_exit_2(head, orchestrate):
    for command in ("status", "logs", "stop"):
        result = orchestrate(command, "no-such-job", "--address", head.address)
        assert_one_line_exit_2(result, f"unknown job 'no-such-job' on {head.address}")


def test_bad_config_is_rejected_before_anything_is_submitted(head, orchestrate):
    before = {job.job_id for job in JobsClient(head.address).list()}
    result = orchestrate("submit", "recipe=quickstart", f"cluster.address={head.address}", "parallel.tpp=2")
    assert_one_line_exit_2(result, "unknown key 'parallel.tpp'")
    assert {job.job_id for job in JobsClient(head.address).list()} == before


@pytest.mark.parametrize("args, message", [
    (["submit", "recipe=quickstart", "cluster.address=http://127.0.0.1:{port}"],
     "cannot reach the Ray dashboard at http://127.0.0.1:{port}: connection refused"),
    (["status", "some-job", "--address", "http://127.0.0.1:{port}"],
     "cannot reach the Ray dashboard at http://127.0.0.1:{port}: connection refused"),
    (["list", "--address", "127.0.0.1:{port}"], "is not a dashboard address; use http://HOST:8265"),
    (["submit", "recipe=quickstart", "cluster.address=auto"], "'auto' is not a dashboard address"),
])
def test_unreachable_or_wrong_address_is_one_line_exit_2(orchestrate, args, message):
    port = free_port()  # nothing listens there
    result = orchestrate(*(a.format(port=port) for a in args))
    assert_one_line_exit_2(result, message.format(port=port))


@pytest.fixture
def silent_port():
    """A port that accepts connections and never replies."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["launch", "recipe=quickstart", "cluster.address=127.0.0.1:{port}"],
     "cluster.address=127.0.0.1:{port}: no Ray cluster answers there (no reply within 5s)"),
    (["submit", "recipe=quickstart", "cluster.address=http://127.0.0.1:{port}"], "no reply within 5s"),
    (["status", "a-job", "--address", "http://127.0.0.1:{port}"], "no reply within 5s"),
    (["logs", "a-job", "--follow", "cluster.address=http://127.0.0.1:{port}"], "no reply within 5s"),
    (["stop", "a-job", "cluster.address=http://127.0.0.1:{port}"], "no reply within 5s"),
    (["list", "--address", "http://127.0.0.1:{port}"], "cannot reach the Ray dashboard at http://127.0.0.1:{port}: "
                                                      "no reply within 5s"),
])
def test_an_address_that_never_replies_is_one_line_exit_2_within_15s(silent_port, capsys, args, message):
    from orchestrate.cli import main

    started = time.monotonic()
    returncode = main([a.format(port=silent_port) for a in args])
    assert time.monotonic() - started < 15
    assert_one_line_exit_2(Outcome(returncode, *capsys.readouterr()), message.format(port=silent_port))


def test_launch_where_nothing_listens_is_one_line_exit_2_and_makes_no_run_dir(tmp_path, capsys):
    from orchestrate.cli import main

    port = free_port()
    returncode = main(["launch", "recipe=quickstart", f"cluster.address=127.0.0.1:{port}", f"run.dir={tmp_path}/run"])
    assert_one_line_exit_2(Outcome(returncode, *capsys.readouterr()),
                           f"cluster.address=127.0.0.1:{port}: no Ray cluster answers there (connection refused)")
    assert not (tmp_path / "run").exists()


def test_command_line_entry_prints_one_line_and_exits_2():
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "orchestrate.job_commands", "status", "some-job", "--address",
                             f"http://127.0.0.1:{port}"], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert_one_line_exit_2(result, f"cannot reach the Ray dashboard at http://127.0.0.1:{port}")
