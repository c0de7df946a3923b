"""A simulated multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a head without CPUs plus worker
nodes that are added and removed, every raylet on 127.0.0.1. For tests, benchmarks, and users who want to try
node-loss recovery (``fault.kind=node``) before they own a cluster: pass ``cluster.address=<sim.address>``."""
import logging
import os
import shutil
import tempfile
import time

import ray

MiB = 1 << 20
# Ray declares a node dead after failed health checks (default 5 x 3 s); notice killed nodes sooner: a check of a
# killed raylet fails at once (connection refused), so 5 checks a second apart take ~5 s. A raylet starved of CPU
# by many nodes on a busy 2-core machine answers late, not never: a long timeout keeps it from being declared dead
# while alive (seen with 2 s).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
                   "RAY_health_check_timeout_ms": "10000", "RAY_health_check_initial_delay_ms": "2000"}


class SimulatedCluster:
    """A head without CPUs plus worker nodes that tests add and remove; shut down by ``shutdown`` only."""

    def __init__(self, cpus_per_node: int = 1):
        from ray.cluster_utils import Cluster

        from orchestrate.cluster.ray_cluster import configure_local_environment

        configure_local_environment()  # loopback only, no token auth, as for the embedded cluster
        self.temp_dir = tempfile.mkdtemp(prefix="orch-sim-", dir="/tmp")  # short: unix socket path limit
        self.cpus_per_node = cpus_per_node
        # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster: keep it out of the shared /tmp/ray
        self.saved_env = {key: os.environ.get(key) for key in ("RAY_TMPDIR", *FAST_NODE_DEATH)}
        os.environ.update({"RAY_TMPDIR": self.temp_dir, **FAST_NODE_DEATH})
        os.makedirs(os.path.join(self.temp_dir, "ray"))
        self.cluster = Cluster()
        self.nodes = []

    @property
    def address(self) -> str:
        return self.cluster.address

    def start(self):
        self.cluster.add_node(num_cpus=0, include_dashboard=False, object_store_memory=100 * MiB,
                              temp_dir=self.temp_dir)
        ray.init(address=self.cluster.address, logging_level=logging.ERROR)

    def live_nodes(self, count):
        """``count`` worker nodes, adding fresh ones for those removed by earlier tests."""
        while len(self.nodes) < count:
            self.nodes.append(self.cluster.add_node(num_cpus=self.cpus_per_node, object_store_memory=100 * MiB))
        self.cluster.wait_for_nodes()
        return list(self.nodes[:count])

    def resize(self, count):
        """Exactly ``count`` live worker nodes: dead ones forgotten, missing ones added, extra ones removed."""
        self.drop_dead_nodes()
        for node in self.nodes[count:]:
            self.remove(node)
        return self.live_nodes(count)

    def remove(self, node, timeout_s=60):
        self.cluster.remove_node(node)
        self.nodes.remove(node)
        self.wait_until_dead(node.node_id, timeout_s)

    @staticmethod
    def wait_until_dead(node_id, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "removed node still reported alive"
            time.sleep(0.2)

    def drop_dead_nodes(self):
        """Forget (and clean up after) worker nodes that died on their own, e.g. from ``fault.kind=node``, once Ray
        declared them dead: a node Ray still lists as alive would be offered to the next run."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node in [node for node in self.nodes if node.node_id not in alive or node.dead_processes()]:
            self.cluster.remove_node(node, allow_graceful=False)
            self.nodes.remove(node)
            self.wait_until_dead(node.node_id)

    def shutdown(self):
        try:
            ray.shutdown()
            self.cluster.shutdown()
        finally:
            for key, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(self.temp_dir, ignore_errors=True)


