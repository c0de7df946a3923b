"""Ray bootstrap: a new embedded local cluster bound to 127.0.0.1 (default), or an existing cluster to join.

Local mode never attaches to a stray cluster (``address="local"``), keeps its session files in a temp dir of its
own (so no stale ``ray_current_cluster`` file is shared with other users), sizes the object store, and on exit
stops only the processes it started. ``ray stop`` is never used: it kills every Ray process on the machine.
Each setting guards against a measured trap: a cluster bound to a public address, a stale session file,
an object store sized to all memory, and `ray stop` killing other users' processes.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

LOCAL_ENV = {
    # Ray binds its listeners to the machine's external address unless this is off (read when ray is imported).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token auth (Ray 2.60 default) guards remote access; a loopback-only cluster of our own does not need it.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# Where embedded clusters keep their session files (short: socket paths must stay under ~107 characters).
TEMP_ROOT_ENV = "ORCHESTRATE_RAY_TMPDIR"


def configure_local_environment() -> None:
    """Must run before ``import ray`` in this process; workers inherit the environment through the raylet."""
    os.environ.update(LOCAL_ENV)
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


@dataclass
class ClusterResources:
    cpus: float
    gpus: float


def local_capacity(num_cpus: Optional[int]) -> ClusterResources:
    """What an embedded cluster will offer: ``num_cpus`` or this machine's cores; GPUs if torch sees them."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ClusterResources(cpus=float(num_cpus or os.cpu_count() or 1), gpus=float(gpus))


class RayRuntime:
    """Context manager owning the Ray connection for one command."""

    def __init__(self, address: Optional[str], num_cpus: Optional[int] = None, object_store_mb: int = 512):
        self.address = address
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.temp_dir: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return self.address is None

    def __enter__(self) -> "RayRuntime":
        if self.is_local:
            configure_local_environment()
        import ray

        if self.is_local:
            # Short path: Ray's unix socket paths must stay under ~107 characters.
            self.temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir=os.environ.get(TEMP_ROOT_ENV, "/tmp"))
            capacity = local_capacity(self.num_cpus)
            ray.init(address="local", num_cpus=int(capacity.cpus), num_gpus=int(capacity.gpus),
                     include_dashboard=False, object_store_memory=self.object_store_mb * 1024 * 1024,
                     _temp_dir=self.temp_dir, logging_level=logging.ERROR, log_to_driver=True)
        else:
            ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=True)
        return self

    def resources(self) -> ClusterResources:
        import ray

        total = ray.cluster_resources()
        return ClusterResources(cpus=float(total.get("CPU", 0)), gpus=float(total.get("GPU", 0)))

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        if self.temp_dir:
            stop_processes_using(self.temp_dir)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def stop_processes_using(temp_dir: str, grace_s: float = 5.0) -> list[int]:
    """Wait for, then kill, leftover processes of our own cluster (their command line names our temp dir).

    ``ray.shutdown`` stops GCS and raylet; some agents linger for a while after it returns.
    """
    import psutil

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and any(temp_dir in part for part in (proc.info["cmdline"] or [])):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    deadline = time.monotonic() + grace_s
    leftovers = ours()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = ours()
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=5)
    return [p.pid for p in leftovers]


class ClusterUnreachable(RuntimeError):
    """Nothing that looks like a Ray cluster answers at the address given."""


# The client preface of HTTP/2 and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with SETTINGS.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS_FRAME = 4


def gcs_endpoint(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a GCS address ``HOST:PORT``; ``auto`` resolves through RAY_ADDRESS when that is set.
    None when Ray finds the cluster itself (``auto`` without RAY_ADDRESS)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto" or "://" in address:
            return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"cluster.address={address}: not HOST:PORT (the GCS address, port 6379 by "
                                 f"default) or auto")
    return host.strip("[]"), int(port)


def check_cluster_answers(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming why, unless a gRPC server (Ray's GCS) answers at ``address``: Ray's own client
    retries for minutes before it gives up. Written by hand because no Ray API checks an address with a
    timeout."""
    if "://" in address:
        raise ClusterUnreachable(f"cluster.address={address}: launch joins a cluster by its GCS address HOST:PORT "
                                 f"(or auto); a dashboard URL is for 'orchestrate submit'")
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    import socket

    try:
        with socket.create_connection(endpoint, timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(HTTP2_PREFACE)
            reply = sock.recv(9)
    except socket.timeout:
        raise ClusterUnreachable(f"cluster.address={address}: no Ray cluster answers there (no reply within "
                                 f"{timeout_s:.0f}s)") from None
    except OSError as err:
        raise ClusterUnreachable(f"cluster.address={address}: no Ray cluster answers there "
                                 f"({(err.strerror or str(err)).lower()})") from None
    if len(reply) < 4 or reply[3] != HTTP2_SETTINGS_FRAME:
        raise ClusterUnreachable(f"cluster.address={address}: something answers there, but not a Ray cluster "
                                 f"(its GCS port, 6379 by default)")
