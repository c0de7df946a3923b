"""Which network interface the collectives use: the one that holds the address Ray reports for this node.

gloo picks its device from the machine's hostname unless told otherwise, and on many installs the hostname
resolves to a loopback address (Debian and Ubuntu map it to 127.0.1.1): ranks on different machines then
advertise 127.0.x.x to each other and cannot connect. Binding to the interface of Ray's node address works
whatever the hostname resolves to, and keeps a local run on loopback.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping, Optional

# Set by the user, these win: one names the other's interface too when only one is set.
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(address: str) -> Optional[str]:
    """Name of the local interface that holds ``address`` (None if no interface here does)."""
    import psutil

    wanted = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for entry in addrs:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(entry.address.split("%")[0]) == wanted:
                        return name
                except ValueError:
                    continue
    return None


def collective_interface_environment(node_address: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables that bind gloo and NCCL's sockets to ``node_address``'s interface; what the user set is kept."""
    chosen = next((environ[key] for key in INTERFACE_VARIABLES if environ.get(key)), None)
    chosen = chosen or interface_of(node_address)
    if chosen is None:
        return {}
    return {key: environ.get(key) or chosen for key in INTERFACE_VARIABLES}


def listening_socket(address: str) -> socket.socket:
    """A socket listening on ``address`` at a free port (not on every interface, as a store would by default)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(socket.SOMAXCONN)
    return sock
