"""Helpers for the tests that run a pipeline on a cluster of their own, importable from the scripts those tests
run in a subprocess (their PYTHONPATH holds this folder): a simulated multi-node cluster on free ports, and how
far a Ray Train run has checkpointed."""
from __future__ import annotations

import json
from pathlib import Path

from ports import free_port


def simulated_cluster(*, head_cpus: int, workers: int):
    """A ``ray.cluster_utils.Cluster``: a head with ``head_cpus`` CPUs and ``workers`` one-CPU worker nodes, on
    free ports of its own (not Ray's defaults, which another Ray on this machine may hold), all up."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def checkpointed_rounds(storage: Path) -> int:
    """The rounds (the ``round`` metric) of the latest checkpoint Ray Train's controller has registered for a run
    under ``storage`` (its snapshot on storage); 0 before the first."""
    for snap in Path(storage).glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            continue
        return int((latest.get("metrics") or {}).get("round", 0))
    return 0


def alive_nodes(*, gone: str | None = None, timeout_s: float = 60.0) -> list[str]:
    """The IDs of the nodes the cluster's GCS holds alive, once it has marked ``gone`` dead (or ``timeout_s``
    has passed): a node whose raylet was killed stays "alive" until the GCS's health checks have missed it a
    few times (up to ~20 s), which can be after a short run has already finished."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if gone is None or gone not in alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
