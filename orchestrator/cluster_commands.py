"""``orchestrate cluster up|down``: an emulated multi-node Ray cluster on this machine (see ``cluster.emulated``).

``up`` prints the ``cluster.address`` to launch on; ``down`` removes everything ``up`` created. Bad input, a
missing tool or no root: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def add_commands(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="an emulated multi-node cluster on this machine (root)")
    actions = cluster.add_subparsers(dest="cluster_action", required=True)
    up = actions.add_parser("up", help="start a Ray head and N nodes, each in its own network namespace")
    up.add_argument("--nodes", type=int, required=True, help="number of Ray nodes (besides the head)")
    up.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs each node offers (default 1)")
    up.add_argument("--link", metavar="RATE", help="rate limit of every node's link, e.g. 100mbit, 1gbit")
    up.add_argument("--latency", metavar="MS", type=float, help="one-way delay per link (needs netem)")
    up.add_argument("--object-store-mb", type=int, default=256, help="object store per node (default 256)")
    up.add_argument("--no-dashboard", action="store_true", help="no dashboard (faster; 'submit' needs it)")
    shape = actions.add_parser("shape", help="change the link rate of a running emulated cluster")
    shape.add_argument("--link", metavar="RATE", help="rate limit, e.g. 10mbit; leave out for unlimited")
    shape.add_argument("--latency", metavar="MS", type=float, help="one-way delay per link (needs netem)")
    down = actions.add_parser("down", help="stop the emulated cluster and remove its namespaces and bridge")
    for parser in (up, shape, down):
        parser.add_argument("--state-dir", help="where the cluster's state and logs live (default "
                                                "/tmp/orch-emulated)")


def run_command(args: argparse.Namespace) -> int:
    from orchestrate.cluster import emulated

    state_dir = args.state_dir or emulated.DEFAULT_STATE_DIR
    try:
        if args.cluster_action == "up":
            state = emulated.up(args.nodes, args.cpus_per_node, args.link, args.latency, args.object_store_mb,
                                not args.no_dashboard, state_dir)
            print_up(state)
            return 0
        if args.cluster_action == "shape":
            emulated.check_can_build()
            state = emulated.EmulatedClusterState.load(state_dir)  # FileNotFoundError: no cluster there
            emulated.shape_links(state, args.link, args.latency)
            print(f"links {args.link or 'unlimited'}" + "".join(f"\nnote: {note}" for note in state.notes))
            return 0
        state = emulated.down(state_dir)
    except FileNotFoundError:
        print(f"orchestrate: error: no emulated cluster in {state_dir} (start one with 'orchestrate cluster up')",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except emulated.EmulatedClusterError as err:
        print(f"orchestrate: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"removed {len(state.nodes)} nodes, their namespaces and the bridge {state.bridge}"
          if state else f"no emulated cluster in {state_dir}")
    return 0


def print_up(state) -> None:
    from orchestrate.cluster.emulated import DEFAULT_STATE_DIR

    link = state.link or "unlimited"
    print(f"emulated cluster up: head {state.head_address}, {len(state.nodes)} nodes "
          f"({', '.join(node.address for node in state.nodes)}), links {link}")
    for note in state.notes:
        print(f"note: {note}")
    print(f"launch:  orchestrate launch recipe=quickstart cluster.address={state.address} cluster.cpus_per_worker=1")
    if state.dashboard_port:
        print(f"submit:  orchestrate submit recipe=quickstart "
              f"cluster.address=http://{state.head_address}:{state.dashboard_port}")
    print("stop:    orchestrate cluster down" + (f" --state-dir {state.state_dir}"
                                                 if state.state_dir != DEFAULT_STATE_DIR else ""))
