"""Shared fixtures: one Ray instance per test session, a fresh SQLite MLflow store per test that asks for one."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Exact-vs-approximate tolerances per dtype (interpolated rotations are approximate by nature).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _start_shared_ray():
    import ray

    from equiray_pipelines._ray import local_ray_env

    if not ray.is_initialized():
        local_ray_env()  # as every local Ray equiray starts: Serve with direct ingress
        ray.init(address="local", num_cpus=2, num_gpus=0, dashboard_host="127.0.0.1", logging_level="WARNING")
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance shared by every test that needs one (Ray takes ~20 s to start here)."""
    ray = _start_shared_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sole_ray():
    """For a module that starts a Ray instance of its own (a head, a simulated cluster): the shared instance, if
    one is up, stops first and comes back afterwards. Two Ray instances on a 2-core machine starve each other:
    the second one's GCS timed out at startup in CI ("The current node timed out during startup")."""
    import ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    yield
    if was_up:
        _start_shared_ray()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a temporary directory, selected through MLFLOW_TRACKING_URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
