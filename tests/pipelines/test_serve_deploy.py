"""configs/serve_app.yaml deployed the way `serve deploy` does it (Serve's declarative API: the controller
builds the app from `import_path` and `args` in a task of its own), on the shared local Ray."""
import socket

import mlflow
import pytest
import requests
import torch
import yaml

from equiray import create_model
from equiray_pipelines import tracking

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_serve_app_yaml_deploys_declaratively(ray_session, tmp_path, monkeypatch):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup("test-serve-deploy", uri)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4}, "input_shape": [1, 14, 14]}
    torch.manual_seed(0)
    with mlflow.start_run():
        tracking.register(tracking.log_model(create_model("small_cnn", width=4), spec), "t-decl", "champion")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = yaml.safe_load(open("configs/serve_app.yaml"))
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"]["model"] = "models:/t-decl@champion"  # the shipped file, pointed at this test's registry
    app["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    serve.start(http_options=raw["http_options"])
    try:
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(raw), _blocking=True)
        base = f"http://127.0.0.1:{port}"
        res = requests.post(base + "/v1/predict", json={"instances": [torch.rand(28, 28).tolist()]}, timeout=60)
        assert res.status_code == 200 and res.json()["model"] == "t-decl", res.text
        info = requests.get(base + "/v1/model", timeout=30).json()
        assert info["version"] == "1" and info["batching"]["max_batch_size"] == 32
        status = serve.status().applications["equiray"].deployments["EquirayModel"]
        assert status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) >= 1
    finally:
        serve.shutdown()
