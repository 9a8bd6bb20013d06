"""Ports for the Ray nodes tests start beside the suite's own local Ray instance."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node opens, chosen here: nodes on one machine (and the suite's own
    instance) must not collide on Ray's fixed defaults (agent 52365, workers 10002+): a head
    whose agent cannot bind takes no jobs ("No available agent to submit job")."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]         # 0: OS-assigned worker ports
