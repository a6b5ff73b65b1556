"""Tracking on a cluster: with MLFLOW_TRACKING_URI naming a real `mlflow server` (SQLite backend, local artifact
root, loopback), a pipeline run lands there with its metrics, its artifacts and its registered model."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from equiray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers: its own process group
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        deadline = time.monotonic() + 20
        while True:  # the whole group (uvicorn workers too) is gone
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError("processes of the mlflow server survived SIGTERM")
            time.sleep(0.2)


def test_a_pipeline_run_lands_in_the_server(ray_session, mlflow_server, tmp_path, monkeypatch):
    import mlflow

    from equiray_pipelines import tracking
    from equiray_pipelines.pretrain import PretrainConfig, run

    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = load_config(PretrainConfig, {
        "data": {"source": "digits", "dir": str(tmp_path / "digits")},
        "model": {"name": "small_cnn", "kwargs": {"width": 8}}, "train": {"epochs": 2, "batch_size": 64},
        "scaling": {"cpus_per_worker": 0.5}, "tracking": {"experiment": "test-mlflow-server"},
        "eval": {"corruptions": []}, "storage_path": str(tmp_path / "runs")})
    result = run(cfg, report_dir=tmp_path / "report")

    client = mlflow.MlflowClient(url)
    run_ = client.get_run(result.run_id)
    assert run_.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_accuracy")] == [0, 1]
    assert run_.data.metrics["test_accuracy"] == pytest.approx(result.accuracy["upright"])
    assert run_.data.params["train.epochs"] == "2"
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server ...
    stored = {p.name for p in (root / "artifacts").rglob("*")}
    assert {"config.yaml", "weights.safetensors", "spec.json"} <= stored  # ... into its artifact root
    mv = client.get_model_version_by_alias("equiray-backbone", "pretrained")
    assert mv.run_id == result.run_id
    model, spec = tracking.load_model("models:/equiray-backbone@pretrained")  # back from the server
    assert spec["name"] == "small_cnn" and model(__import__("torch").rand(2, 1, 8, 8)).shape == (2, 10)
