"""End-to-end: the real ``orchestrate`` command in a subprocess, with an embedded Ray of its own."""
import fcntl
import ipaddress
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.support.runs import ENV, losses, orchestrate, ray_processes_of_ours, records_of, tmpfs_used_bytes


def listeners_while_running(args: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``orchestrate *args`` and, while it runs, the listening sockets of it and every process it started:
    {(ip, port): pid}."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    seen: dict[tuple[str, int], int] = {}
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in tree:
                try:
                    for conn in process.net_connections("inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            seen[(conn.laddr.ip, conn.laddr.port)] = process.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.5)  # the scan costs CPU that the run shares; the listeners live for the whole run
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), seen


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def worker_pids(run_dir: Path) -> set[int]:
    records = records_of(run_dir)
    return {pid for r in records if r.get("event") == "workers" for pid in r["pids"]}


@pytest.mark.slow
def test_launch_trains_with_falling_loss_and_is_deterministic(reference, tmp_path):
    """The reference run (conftest) is the same recipe and seed with other checkpoint and evaluation settings,
    which do not change the losses: a second run gives them bit for bit."""
    run_dir = tmp_path / "run"
    result, listeners = listeners_while_running(
        ["launch", "recipe=quickstart", "train.steps=20", "train.eval_batches=2", "train.eval_every=10",
         f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished 20 steps" in result.stdout
    assert "step 20/20" in result.stdout and "tok/s" in result.stdout
    # Local mode: every listener of the run (Ray's, the rendezvous store, gloo's) is on loopback only.
    assert listeners and not [ip for ip, _ in listeners if not is_loopback(ip)], listeners
    assert set(listeners.values()) & worker_pids(run_dir)  # the ranks' own listeners were seen too
    assert not ray_processes_of_ours()  # nothing left running after the command returned
    first = losses(run_dir)
    assert len(first) == 20
    assert sum(first[-5:]) / 5 < 0.8 * sum(first[:5]) / 5  # clearly falling
    _, expected = reference
    assert first == [expected[step] for step in range(1, 21)]  # same recipe and seed: bit-identical losses
    records = records_of(run_dir)
    record = [r for r in records if "step_time" in r][-1]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "comm_bytes", "wall_time"):
        assert key in record
    assert record["tokens"] == 20 * 8 * 128 and record["comm_bytes"] > 0
    evals = {r["step"]: r["eval_loss"] for r in records if "step_time" in r and "eval_loss" in r}
    assert sorted(evals) == [10, 20] and evals[20] < evals[10]  # held-out loss every train.eval_every steps
    assert "parallel:\n  dp: 2" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["parallel.tpp=2"], "unknown key 'parallel.tpp'; valid keys in parallel: dp, tp, pp, cp"),
    (["train.steps=abc"], "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["recipe=nope"], "recipe=nope: unknown recipe; valid: continue, cp_long, diloco_small, noloco_small, onebit_adam_small, pp_small, quickstart"),
    (["cluster.num_workers=3"], "cluster.num_workers=3: must equal parallel.dp*tp*pp*cp = 2*1*1*1 = 2"),
    (["parallel.dp=8", "cluster.cpus_per_worker=1"],
     "cluster.cpus_per_worker=1.0: 8 workers need 8 CPUs but this machine's local cluster has 2"),
])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = orchestrate("launch", "recipe=quickstart", "cluster.num_cpus=2", f"run.dir={run_dir}", *args,
                         timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_killed_rank_recovers_by_default_and_nothing_is_left_behind(tmp_path, tmpfs):
    shm = tmpfs("256M")
    result = orchestrate("launch", "recipe=quickstart", "train.steps=10", "fault.kill_rank=1", "fault.at_step=4",
                         f"checkpoint.shm_dir={shm}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    # the default layout is DDP over two ranks: rank 0 stays and sends its snapshot to the new rank 1
    assert re.search(r"recovered: ranks \[1\] started anew, 1 kept, step [23] restored from replica",
                     " ".join(result.stdout.split())), result.stdout
    assert len(losses(tmp_path / "run")) == 10
    assert not ray_processes_of_ours()
    assert tmpfs_used_bytes(shm) == 0 and not list(shm.iterdir())  # the killed worker's arena too


@pytest.mark.slow
def test_shared_memory_too_small_exits_2_with_one_line_before_training(tmp_path, tmpfs):
    shm = tmpfs("1M")
    result = orchestrate("launch", "recipe=quickstart", "train.steps=10", f"checkpoint.shm_dir={shm}",
                         f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"checkpoint.shm_dir={shm}: the keeper of node" in lines[0], result.stderr
    assert "MiB is free; set checkpoint.shm_dir= to a larger tmpfs" in lines[0]
    assert not losses(tmp_path / "run")
    assert not ray_processes_of_ours() and tmpfs_used_bytes(shm) == 0


@pytest.mark.slow
def test_ranks_that_hang_in_setup_fail_the_run_with_where_they_waited(tmp_path):
    """A real hang: another process on the machine holds the build lock of the snapshot kernel, which every rank
    loads in its setup. Past ``cluster.setup_timeout_s`` the run fails, naming the ranks and where they were."""
    extensions = tmp_path / "extensions"
    build = extensions / f"orchestrate_adamw_into-torch{torch.__version__}"
    build.mkdir(parents=True)
    run_dir = tmp_path / "run"
    with open(build / "orchestrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = orchestrate("launch", "recipe=quickstart", "train.steps=5", "cluster.setup_timeout_s=20",
                             "logging.progress=false", f"run.dir={run_dir}",
                             env={**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "SetupTimeout: ranks 0-1 still in setup after cluster.setup_timeout_s=20; where each rank was: " \
           f"{run_dir / 'stacks'}" in result.stderr, result.stderr[-3000:]
    for rank in (0, 1):
        assert "_only_builder_here" in (run_dir / "stacks" / f"rank-{rank}.txt").read_text()
    assert not losses(run_dir)
    assert not ray_processes_of_ours()
