"""A pipeline run as its own driver process on the session's shared Ray, as a user's command runs: the
environment it needs, and Ctrl+C once it is training (the interruption tests of each stage)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[2]


def driver_env(ray_session, tracking_uri: str) -> dict[str, str]:
    """The environment of a driver that joins the shared Ray and logs to ``tracking_uri``."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT)}


def start(args: list[str], *, cwd, env: dict[str, str]) -> subprocess.Popen:
    """``python -m ARGS`` (e.g. ``pipelines.pretrain --config f.yaml``), its output captured as text."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def interrupt_once_training(proc: subprocess.Popen, tracking_uri: str, experiment: str, *,
                            timeout: float = 240) -> str:
    """Wait until a run of ``experiment`` has logged ``train_loss``, send SIGINT, wait for the end; returns stderr."""
    client = mlflow.MlflowClient(tracking_uri)
    deadline, training = time.time() + timeout, False
    while time.time() < deadline and proc.poll() is None and not training:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        training = any(client.get_metric_history(r.info.run_id, "train_loss") for r in runs)
        time.sleep(0.5)
    assert training, proc.communicate()[1] if proc.poll() is not None else "no epoch before the deadline"
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)[1]
