"""cluster.yaml's node types on Ray's own autoscaler (the fake multi-node provider: real raylets on this machine,
fake GPUs): the ensemble pipeline's member groups ask for fractional GPUs, the autoscaler adds worker nodes for
them, every member comes back exactly once, and the idle nodes are removed (issue 21).

The pipeline goes to the cluster as a user sends it: jobs/ensemble.yaml's job spec, scaled down, through
`equiray submit --follow` (its driver is a Ray job on the head). The cluster runs from a subprocess of the test
(the session's shared Ray, stopped meanwhile by `sole_ray`, is another instance in this process); its head is a
process group of its own, stopped alone (`ray stop` would end every Ray process on the machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from equiray_pipelines.fake_cluster import FAKE_HEAD_TYPE, fake_cluster_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, subprocess, sys, threading, time
from pathlib import Path

import mlflow
import yaml

from equiray_pipelines.fake_cluster import FakeCluster

root, repo = Path(sys.argv[1]), Path(sys.argv[2])
# jobs/ensemble.yaml's pipeline at a tiny scale: its entrypoint and runtime_env, a config scaled down from
# jobs/configs/ensemble.yaml (a fraction of a GPU and a CPU per worker), submitted with `equiray submit`
spec = yaml.safe_load((repo / "jobs" / "ensemble.yaml").read_text())
config = {
    "data": {"source": "digits", "dir": str(root / "digits"), "max_train": 400, "resize": None},
    "member": {"kwargs": {"width": 4}},
    "settings": [{"name": "sym+aug"}, {"name": "sym, no aug", "augment": False}],
    "members": 4, "members_per_group": 2, "train": {"epochs": 1},
    "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5, "cpus_per_worker": 1.0,
                "torch_threads": 1, "backend": "gloo"},  # the GPUs are fake: no NCCL
    "tracking": {"experiment": "test-autoscaling"}, "eval": {"max_eval": 50},
    "storage_path": str(root / "runs"), "max_failures": 0}
(root / "ensemble.yaml").write_text(yaml.safe_dump(config))
# `cd` first: the fake nodes share this machine's one Ray session directory, and the unpacked working dir the
# job's driver stands in was removed under it mid-run by another node's runtime-env agent (seen: os.getcwd()
# failing in the driver); on a real cluster every node has its own. The workers still run the uploaded copy.
spec["entrypoint"] = f"cd {repo} && python -m equiray_pipelines.ensemble train --config {root / 'ensemble.yaml'}"
spec["entrypoint_num_cpus"] = 0  # the job's driver on the head (no CPUs there): every CPU node is the autoscaler's
spec["runtime_env"]["working_dir"] = str(repo)
spec["runtime_env"].pop("pip")  # the nodes run this Python already (a pip env would clone the virtualenv: minutes)
(root / "job.yaml").write_text(yaml.safe_dump(spec))
uri = os.environ["MLFLOW_TRACKING_URI"]
counts = []
with FakeCluster(yaml.safe_load((repo / "cluster.yaml").read_text()), root / "cluster", cpus_per_node=1) as fc:
    stop = threading.Event()

    def watch():  # the state API: no driver needed
        while not stop.is_set():
            counts.append((time.monotonic(), len(fc.alive_nodes())))
            stop.wait(1.0)

    threading.Thread(target=watch, daemon=True).start()
    start = time.monotonic()
    # 4 minutes on a quiet hour; a loaded CI run once took over 10 (its log was lost with the timeout: now kept)
    try:
        job = subprocess.run([str(Path(sys.executable).parent / "equiray"), "submit", str(root / "job.yaml"),
                              "--address", fc.url, "--env", f"MLFLOW_TRACKING_URI={uri}", "--follow"],
                             capture_output=True, text=True, timeout=1500)
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        job = subprocess.CompletedProcess(e.cmd, "timed out after 1500 s", text(e.stdout), text(e.stderr))
    trained = time.monotonic()
    (root / "job.log").write_text(job.stdout + job.stderr)
    while time.monotonic() - trained < 240 and counts[-1][1] > 1:  # idle nodes go after idle_timeout_minutes
        time.sleep(1)
    stop.set()
    from ray.util.state import list_actors

    alive = list_actors(address=fc.url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-autoscaling")
    runs = client.search_runs([exp.experiment_id], "tags.`equiray.pipeline` = 'ensemble-train'") if exp else []
    groups = {}
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="members",
                                                    dst_path=str(root / "members"), tracking_uri=uri)
        for f in Path(local).glob("group-*.json"):
            meta = json.loads(f.read_text())
            groups[str(meta["gid"])] = {"members": meta["members"], "nodes": meta["nodes"]}
    out = {"job_rc": job.returncode, "job_log": (job.stdout + job.stderr)[-4000:],
           "actors_left": [(a.class_name, a.node_id) for a in alive],
           "nodes_left": [n.node_id for n in fc.alive_nodes() if not n.is_head_node],
           "counts": [(round(t - start, 1), n) for t, n in counts if n], "trained_at": round(trained - start, 1),
           "runs": [(r.info.run_id, r.info.status, r.data.metrics.get("members")) for r in runs], "groups": groups}
    (root / "result.json").write_text(json.dumps(out))
"""


