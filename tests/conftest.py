"""Test environment: loopback-only Ray without token auth, no wandb network, one thread per process."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A fresh embedded Ray cluster for the tests of one module, torn down by the PIDs it started."""
    from orchestrate.cluster.ray_cluster import RayRuntime

    with RayRuntime(address=None, num_cpus=2, object_store_mb=256) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(run dir, step -> loss) of quickstart on dp=2 for 20 steps with checkpoints every 10 and evaluation: the
    curve every layout, resume and recovery test compares against (checkpoint settings do not change losses)."""
    from tests.support.runs import run

    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, run(run_dir, "parallel.dp=2", "train.eval_batches=2")


@pytest.fixture(scope="module")
def sim():
    """A simulated multi-node Ray cluster (cluster/simulated.py) shared by the tests of one module."""
    from orchestrate.cluster.simulated import SimulatedCluster

    cluster = SimulatedCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a new tmpfs of that size (e.g. "1M") mounted under tmp_path, as a container's small
    /dev/shm; unmounted afterwards (which fails if a process still holds memory in it)."""
    import subprocess

    mounts = []

    def mount(size: str):
        path = tmp_path / f"shm{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=True)
