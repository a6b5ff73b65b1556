"""A multi-node simulation: the ensemble pipeline on a `ray.cluster_utils.Cluster` of three one-CPU nodes on this
machine spreads its member groups over the nodes, and every member comes back exactly once; a node lost in the
middle of the run (removed, its processes killed) costs a restart from the checkpoint, not a member; and a
search that loses a running trial's node retries that trial alone, from its checkpoint.

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

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.long]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from pathlib import Path

import ray

from equiray.config import load_config
from equiray_pipelines.ensemble import EnsembleConfig, run_train
from simcluster import simulated_cluster  # tests/pipelines/simcluster.py

root = Path(sys.argv[1])

# head + two workers, one CPU each: each Train worker (1 CPU) needs a node to itself, the third node's CPU is
# left for Ray Data's read tasks
cluster = simulated_cluster(head_cpus=1, workers=2)
try:
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


def _run_in_a_simulated_cluster(script: str, tmp_path: Path) -> dict:
    """Run ``script`` (it writes result.json) in a subprocess with a Ray temp dir of its own; no process of its
    cluster may survive it."""
    (tmp_path / "run.py").write_text(script)
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
    return json.loads((tmp_path / "result.json").read_text())


def test_ensemble_member_groups_spread_over_nodes_and_all_come_back(sole_ray, tmp_path):
    out = _run_in_a_simulated_cluster(SCRIPT, tmp_path)
    assert len(out["nodes"]) == 3
    used = {n for nodes in out["group_nodes"].values() for n in nodes}
    assert used <= set(out["nodes"]) and len(used) >= 2, out["group_nodes"]  # groups ran on two nodes
    # groups i and i + 2 share a worker (round-robin), so they share a node; the two workers are on two nodes
    assert out["group_nodes"]["0"] == out["group_nodes"]["2"] != out["group_nodes"]["1"] == out["group_nodes"]["3"]
    members = sorted(m for ms in out["group_members"].values() for m in ms)
    assert members == list(range(8))  # every member exactly once
    assert out["members"] == 8 and out["per_setting"] == {"sym+aug": 4, "sym, no aug": 4}


NODE_LOSS_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path

import ray

from equiray.config import load_config
from equiray_pipelines.ensemble import EnsembleConfig, run_train
from simcluster import alive_nodes, checkpointed_rounds, simulated_cluster  # tests/pipelines/simcluster.py

root = Path(sys.argv[1])

# head + three workers, one CPU each: the two Train workers (1 CPU) on two of the workers, the third worker spare
# for the worker group's restart once a node is gone; the head's CPU for Ray Data's read tasks
cluster = simulated_cluster(head_cpus=1, workers=3)
lost = {}


def lose_a_node_once_a_round_is_checkpointed(stop):
    from ray.util.state import list_actors

    while not stop.is_set():
        if checkpointed_rounds(root / "runs") >= 2:
            workers = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                               ("state", "=", "ALIVE")])}
            node = next((n for n in cluster.worker_nodes if n.node_id in workers), None)
            if node is not None:
                lost["node"], lost["round"] = node.node_id, checkpointed_rounds(root / "runs")
                cluster.remove_node(node, allow_graceful=False)  # the node's raylet and workers, killed at once
                return
        time.sleep(0.1)


try:
    ray.init(address=cluster.address)
    cfg = load_config(EnsembleConfig, {
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": 800, "resize": None},
        "member": {"kwargs": {"width": 4}},
        "settings": [{"name": "sym+aug"}, {"name": "sym, no aug", "augment": False}],
        "members": 4, "members_per_group": 2, "train": {"epochs": 5},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0, "torch_threads": 1},
        "tracking": {"experiment": "test-node-loss"}, "eval": {"max_eval": 50},
        "storage_path": str(root / "runs"), "max_failures": 2})
    stop = threading.Event()
    loser = threading.Thread(target=lose_a_node_once_a_round_is_checkpointed, args=(stop,), daemon=True)
    loser.start()
    try:
        result = run_train(cfg)
    finally:
        stop.set()
        loser.join(10)
    out = {"lost": lost, "alive": alive_nodes(gone=lost.get("node")),
           "group_nodes": {str(k): v for k, v in result.group_nodes.items()},
           "group_members": {str(k): v for k, v in result.group_members.items()},
           "members": result.members, "restarts": result.restarts, "run_id": result.run_id,
           "per_setting": {k: e.num_members for k, e in result.ensembles.items()}}
    (root / "result.json").write_text(json.dumps(out))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_node_lost_mid_run_costs_a_restart_not_a_member(sole_ray, tmp_path):
    """A worker node removed (its raylet and processes killed) while member groups train on it: Ray Train restarts
    the worker group on the nodes left, from the latest checkpoint; every member comes back exactly once, every
    epoch of every group is recorded once (on the lost node before the loss, elsewhere after), and the MLflow run
    counts the restart."""
    import mlflow

    out = _run_in_a_simulated_cluster(NODE_LOSS_SCRIPT, tmp_path)
    lost = out["lost"].get("node")
    assert lost, "the run finished before a node could be lost"
    assert lost not in out["alive"] and len(out["alive"]) == 3
    assert out["restarts"] >= 1
    members = sorted(m for ms in out["group_members"].values() for m in ms)
    assert members == list(range(8)) and out["per_setting"] == {"sym+aug": 4, "sym, no aug": 4}
    nodes = out["group_nodes"]
    assert all(len(ns) == 5 for ns in nodes.values()), nodes  # 5 epochs each, none twice, none missing
    assert any(lost in ns for ns in nodes.values()), nodes  # some epochs ran on the lost node ...
    for ns in nodes.values():  # ... and none after an epoch elsewhere: once gone, gone
        assert lost not in ns or ns[:ns.count(lost)] == [lost] * ns.count(lost), ns
    assert any(lost in ns and ns[-1] != lost for ns in nodes.values()), nodes  # a group moved on mid-training
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["restarts"] == out["restarts"]


FTP_NODE_LOSS_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path

import mlflow
import ray

from equiray.config import load_config
from equiray_pipelines.ftp import FTPConfig, run_tune
from simcluster import alive_nodes, simulated_cluster  # tests/pipelines/simcluster.py

root = Path(sys.argv[1])
raw = json.loads((root / "ftp.json").read_text())
# a head without CPUs (no trial lands there) and three one-CPU workers: two trials at a time, a node to spare
cluster = simulated_cluster(head_cpus=0, workers=3)
lost = {}


def lose_a_trials_node_once_a_trial_finished(stop):
    # once a trial has finished, the node of a running trial that has checkpointed an epoch is removed
    client = mlflow.MlflowClient()
    while not stop.is_set():
        exp = client.get_experiment_by_name(raw["tracking"]["experiment"])
        runs = client.search_runs([exp.experiment_id], "tags.`equiray.pipeline` = 'ftp'") if exp else []
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        finished = [r.info.run_id for r in trials if r.info.status == "FINISHED"]
        # a trial 2 to 6 of its 12 epochs in: checkpointed, and far from done when its node goes
        running = [r for r in trials if r.info.status == "RUNNING" and r.data.tags.get("equiray.node")
                   and 2 <= len(client.get_metric_history(r.info.run_id, "val_accuracy")) <= 6]
        if finished and running:
            node_id = running[0].data.tags["equiray.node"]
            node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
            lost.update(node=node_id, run_id=running[0].info.run_id, finished=finished, at_ms=time.time() * 1000)
            cluster.remove_node(node, allow_graceful=False)  # the node's raylet and the trial's process, killed
            return
        time.sleep(0.2)


try:
    ray.init(address=cluster.address)
    stop = threading.Event()
    loser = threading.Thread(target=lose_a_trials_node_once_a_trial_finished, args=(stop,), daemon=True)
    loser.start()
    try:
        result = run_tune(load_config(FTPConfig, raw))
    finally:
        stop.set()
        loser.join(10)
    out = {"lost": lost, "alive": alive_nodes(gone=lost.get("node")), "run_id": result.run_id,
           "rows": [{"run_id": r.run_id, "epochs": r.epochs} for r in result.rows]}
    (root / "result.json").write_text(json.dumps(out))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_search_that_loses_a_trials_node_retries_that_trial_alone(sole_ray, tmp_path):
    """An FTP search on a simulated cluster: once a trial has finished, the node of a running one is removed.
    Tune retries that trial from its last checkpoint on a node left (its MLflow run says so: a restart, the
    epoch it went on from, the new node); the finished trial is not trained again; every epoch of every trial is
    logged once."""
    import mlflow

    from test_canon_sweep import register_backbone
    from test_ftp_search import small_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_backbone(tmp_path / "digits", uri)
    raw = small_config(tmp_path, search={"num_samples": 3, "searcher": "random", "scheduler": "none"},
                       resources={"cpus_per_trial": 1.0, "max_concurrent": 2}, train={"epochs": 12, "batch_size": 16},
                       tracking={"experiment": "test-ftp-node-loss"})
    (tmp_path / "ftp.json").write_text(json.dumps(raw))
    out = _run_in_a_simulated_cluster(FTP_NODE_LOSS_SCRIPT, tmp_path)
    lost = out["lost"]
    assert lost.get("node"), "the search finished before a trial's node could be lost"
    assert lost["node"] not in out["alive"]
    client = mlflow.MlflowClient(uri)
    assert len(out["rows"]) == 3 and all(r["epochs"] == 12 for r in out["rows"])
    for r in out["rows"]:  # every epoch of every trial logged once
        steps = sorted(m.step for m in client.get_metric_history(r["run_id"], "val_accuracy"))
        assert steps == list(range(12)), (r, steps)
    for run_id in lost["finished"]:  # a finished trial is not trained again
        assert all(m.timestamp < lost["at_ms"] for m in client.get_metric_history(run_id, "val_accuracy"))
    moved = client.get_run(lost["run_id"])  # the trial that was on the lost node: retried elsewhere, and says so
    assert moved.info.status == "FINISHED" and int(moved.data.tags["equiray.restarts"]) == 1
    assert int(moved.data.tags["equiray.restarted_at_epoch"]) >= 1 and moved.data.tags["equiray.node"] != lost["node"]
    assert client.get_run(out["run_id"]).info.status == "FINISHED"