def test_fake_cluster_config_scales_cluster_yaml_down():
    """The fake cluster's node types are cluster.yaml's, scaled to this machine: GPU types keep (fake) GPUs, every
    worker type a CPU, bounds capped; the head has no CPU (work needs worker nodes)."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg = fake_cluster_config(cluster, gcs_address="127.0.0.1:1", max_workers_per_type=2)
    types = cfg["available_node_types"]
    workers = set(cluster["available_node_types"]) - {cluster["head_node_type"]}
    assert set(types) == workers | {FAKE_HEAD_TYPE} and cfg["head_node_type"] == FAKE_HEAD_TYPE
    assert types[FAKE_HEAD_TYPE]["resources"] == {"CPU": 0}
    assert types["gpu_1x"]["resources"] == {"CPU": 1, "GPU": 1} and types["gpu_1x"]["max_workers"] == 2
    assert types["gpu_4x"]["resources"] == {"CPU": 1, "GPU": 1} and types["gpu_4x"]["max_workers"] == 1
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["max_workers"] == 3


@pytest.mark.long
def test_the_autoscaler_adds_nodes_for_member_groups_and_removes_them_idle(sole_ray, tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(REPO)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=2100)
    head_log = (tmp_path / "cluster" / "head.log")
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:]
                                  + (head_log.read_text()[-2000:] if head_log.exists() else ""))
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["job_rc"] == 0, (out["job_rc"], out["job_log"], out["counts"])  # `equiray submit --follow`: it succeeded
    counts = [n for _, n in out["counts"]]
    assert counts[0] == 1, out["counts"]  # the head alone
    assert max(counts) >= 3, out["counts"]  # a worker node per Train worker (1 CPU each), added by the autoscaler
    assert counts[-1] == 1 and not out["nodes_left"], out  # idle: removed again
    # Ray's one-per-cluster actors that outlive the job sit on the head (Ray Data's stats actor, made by the first
    # Train worker to read, pinned a GPU node for good before equiray created it from the driver)
    assert {node for _, node in out["actors_left"]} <= {FAKE_HEAD_NODE_ID}, out["actors_left"]
    assert [status for _, status, _ in out["runs"]] == ["FINISHED"] and out["runs"][0][2] == 8, out["runs"]
    members = sorted(m for g in out["groups"].values() for m in g["members"])
    assert members == list(range(4 * 2))  # every member exactly once
    # the groups trained on the worker nodes the autoscaler added, not on the head
    assert FAKE_HEAD_NODE_ID not in {n for g in out["groups"].values() for n in g["nodes"]}, out["groups"]
