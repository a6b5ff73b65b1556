"""cluster.yaml's node types on Ray's fake multi-node provider: the real autoscaler adding and removing real raylets
on this one machine, so a pipeline's resource requests (fractional GPUs included) can be watched turning into nodes
without a cloud account. The GPUs are fake (a resource count, no device): training falls back to the CPU.

    cfg = fake_cluster_config(yaml.safe_load(open("cluster.yaml")), gcs_address="127.0.0.1:6390")
    # RAY_FAKE_CLUSTER=1 ray start --head --block --num-cpus=0 --port=6390 --autoscaling-config=fake.yaml

:class:`FakeCluster` starts such a head as a process group of its own and stops only that (``ray stop`` would end
every Ray process on the machine)."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["FAKE_HEAD_TYPE", "FakeCluster", "fake_cluster_config"]

FAKE_HEAD_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node: the head's node type there


def fake_cluster_config(cluster: Mapping[str, Any], *, gcs_address: str, cpus_per_node: int = 1,
                        max_gpus_per_node: int = 1, max_workers_per_type: int = 2,
                        idle_timeout_minutes: float = 0.25) -> dict[str, Any]:
    """An autoscaling config for the fake provider with ``cluster``'s worker node types, scaled down to this
    machine: ``cpus_per_node`` CPUs each, at most ``max_gpus_per_node`` (fake) GPUs, ``min_workers`` kept and
    ``max_workers`` capped at ``max_workers_per_type``; the head has no CPUs, so every task needs a worker node.
    Idle nodes go after ``idle_timeout_minutes``."""
    # the fake provider names its head's type ray.head.default; under cluster.yaml's name the autoscaler would
    # keep launching (and at once removing) a second head
    head_type = FAKE_HEAD_TYPE
    types: dict[str, Any] = {head_type: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        res = dict(spec.get("resources", {}))
        scaled = {"CPU": cpus_per_node}
        if res.get("GPU"):
            scaled["GPU"] = min(int(res["GPU"]), max_gpus_per_node)
        scaled |= {k: v for k, v in res.items() if k not in ("CPU", "GPU")}  # custom resources as they are
        top = min(int(spec.get("max_workers", cluster.get("max_workers", 1))), max_workers_per_type)
        types[name] = {"resources": scaled, "node_config": {}, "min_workers": min(int(spec.get("min_workers", 0)), top),
                       "max_workers": top}
    return {
        "cluster_name": f"{cluster.get('cluster_name', 'equiray')}-fake",
        "max_workers": sum(t["max_workers"] for n, t in types.items() if n != head_type),
        "upscaling_speed": float(cluster.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": head_type,
        "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """A head on Ray's fake multi-node provider with ``cluster``'s node types (:func:`fake_cluster_config`), its
    own ports and temp dir, in a process group of its own. ``url``: its dashboard (the Job API ``equiray submit``
    talks to); ``gcs``: the address a driver joins. Use as a context manager; :meth:`alive_nodes` counts nodes."""

    def __init__(self, cluster: Mapping[str, Any], workdir: str | os.PathLike, *, env: Mapping[str, str] | None = None,
                 **scale: Any):
        self.workdir = Path(workdir)
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.dash_port}"
        self.config = fake_cluster_config(cluster, gcs_address=self.gcs, **scale)
        self.env = dict(env or os.environ)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "FakeCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> None:
        from equiray_pipelines import jobs

        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "fake_cluster.yaml"
        cfg_path.write_text(yaml.safe_dump(copy.deepcopy(self.config)))
        temp_dir = Path("/tmp") / f"eqf-{os.getpid()}-{self.gcs_port}"  # short: socket paths have a length limit
        # no token authentication: the fake nodes the autoscaler starts, and drivers on this machine, join without one
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"}
        ray_bin = str(Path(sys.executable).parent / "ray")
        self.log = open(self.workdir / "head.log", "w")
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             "--num-cpus=0", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--ray-client-server-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             f"--autoscaling-config={cfg_path}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.workdir / 'head.log').read_text()[-2000:]}")
            try:
                jobs.client(self.url)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(1)

    def alive_nodes(self) -> list:
        """The cluster's alive nodes (the head among them), from its state API (no driver needed)."""
        from ray.util.state import list_nodes

        return list_nodes(address=self.url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its processes), then SIGKILL to whatever is left of its process
        group; the autoscaler's fake nodes live in it too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
