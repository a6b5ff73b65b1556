"""MLflow as its users expect it: experiments in the model-training view, runs that say which code made them,
models that are pyfuncs on raw images, with a signature and pinned requirements."""
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from equiray.models import create_model
from equiray_pipelines import tracking

REPO = Path(__file__).resolve().parents[2]


def test_experiments_open_in_the_model_training_view(mlflow_store):
    exp_id = tracking.setup("t-kind", mlflow_store)
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old = mlflow.create_experiment("t-old")  # as an earlier equiray made them: no kind
    assert "mlflow.experimentKind" not in mlflow.get_experiment(old).tags
    assert tracking.setup("t-old", mlflow_store) == old
    assert mlflow.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_source_tags_name_the_commit_and_the_versions():
    import ray

    tags = tracking.source_tags()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI, a clone); an installed wheel has no commit to name
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["equiray.git.dirty"] in ("true", "false")
    assert tags["torch.version"] == torch.__version__ and tags["ray.version"] == ray.__version__
    assert tags["equiray.version"] and tags["mlflow.version"] == mlflow.__version__


def test_logged_models_are_pyfuncs_on_raw_images_with_a_signature_and_pinned_requirements(mlflow_store):
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    tracking.setup("t-sig", mlflow_store)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4}, "input_shape": [1, 14, 14],
            "classes": [f"c{k}" for k in range(10)]}
    with mlflow.start_run():
        uri = tracking.log_model(create_model("small_cnn", in_chans=1, num_classes=10, width=4), spec)
    info = mlflow.models.get_model_info(uri)
    assert list(info.flavors) == ["python_function"]
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # not unpickled
    sig = info.signature
    assert sig.inputs.input_names() == ["image"] and str(sig.inputs.inputs[0].type) == "DataType.binary"
    assert sig.outputs.input_names() == ["label", "class_index", "confidence", *spec["classes"]]
    assert sig.params.params[0].name == "temperature" and sig.params.params[0].default == 0.0  # 0: the model's own
    assert tracking.signature({k: v for k, v in spec.items() if k != "input_shape"}) is None
    reqs = mlflow.pyfunc.get_model_dependencies(uri)
    pinned = [line.strip() for line in open(reqs) if line.strip() and not line.startswith("mlflow")]
    assert pinned and all("==" in line for line in pinned), pinned  # every requirement pinned
    assert not any(line.startswith("equiray") for line in pinned)  # its code travels with the model instead
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(buf, "PNG")
    answer = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [buf.getvalue()] * 2}))
    assert list(answer.columns[:3]) == ["label", "class_index", "confidence"] and len(answer) == 2
    assert answer[spec["classes"]].sum(axis=1).round(5).tolist() == [1.0, 1.0]
    model, _ = tracking.load_model(uri)  # and the model still loads back
    assert model(torch.zeros(2, 1, 14, 14)).shape == (2, 10)


def test_a_registered_temperature_travels_inside_the_model_to_the_pyfunc(mlflow_store):
    """``mlflow.pyfunc.load_model`` of a version registered with a temperature divides the logits by it without
    being told (the temperature is stored with the model); ``params`` overrides it; a model registered without
    one answers the raw softmax."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from equiray.inference import decode_image, to_model_input

    tracking.setup("t-temp", mlflow_store)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4}, "input_shape": [1, 14, 14]}
    torch.manual_seed(0)
    net = create_model("small_cnn", in_chans=1, num_classes=10, width=4).eval()
    with mlflow.start_run():
        hot = tracking.log_model(net, spec)
        raw = tracking.log_model(net, spec, name="raw")
    tracking.register(hot, "t-temp", "champion", tags={tracking.TEMPERATURE_TAG: "0.25"})
    tracking.register(raw, "t-temp-raw", "champion")
    buf = io.BytesIO()
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(buf, "PNG")
    frame = pd.DataFrame({"image": [buf.getvalue()]})
    with torch.no_grad():
        logits = net(to_model_input([decode_image(buf.getvalue(), in_chans=1)], spec["input_shape"]))[0]

    def probs(uri, **params):
        answer = mlflow.pyfunc.load_model(uri).predict(frame, params=params or None)
        return torch.tensor(answer[[str(k) for k in range(10)]].to_numpy()[0], dtype=torch.float32)

    torch.testing.assert_close(probs("models:/t-temp@champion"), torch.softmax(logits / 0.25, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs("models:/t-temp@champion", temperature=1.0), torch.softmax(logits, -1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(probs("models:/t-temp-raw@champion"), torch.softmax(logits, -1), atol=1e-5, rtol=0)
    assert not torch.allclose(torch.softmax(logits / 0.25, -1), torch.softmax(logits, -1), atol=1e-3)


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_raw_image_as_documented_by_mlflow(mlflow_store, tmp_path):
    """`mlflow models serve` (MLflow's own scoring server) on a logged equiray model: a base64 PNG in a
    dataframe_split, as MLflow documents binary columns, gets labels and probabilities."""
    import base64
    import io
    import os
    import socket
    import subprocess
    import sys
    import time

    import numpy as np
    import requests
    from PIL import Image

    tracking.setup("t-mms", mlflow_store)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4}, "input_shape": [1, 14, 14]}
    with mlflow.start_run():
        tracking.register(tracking.log_model(create_model("small_cnn", width=4), spec), "t-mms", "champion")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/t-mms@champion",
                             "--env-manager", "local", "-p", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 120, np.uint8)).save(buf, "PNG")
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]}}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                res = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=30)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(30)
    assert res.status_code == 200, res.text
    (answer,) = res.json()["predictions"]
    assert answer["label"] == str(answer["class_index"]) and 0 < answer["confidence"] <= 1
    assert sum(answer[str(k)] for k in range(10)) == pytest.approx(1.0, abs=1e-5)


def test_a_stage_lists_its_dataset_splits_as_the_runs_inputs(mlflow_store, tmp_path):
    from equiray.data import SourceOptions, prepare

    prepare("digits", tmp_path / "d", options=SourceOptions(seed=0))
    prepare("digits", tmp_path / "e", options=SourceOptions(seed=1))  # the same source, split another way
    tracking.setup("t-inputs", mlflow_store)
    with mlflow.start_run() as run:
        assert tracking.log_data_inputs(tmp_path / "d", limits={"train": 100, "test": None}) == 3
    with mlflow.start_run() as other:
        assert tracking.log_data_inputs(tmp_path / "e") == 3
        assert tracking.log_data_inputs(tmp_path / "nothing-here") == 0
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"digits/train", "digits/val", "digits/test"}
    tags = {name: {t.key: t.value for t in i.tags} for name, i in by_name.items()}
    assert [tags[f"digits/{s}"]["mlflow.data.context"] for s in ("train", "val", "test")] == \
        ["training", "validation", "evaluation"]
    assert tags["digits/train"]["equiray.rows_used"] == "100" and int(tags["digits/train"]["equiray.rows"]) > 100
    assert tags["digits/test"]["equiray.rows_used"] == tags["digits/test"]["equiray.rows"]
    train = by_name["digits/train"].dataset
    assert train.source_type == "local" and str(tmp_path / "d" / "train") in train.source
    assert "image" in train.schema and "label" in train.schema
    digests = {i.dataset.digest for i in mlflow.get_run(other.info.run_id).inputs.dataset_inputs}
    assert len(digests) == 1 and digests != {train.digest}  # another split of the data is another dataset
