"""MLflow as its users expect it: experiments in the model-training view, runs that say which code made them,
models with a signature."""
import subprocess
from pathlib import Path

import mlflow
import torch

from equiray.models import create_model
from pipelines import tracking

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


def test_logged_models_carry_their_input_and_output_shapes(mlflow_store):
    tracking.setup("t-sig", mlflow_store)
    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "kwargs": {"width": 4}, "input_shape": [1, 14, 14]}
    with mlflow.start_run():
        uri = tracking.log_model(create_model("small_cnn", in_chans=1, num_classes=10, width=4), spec)
    sig = mlflow.models.get_model_info(uri).signature
    assert sig.inputs.inputs[0].shape == (-1, 1, 14, 14) and sig.outputs.inputs[0].shape == (-1, 10)
    assert tracking.signature({**spec, "input_shape": [3, 32, 32]}).inputs.inputs[0].shape == (-1, 3, 32, 32)
    assert tracking.signature({k: v for k, v in spec.items() if k != "input_shape"}) is None
    model, _ = tracking.load_model(uri)  # and the model still loads back
    assert model(torch.zeros(2, 1, 14, 14)).shape == (2, 10)
