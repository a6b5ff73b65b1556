"""The pretraining pipeline end to end: real Ray Train on a real local Ray, real MLflow SQLite store."""
import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch

from equiray.config import load_config
from equiray.data import read_split
from equiray.train import accuracy, predict
from equiray_pipelines import tracking
from equiray_pipelines.pretrain import PretrainConfig, ScalingConfig, run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pretrained(ray_session, tmp_path_factory):
    """One real pretraining run on scikit-learn's digits, shared by the assertions below."""
    root = tmp_path_factory.mktemp("pretrain")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(PretrainConfig, {
        "data": {"source": "digits", "dir": str(root / "digits")},
        "model": {"name": "small_cnn", "kwargs": {"width": 16}},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.005},
        "scaling": {"cpus_per_worker": 0.5},
        "tracking": {"experiment": "test-pretrain"},
        "storage_path": str(root / "runs"),
    })
    result = run(cfg, report_dir=root / "report")
    yield result, cfg, uri
    mp.undo()


def test_registered_backbone_loads_back_and_gives_the_reported_accuracy(pretrained):
    result, cfg, uri = pretrained
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/equiray-backbone@pretrained").unwrap_python_model().model
    x, y = read_split(result.data_dir, "test")
    acc = accuracy(predict(model, x), y)
    assert acc == pytest.approx(result.accuracy["upright"], abs=1e-6)
    assert acc > 0.5  # it learned something in three epochs
    # the pickle-free path rebuilds the same model from spec + safetensors
    rebuilt, spec = tracking.load_model("models:/equiray-backbone@pretrained")
    assert spec["name"] == "small_cnn" and spec["kwargs"] == {"width": 16}
    torch.testing.assert_close(predict(rebuilt, x[:50]), predict(model, x[:50]))


def test_run_logs_config_curves_and_registry_alias(pretrained):
    result, cfg, uri = pretrained
    client = mlflow.MlflowClient(uri)
    run_ = client.get_run(result.run_id)
    assert run_.data.params["train.epochs"] == "3" and run_.data.params["model.name"] == "small_cnn"
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert [e["epoch"] for e in result.epochs] == [0, 1, 2]
    assert "test_C4_avg_accuracy" in run_.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts and "plots" in artifacts
    mv = client.get_model_version_by_alias("equiray-backbone", "pretrained")
    assert str(mv.version) == result.version
    assert mv.tags["run_id"] == result.run_id and mv.tags["test_accuracy"] == f"{result.accuracy['upright']:.4f}"
    assert run_.data.tags["equiray.pipeline"] == "pretrain" and run_.data.tags["equiray.data"] == "digits"
    assert run_.data.tags["torch.version"]  # which code made it
    assert "mlflow.source.git.commit" in run_.data.tags or not (REPO / ".git").exists()
    # the data it read, as MLflow's dataset inputs (the stage template logs them for every pipeline)
    assert {i.dataset.name for i in run_.inputs.dataset_inputs} == {"digits/train", "digits/val", "digits/test"}
    # rotations are a real shift for a model trained upright
    rot = [v for k, v in result.accuracy.items() if k.startswith("rot:")]
    assert max(rot) < result.accuracy["upright"]


def test_the_registered_backbone_carries_a_temperature_fitted_on_the_validation_split(pretrained):
    """The stage template calibrates every classifier it registers: the version's temperature is the one that
    minimises the NLL of the upright validation images (checked here from logits computed anew), its ECE / NLL
    before and after are tags of the version and metrics of the run, and the result (reused too) carries them."""
    from equiray.calibration import negative_log_likelihood

    result, cfg, uri = pretrained
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version_by_alias("equiray-backbone", "pretrained")
    t = float(mv.tags[tracking.TEMPERATURE_TAG])
    assert mv.tags["calibration.view"] == "upright" and t > 0
    mlflow.set_tracking_uri(uri)
    model, _ = tracking.load_model("models:/equiray-backbone@pretrained")
    xv, yv = read_split(result.data_dir, "val")
    z = predict(model, xv)
    nll = negative_log_likelihood(z, yv, t)
    assert nll <= negative_log_likelihood(z, yv, 1.25 * t) and nll <= negative_log_likelihood(z, yv, 0.8 * t)
    assert nll <= negative_log_likelihood(z, yv, 1.0) + 1e-9  # calibrating never makes the fit set's NLL worse
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["calibration_temperature"] == pytest.approx(t, rel=1e-5)
    for key in ("upright_ece_before", "upright_ece_after", "so2_ece_before", "so2_nll_after"):
        assert float(mv.tags[f"calibration.{key}"]) == pytest.approx(metrics[f"calibration_{key}"], abs=1e-4), key
        assert result.calibration[key] == pytest.approx(metrics[f"calibration_{key}"], abs=1e-4), key
    assert result.calibration["temperature"] == pytest.approx(t, rel=1e-5) and result.calibration["view"] == "upright"


