"""`.brokers/cluster.env`: the MSGBROKER_TEST_CLUSTER_* settings of the clusters that are up."""

from __future__ import annotations

from ..common import RUN_DIR
from .node import Cluster

CLUSTER_ENV_FILE = RUN_DIR / "cluster.env"


def cluster_env_lines(clusters: list[Cluster]) -> list[str]:
    """One line per cluster with at least one node running: every node's address, node 1 first."""
    return [c.env_line() for c in clusters if c.running()]


def write_cluster_env_file(clusters: list[Cluster]) -> None:
    """Write .brokers/cluster.env anew from all clusters (pass every one, not just those acted on)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CLUSTER_ENV_FILE.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in cluster_env_lines(clusters)))
    tmp.replace(CLUSTER_ENV_FILE)
