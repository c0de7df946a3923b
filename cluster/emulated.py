"""An emulated multi-node cluster on one machine: a Ray head and N Ray nodes, each node in its own Linux network
namespace with its own address on a bridge, links optionally shaped with ``tc``.

Every node has a network stack of its own, so traffic between nodes really crosses a link (a veth pair through
the bridge) and an address bug that loopback would hide shows up. The subnet is private and exists only inside
this machine. What ``up`` creates is written to a state file as it goes, so ``down`` removes exactly that (the
processes by PID, the namespaces, the bridge) and nothing else, also after an ``up`` that failed halfway.
Nothing here is a library's job: iproute2 and tc are the tools, driven by their command lines.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from orchestrate.cluster.ray_cluster import stop_processes_using

DEFAULT_STATE_DIR = "/tmp/orch-emulated"  # short: Ray's socket paths must stay under ~107 characters
STATE_FILE = "cluster.json"
# Names carry a tag of the cluster so that two clusters (or a test's and a user's) never collide.
BRIDGE = "orch-br-{tag}"
NAMESPACE = "orch-{tag}-n{index}"
VETH = "orch-{tag}-v{index}"  # at most 15 characters (the kernel's limit on interface names)
NODE_INTERFACE = "eth0"
CANDIDATE_SUBNETS = [f"10.{second}.0.0/24" for second in range(77, 100)]
START_TIMEOUT_S = 120.0
RATE_PATTERN = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")


class EmulatedClusterError(RuntimeError):
    """Bad input or a machine that cannot host the cluster: one line for the user."""


@dataclass
class EmulatedNode:
    namespace: str
    veth: str
    address: str
    pid: Optional[int] = None


@dataclass
class EmulatedClusterState:
    state_dir: str
    subnet: str
    bridge: str
    head_address: str
    tag: str = ""
    port: int = 0
    dashboard_port: Optional[int] = None
    head_pid: Optional[int] = None
    link: Optional[str] = None
    latency_ms: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    nodes: list[EmulatedNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head_address}:{self.port}"

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        path.with_suffix(".tmp").write_text(json.dumps(asdict(self), indent=1))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, state_dir: str) -> "EmulatedClusterState":
        raw = json.loads((Path(state_dir) / STATE_FILE).read_text())
        raw["nodes"] = [EmulatedNode(**node) for node in raw["nodes"]]
        return cls(**raw)


def check_can_build() -> None:
    if os.geteuid() != 0:
        raise EmulatedClusterError("orchestrate cluster up needs root: it creates network namespaces, a bridge and "
                                   "tc shaping (run it as root, e.g. with sudo)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulatedClusterError(f"orchestrate cluster up needs '{tool}' (iproute2) on the PATH")


def check_link_rate(rate: Optional[str]) -> None:
    if rate is not None and not RATE_PATTERN.match(rate.lower()):
        raise EmulatedClusterError(f"--link {rate}: not a rate; use a number with bit, kbit, mbit or gbit "
                                   f"(e.g. 100mbit, 1gbit)")


def run_ip(*args: str, namespace: Optional[str] = None) -> str:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulatedClusterError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def addresses_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine already has an address or a route in."""
    used = [ipaddress.ip_network(f"{entry.address}/{entry.netmask}", strict=False)
            for entries in psutil.net_if_addrs().values() for entry in entries
            if entry.family == socket.AF_INET and entry.netmask]
    for line in run_ip("-4", "route").splitlines():
        target = line.split()[0]
        if target != "default":
            used.append(ipaddress.ip_network(target, strict=False))
    return used


def pick_subnet() -> ipaddress.IPv4Network:
    used = addresses_in_use()
    for candidate in map(ipaddress.ip_network, CANDIDATE_SUBNETS):
        if not any(candidate.overlaps(other) for other in used):
            return candidate
    raise EmulatedClusterError(f"no free private subnet among {CANDIDATE_SUBNETS[0]}..{CANDIDATE_SUBNETS[-1]}")


