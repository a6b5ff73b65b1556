"""A multi-node simulation: the ensemble pipeline on a `ray.cluster_utils.Cluster` of three one-CPU nodes on this
machine spreads its member groups over the nodes, and every member comes back exactly once.

The cluster lives in a subprocess of the test (the session's shared Ray, stopped meanwhile by `sole_ray`, is
another instance in this process), with a Ray temp dir of its own (RAY_TMPDIR), so nothing else on the machine can find and join it."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from equiray.config import load_config
from pipelines.ensemble import EnsembleConfig, run_train
from ports import free_port  # tests/pipelines/ports.py

root = Path(sys.argv[1])

# head + two workers, one CPU each: each Train worker (1 CPU) needs a node to itself, the third node's CPU is
# left for Ray Data's read tasks
# free ports of our own, not Ray's defaults (52365, ...), which another Ray on this machine may hold
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
    "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
    "runtime_env_agent_port": free_port()})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = load_config(EnsembleConfig, {
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": 400, "resize": None},
        "member": {"kwargs": {"width": 4}},
        "settings": [{"name": "sym+aug"}, {"name": "sym, no aug", "augment": False}],
        "members": 4, "members_per_group": 2, "train": {"epochs": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0, "torch_threads": 1},
        "tracking": {"experiment": "test-multinode"}, "eval": {"max_eval": 50},
        "storage_path": str(root / "runs"), "max_failures": 0})
    result = run_train(cfg)
    out = {"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
           "group_nodes": {str(k): v for k, v in result.group_nodes.items()},
           "group_members": {str(k): v for k, v in result.group_members.items()},
           "members": result.members, "per_setting": {k: e.num_members for k, e in result.ensembles.items()}}
    (root / "result.json").write_text(json.dumps(out))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_ensemble_member_groups_spread_over_nodes_and_all_come_back(sole_ray, tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    ray_tmp = tempfile.mkdtemp(prefix="eqm-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]),  # the script imports ports
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    alive = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
    assert not alive, f"processes of the simulated cluster survived: {alive}"
    shutil.rmtree(ray_tmp, ignore_errors=True)

    out = json.loads((tmp_path / "result.json").read_text())
    assert len(out["nodes"]) == 3
    used = {n for nodes in out["group_nodes"].values() for n in nodes}
    assert used <= set(out["nodes"]) and len(used) >= 2, out["group_nodes"]  # groups ran on two nodes
    # groups i and i + 2 share a worker (round-robin), so they share a node; the two workers are on two nodes
    assert out["group_nodes"]["0"] == out["group_nodes"]["2"] != out["group_nodes"]["1"] == out["group_nodes"]["3"]
    members = sorted(m for ms in out["group_members"].values() for m in ms)
    assert members == list(range(8))  # every member exactly once
    assert out["members"] == 8 and out["per_setting"] == {"sym+aug": 4, "sym, no aug": 4}