def test_gpu_resources_come_from_config():
    sc = ScalingConfig(num_workers=4, use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2).ray_scaling()
    assert sc.use_gpu and sc.num_workers == 4 and sc.resources_per_worker == {"CPU": 2, "GPU": 0.25}
    cpu = ScalingConfig().ray_scaling()
    assert not cpu.use_gpu and "GPU" not in cpu.resources_per_worker


def test_same_config_reuses_the_registered_model(pretrained, tmp_path):
    result, cfg, uri = pretrained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        again = run(cfg, report_dir=tmp_path, reuse=True)
        assert again.reused and again.version == result.version and again.run_id == result.run_id
        assert again.accuracy == pytest.approx(result.accuracy)
        assert again.calibration == {
            k: pytest.approx(v, abs=1e-4) if isinstance(v, float) else v for k, v in result.calibration.items()}
        assert [round(e["val_accuracy"], 6) for e in again.epochs] == \
            [round(e["val_accuracy"], 6) for e in result.epochs]
        assert {p.rsplit("/", 1)[-1] for p in again.plots} == {"pretrain_curves.png", "pretrain_views.png"}
        # any change to the config is new work: nothing registered matches its hash
        changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4))
        assert tracking.find_version("equiray-backbone", "pretrained",
                                      config_hash_value=tracking.config_hash(changed)) is None


def test_demo_writes_its_report_and_table(pretrained, tmp_path, capsys):
    """The demo over the same (already registered) pretraining config: it reuses the model and reports."""
    from equiray_pipelines.demo import DemoConfig
    from equiray_pipelines.demo import run as run_demo

    result, cfg, uri = pretrained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        out = run_demo(DemoConfig(pretrain=cfg, reuse=True, stages=("pretrain",)), report_dir=tmp_path / "reports")
    report = (tmp_path / "reports" / "demo.md").read_text()
    printed = capsys.readouterr().out
    assert out.pretrain.reused and out.report.endswith("demo.md")
    assert "models:/equiray-backbone@pretrained" in report and "| upright test" in report
    # the summary at the top: what was registered and by which run; the code and the machine behind it
    summary = report.split("## Summary", 1)[1].split("## 1. Data", 1)[0]
    assert f"| `models:/equiray-backbone@pretrained` | {out.pretrain.version} | pretrain `{out.pretrain.run_id}` | " \
        f"{out.pretrain.calibration['temperature']:.2f} (upright) | " in summary
    assert "Environment: equiray " in summary and f"torch {torch.__version__}" in summary
    assert "![pretrain_views](pretrain_views.png)" in report and (tmp_path / "reports" / "pretrain_views.png").is_file()
    assert f"{result.accuracy['upright'] * 100:7.2f}%" in printed and "report:" in printed
    # the demo is one MLflow run of its own: the report as an artifact, tagged with each stage's run and back
    client = mlflow.MlflowClient(uri)
    demo = client.get_run(out.demo_run_id)
    assert demo.info.status == "FINISHED" and demo.data.tags["equiray.run.pretrain"] == result.run_id
    assert client.get_run(result.run_id).data.tags["equiray.demo_run"] == out.demo_run_id
    assert {a.path for a in client.list_artifacts(out.demo_run_id, "report")} >= {"report/demo.md",
                                                                                 "report/pretrain_views.png"}
    assert "minutes_pretrain" in demo.data.metrics and out.demo_run_id in report
    # Ctrl+C in a stage ends the demo's run KILLED (and reaches the CLI, which exits 130)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        mp.setattr("equiray_pipelines.pretrain.run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_demo(DemoConfig(pretrain=cfg, reuse=True, stages=("pretrain",)), report_dir=tmp_path / "again")
    runs = client.search_runs([demo.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]


def test_ctrl_c_mid_training_is_one_line_130_and_a_killed_run(ray_session, tmp_path):
    """SIGINT while Ray Train's workers are in an epoch: `interrupted` and exit 130, no traceback, the stage's MLflow
    run KILLED (not FAILED, not RUNNING), nothing registered."""
    import yaml

    from drivers import driver_env, interrupt_once_training, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({
        "data": {"source": "digits", "dir": str(tmp_path / "digits")},
        "model": {"name": "small_cnn", "kwargs": {"width": 8}}, "train": {"epochs": 500, "batch_size": 64},
        "scaling": {"cpus_per_worker": 0.5}, "tracking": {"experiment": "test-interrupt"},
        "storage_path": str(tmp_path / "runs")}))
    proc = start(["equiray_pipelines.pretrain", "--config", "pretrain.yaml"], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    err = interrupt_once_training(proc, uri, "test-interrupt")
    client = mlflow.MlflowClient(uri)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err, err
    exp = client.get_experiment_by_name("test-interrupt")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags[tracking.END_REASON] for r in runs} == {"interrupted (Ctrl+C)"}
    assert not client.search_registered_models()
