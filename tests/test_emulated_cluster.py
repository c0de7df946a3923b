"""Runs between separate network stacks: an emulated cluster (``orchestrate cluster up``), one Ray node per Linux
network namespace, each with its own address on a bridge. Traffic between ranks crosses real links, and an
address that only works on loopback fails here (it did: gloo followed the hostname to 127.0.0.1)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from orchestrate.cluster import emulated
from orchestrate.cluster.network import collective_interface_environment, interface_of
from tests.support.runs import ENV, curve_of, orchestrate, records_of, recoveries_of, wait_for_records

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT or shutil.which("ip") is None or shutil.which("tc") is None,
                                reason="network namespaces need root and iproute2 (ip, tc)")
STEPS = 20


def test_collectives_follow_the_interface_of_the_node_address_unless_the_user_chose_one():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # an address this machine does not have
    assert collective_interface_environment("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": "lo",
                                                                  "NCCL_SOCKET_IFNAME": "lo"}
    assert collective_interface_environment("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib0"}) == {
        "GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}
    assert collective_interface_environment("127.0.0.1", {"GLOO_SOCKET_IFNAME": "eth1"})["GLOO_SOCKET_IFNAME"] \
        == "eth1"


def test_link_rates_are_checked_and_the_token_bucket_holds_one_tick():
    emulated.check_link_rate("100mbit")
    with pytest.raises(emulated.EmulatedClusterError, match="--link 100mb: not a rate"):
        emulated.check_link_rate("100mb")
    assert emulated.link_burst_bytes("10mbit") == 64 * 1024
    assert emulated.link_burst_bytes("1gbit") == 500_000


def test_cluster_up_without_root_is_one_line_and_exit_2(monkeypatch, capsys):
    from orchestrate.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # any user but root
    assert main(["cluster", "up", "--nodes", "2", "--state-dir", "/tmp/orch-never-made"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "orchestrate: error: orchestrate cluster up needs root: it creates network namespaces, a bridge and tc "
        "shaping (run it as root, e.g. with sudo)"]
    assert not os.path.exists("/tmp/orch-never-made")


def test_the_commands_in_the_multinode_guide_are_valid():
    import re
    import shlex
    from pathlib import Path

    from orchestrate.cli import build_parser

    guide = (Path(__file__).parents[1] / "docs" / "multinode.md").read_text()
    section = guide[guide.index("## 9. An emulated cluster"):]
    commands = [line.split("#")[0].strip() for line in re.findall(r"^orchestrate cluster .*$", section, re.M)]
    assert len(commands) >= 4
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.command == "cluster"


@pytest.fixture(scope="module")
def cluster():
    """Five one-CPU nodes (four ranks and a spare), links unshaped, made and removed through the CLI."""
    state_dir = tempfile.mkdtemp(prefix="orch-em", dir="/tmp")
    made = orchestrate("cluster", "up", "--nodes", "5", "--no-dashboard", "--state-dir", state_dir, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    state = emulated.EmulatedClusterState.load(state_dir)
    assert f"cluster.address={state.address}" in made.stdout
    yield state
    removed = orchestrate("cluster", "down", "--state-dir", state_dir)
    assert removed.returncode == 0, removed.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(node.namespace in namespaces for node in state.nodes)
    assert subprocess.run(["ip", "link", "show", state.bridge], capture_output=True).returncode != 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in [state.head_pid, *(n.pid for n in state.nodes)])


def launch_args(state, run_dir, *overrides):
    return ["launch", "recipe=quickstart", f"train.steps={STEPS}", "logging.progress=false", "parallel.dp=2",
            "parallel.tp=2", f"cluster.address={state.address}", "cluster.cpus_per_worker=1",
            "checkpoint.keepers=true", "checkpoint.persist_every=0", *overrides, f"run.dir={run_dir}"]


def node_at(state, address: str) -> emulated.EmulatedNode:
    [node] = [node for node in state.nodes if node.address == address]
    return node


@needs_root
@pytest.mark.slow
def test_ddp_and_tp_across_network_stacks_with_parity_keepers_survive_a_node_loss(cluster, tmp_path):
    clean = orchestrate(*launch_args(cluster, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    [workers] = [r for r in records_of(tmp_path / "clean") if r.get("event") == "workers"]
    assert len(set(workers["addresses"])) == 4  # every rank in its own network stack: tp crosses links
    assert any(r.get("ckpt_l1") is not None for r in records_of(tmp_path / "clean"))  # parity over the links

    # the node of rank 1 is lost at once (every process in its namespace SIGKILLed) after a committed version
    run_dir = tmp_path / "lost"
    process = subprocess.Popen([sys.executable, "-m", "orchestrate", *launch_args(cluster, run_dir)], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(run_dir, lambda records: any(r.get("step", 0) >= 10 and r.get("ckpt_l1") is not None
                                                      for r in records), process)
        [workers] = [r for r in records_of(run_dir) if r.get("event") == "workers"]
        lost = node_at(cluster, workers["addresses"][1])
        assert emulated.kill_node(lost)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert curve_of(run_dir) == curve_of(tmp_path / "clean")  # bit-identical to the run without the loss
    [recovery] = recoveries_of(run_dir)
    assert recovery["restarted_ranks"] == [1] and len(recovery["lost_nodes"]) == 1
    assert recovery["source"] in ("replica", "parity")
    after = [r for r in records_of(run_dir) if r.get("event") == "workers"][-1]
    assert after["addresses"][1] != lost.address and after["pids"][0] == workers["pids"][0]


@needs_root
def test_links_are_shaped_in_both_directions_and_unshaped_again(cluster):
    node = cluster.nodes[0]

    def qdiscs():
        outside = subprocess.run(["tc", "qdisc", "show", "dev", node.veth], capture_output=True, text=True).stdout
        inside = subprocess.run(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True).stdout
        return outside + inside

    shaped = orchestrate("cluster", "shape", "--link", "10mbit", "--state-dir", cluster.state_dir)
    assert shaped.returncode == 0, shaped.stderr
    assert qdiscs().count("tbf") == 2 and qdiscs().count("rate 10Mbit") == 2
    assert orchestrate("cluster", "shape", "--state-dir", cluster.state_dir).returncode == 0
    assert "tbf" not in qdiscs()
