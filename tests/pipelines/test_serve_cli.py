"""`equiray serve` as a user runs it: user mistakes are one `error:` line and exit status 2, before any Ray or
Serve starts (a real temporary MLflow registry; a real subprocess for the exit status, the CLI's `main` in this
process for the rest, since each subprocess spends ~8 s importing torch, Ray and MLflow here)."""
import os
import socket
import subprocess
import sys

import mlflow
import pytest
import torch

from equiray import create_model
from equiray_pipelines import tracking

EQUIRAY = [sys.executable, "-m", "equiray_pipelines.cli"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.setup("test-serve-cli", uri)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4},
            "input_shape": [1, 14, 14]}
    torch.manual_seed(0)
    with mlflow.start_run():
        model_uri = tracking.log_model(create_model("small_cnn", width=4), spec)
    tracking.register(model_uri, "t-student", "champion")
    return root, uri


def serve_cli(*args, registry):
    root, uri = registry
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([*EQUIRAY, "serve", *args], capture_output=True, text=True, cwd=root, env=env, timeout=300)


def serve_main(*args, registry, monkeypatch, capsys):
    """The same command through ``equiray_pipelines.cli.main`` in this process."""
    from equiray_pipelines.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[1])
    code = main(["serve", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_user_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert "serving" not in res.stdout  # nothing started


@pytest.mark.slow
def test_help_explains_the_endpoint():
    res = subprocess.run([*EQUIRAY, "serve", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for word in ("/v1/predict", "--model", "--port", "--serve-config", "--detach", "127.0.0.1", "curl"):
        assert word in res.stdout, word
    assert "serve" in subprocess.run([*EQUIRAY, "--help"], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow  # a subprocess importing torch, Ray and MLflow: 10-50 s on this shared machine
def test_unknown_model_is_one_error_line_and_exit_2(registry):
    assert_user_error(serve_cli("run", "--model", "models:/nope@champion", registry=registry),
                      "no registered model 'nope'", "t-student")


def test_no_store_here_is_one_error_line_and_leaves_no_mlflow_db(tmp_path, monkeypatch, capsys):
    """`serve run` from a directory without the demo's store: one line saying where the store should be, and no
    new empty mlflow.db left behind."""
    from equiray_pipelines.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(["serve", "run", "--model", "models:/equiray-robust@champion"])
    out = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess([], code, out.out, out.err), "no MLflow store at", str(tmp_path / "mlflow.db"), "MLFLOW_TRACKING_URI")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["run", "--model", "models:/t-student@nope"], ["t-student has no alias 'nope'", "@champion"]),
    (["run", "--model", "models:/t-student/7"], ["no version '7'"]),
    (["run", "--model", "equiray-ensemble"], ["models:/NAME@ALIAS"]),
    (["run", "--set", "batch.max_batch_sise=4"], ["unknown config key 'batch.max_batch_sise'", "max_batch_size"]),
    (["run", "--model", "models:/t-student@champion", "--detach"], ["RAY_ADDRESS"]),
    (["run", "--model", "models:/t-student@champion", "--set", "ingress=haproxy"], ["ingress: 'haproxy'", "direct"]),
    (["run", "--model", "models:/t-student@champion", "--port", "8123", "--set", "proxy_port=8123"],
     ["proxy_port: 8123", "the replica's own port"]),
    ([], ["equiray serve run"]),
    (["stop"], ["RAY_ADDRESS"]),
])
def test_user_mistakes(registry, monkeypatch, capsys, args, words):
    assert_user_error(serve_main(*args, registry=registry, monkeypatch=monkeypatch, capsys=capsys), *words)


def test_bad_serve_config_key(registry, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "serve_app.yaml"
    bad.write_text("applications:\n  - name: equiray\n    import_path: equiray_pipelines.serve:build_app\n"
                   "    deployments:\n      - name: EquirayModel\n        num_replicaz: 2\n")
    res = serve_main("run", "--model", "models:/t-student@champion", "--serve-config", str(bad), registry=registry,
                     monkeypatch=monkeypatch, capsys=capsys)
    assert_user_error(res, "num_replicaz", "num_replicas")


def test_port_in_use(registry, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = serve_main("run", "--model", "models:/t-student@champion", "--port", str(port), registry=registry,
                         monkeypatch=monkeypatch, capsys=capsys)
    assert_user_error(res, f"port {port} on 127.0.0.1 is in use")