def link_burst_bytes(rate: str) -> int:
    """tbf's bucket must hold at least one timer tick of traffic at the rate (kernel HZ up to 1000, take 250)."""
    value, unit = re.match(r"^([\d.]+)([a-z]+)$", rate.lower()).groups()
    bits_per_s = float(value) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
    return max(64 * 1024, int(bits_per_s / 8 / 250))


def shape_link(device: str, rate: str, namespace: Optional[str] = None) -> None:
    """Traffic leaving ``device`` is limited to ``rate`` (token bucket)."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    command = [*prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
               "burst", str(link_burst_bytes(rate)), "latency", "100ms"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulatedClusterError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (delay): tried on a throwaway veth pair."""
    probe = f"orch-probe{os.getpid() % 10000}"
    if subprocess.run(["ip", "link", "add", probe, "type", "veth", "peer", "name", probe + "p"],
                      capture_output=True).returncode != 0:
        return False
    try:
        return subprocess.run(["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)


def delay_link(device: str, latency_ms: float, rate: Optional[str], namespace: Optional[str] = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    command = [*prefix, "tc", "qdisc", "replace", "dev", device, "root", "netem", "delay", f"{latency_ms}ms",
               *(["rate", rate] if rate else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulatedClusterError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def ray_environment() -> dict[str, str]:
    """Ray's processes bind to their node's address (not loopback) and need no token inside this private net."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def ray_executable() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if found is None:
        raise EmulatedClusterError("the 'ray' command is not installed in this environment")
    return found


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def start_logged(command: list[str], log_path: Path) -> int:
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ray_environment(), start_new_session=True).pid


def wait_started(pid: int, log_path: Path, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until ``ray start --block`` reports its node up; a process that exited or a timeout is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.3)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise EmulatedClusterError(f"{what} did not start within {timeout_s:.0f}s: {tail[0]} (log: {log_path})")


def up(nodes: int, cpus_per_node: float = 1, link: Optional[str] = None, latency_ms: Optional[float] = None,
       object_store_mb: int = 256, dashboard: bool = True, state_dir: str = DEFAULT_STATE_DIR
       ) -> EmulatedClusterState:
    """Build the cluster; on any failure, remove what was built and raise."""
    check_can_build()
    check_link_rate(link)
    if nodes < 1 or nodes > 200:
        raise EmulatedClusterError(f"--nodes {nodes}: must be between 1 and 200")
    if (Path(state_dir) / STATE_FILE).exists():
        raise EmulatedClusterError(f"an emulated cluster is already up (state in {state_dir}); "
                                   f"run 'orchestrate cluster down' first")
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    subnet = pick_subnet()
    tag = secrets.token_hex(2)
    hosts = list(subnet.hosts())
    state = EmulatedClusterState(state_dir=state_dir, subnet=str(subnet), bridge=BRIDGE.format(tag=tag), tag=tag,
                                 head_address=str(hosts[0]), link=link, latency_ms=latency_ms)
    state.save()
    try:
        build_network(state, nodes, hosts)
        start_ray(state, cpus_per_node, object_store_mb, dashboard)
    except BaseException:
        down(state_dir)
        raise
    return state


def build_network(state: EmulatedClusterState, nodes: int, hosts: list) -> None:
    prefix = ipaddress.ip_network(state.subnet).prefixlen
    run_ip("link", "add", state.bridge, "type", "bridge")
    state.save()
    run_ip("addr", "add", f"{state.head_address}/{prefix}", "dev", state.bridge)
    run_ip("link", "set", state.bridge, "up")
    for index in range(nodes):
        node = EmulatedNode(namespace=NAMESPACE.format(tag=state.tag, index=index),
                            veth=VETH.format(tag=state.tag, index=index),
                            address=str(hosts[index + 1]))
        run_ip("netns", "add", node.namespace)
        state.nodes.append(node)
        state.save()
        run_ip("link", "add", node.veth, "type", "veth", "peer", "name", NODE_INTERFACE, "netns", node.namespace)
        run_ip("link", "set", node.veth, "master", state.bridge)
        run_ip("link", "set", node.veth, "up")
        run_ip("addr", "add", f"{node.address}/{prefix}", "dev", NODE_INTERFACE, namespace=node.namespace)
        run_ip("link", "set", NODE_INTERFACE, "up", namespace=node.namespace)
        run_ip("link", "set", "lo", "up", namespace=node.namespace)
    shape_links(state, state.link, state.latency_ms)


def shape_links(state: EmulatedClusterState, rate: Optional[str], latency_ms: Optional[float] = None) -> None:
    """Limit every node's link to ``rate`` (None: unlimited) in both directions, with ``latency_ms`` of delay
    where the kernel has netem (otherwise a note says it was not applied)."""
    check_link_rate(rate)
    delay = bool(latency_ms) and netem_available()
    if latency_ms and not delay and not any("latency not applied" in note for note in state.notes):
        state.notes.append("latency not applied: this kernel has no netem qdisc (links are rate-limited only)")
    for node in state.nodes:
        for device, namespace in ((node.veth, None), (NODE_INTERFACE, node.namespace)):  # both directions
            if delay:
                delay_link(device, latency_ms, rate, namespace)
            elif rate:
                shape_link(device, rate, namespace)
            else:
                prefix = ["ip", "netns", "exec", namespace] if namespace else []
                subprocess.run([*prefix, "tc", "qdisc", "del", "dev", device, "root"], capture_output=True)
    state.link, state.latency_ms = rate, latency_ms
    state.save()


def start_ray(state: EmulatedClusterState, cpus_per_node: float, object_store_mb: int, dashboard: bool) -> None:
    ray = ray_executable()
    state.port = free_port(state.head_address)
    head_log = Path(state.state_dir) / "head.log"
    dashboard_args = ["--include-dashboard=false"]
    if dashboard:
        state.dashboard_port = free_port(state.head_address)
        dashboard_args = [f"--dashboard-host={state.head_address}", f"--dashboard-port={state.dashboard_port}"]
    state.head_pid = start_logged(
        [ray, "start", "--head", "--block", f"--node-ip-address={state.head_address}", f"--port={state.port}",
         "--num-cpus=0", f"--object-store-memory={object_store_mb * 1024 * 1024}",
         f"--temp-dir={Path(state.state_dir) / 'ray'}", "--disable-usage-stats", *dashboard_args], head_log)
    state.save()
    wait_started(state.head_pid, head_log, "the Ray head")
    for node in state.nodes:
        log = Path(state.state_dir) / f"{node.namespace}.log"
        node.pid = start_logged(
            ["ip", "netns", "exec", node.namespace, ray, "start", "--block", f"--address={state.address}",
             f"--node-ip-address={node.address}", f"--num-cpus={cpus_per_node:g}",
             f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats"], log)
        state.save()
        # One at a time: raylets starting together on a small machine miss Ray's fixed 30 s registration wait.
        wait_started(node.pid, log, f"Ray node {node.namespace}")


def stop_process(pid: Optional[int], grace_s: float = 10.0) -> None:
    """SIGTERM (``ray start --block`` then stops its node's processes), SIGKILL after ``grace_s``."""
    if pid is None or not psutil.pid_exists(pid):
        return
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=grace_s)
    except psutil.TimeoutExpired:
        process.kill()
    except psutil.NoSuchProcess:
        pass


def namespace_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def kill_node(node: EmulatedNode) -> list[int]:
    """A machine lost at once: SIGKILL every process in the node's namespace (all of them are this cluster's)."""
    pids = namespace_pids(node.namespace)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def down(state_dir: str = DEFAULT_STATE_DIR) -> Optional[EmulatedClusterState]:
    """Remove what ``up`` recorded in ``state_dir``; None if there is no cluster there."""
    if not (Path(state_dir) / STATE_FILE).exists():
        return None
    state = EmulatedClusterState.load(state_dir)
    for node in state.nodes:
        stop_process(node.pid)
    for node in state.nodes:
        kill_node(node)  # what the node left behind: everything in its namespace
    stop_process(state.head_pid)
    stop_processes_using(str(Path(state.state_dir) / "ray"))
    for node in state.nodes:
        subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)  # its veth pair goes with it
    subprocess.run(["ip", "link", "del", state.bridge], capture_output=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return state
