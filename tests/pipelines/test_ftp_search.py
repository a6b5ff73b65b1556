"""The robust fine-tuning search end to end on the shared local Ray: real Ray Tune trials with ASHA and a searcher,
nested MLflow runs, a champion in the registry, and an interrupted search resumed without re-running finished
trials."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from equiray.config import load_config
from equiray.errors import ConfigError, EquirayError
from equiray_pipelines import tracking
from equiray_pipelines.ftp import FTPConfig, load_task, run_tune

from drivers import driver_env
from test_canon_sweep import register_backbone

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small_config(root: Path, **over) -> dict:
    base = {
        "backbone": "models:/test-backbone@pretrained",
        "data": {"source": "digits", "dir": str(root / "digits")},
        "task": {"target_view": "contrast:3", "train_images": 400, "val_images": 150, "test_images": 200,
                 "ood_views": ["upright", "noise:3"], "tpgm_holdout": 64},
        "search": {"num_samples": 4, "searcher": "optuna", "scheduler": "asha", "grace_period": 1},
        "train": {"epochs": 3, "batch_size": 16},
        "space": {"lr": [0.005, 0.02]},  # a new head on 400 images: a higher learning rate than the default range
        "resources": {"cpus_per_trial": 0.5},
        "tracking": {"experiment": "test-ftp"},
        "storage_path": str(root / "runs"),
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("ftp")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    register_backbone(root / "digits", uri)
    cfg = load_config(FTPConfig, small_config(root))
    result = run_tune(cfg, report_dir=root / "report")
    yield cfg, result, uri, root
    mp.undo()


def test_every_method_is_tried_and_every_trial_is_a_nested_run(searched):
    cfg, result, uri, root = searched
    rows = result.rows
    assert len(rows) == 4 and {r.method for r in rows} == {"finetune", "l2sp", "ftp", "tpgm"}
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-ftp").experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(r.run_id for r in rows)
    for run in children:
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert 1 <= len(history) <= cfg.train.epochs
        if len(history) == cfg.train.epochs:
            assert run.info.status == "FINISHED"
        else:  # stopped by ASHA
            assert run.info.status == "FINISHED" and "ASHA" in run.data.tags["equiray.stopped_early"]
        assert {"method", "lr", "weight_decay"} <= set(run.data.params)
        assert "ood_mean_accuracy" in run.data.metrics and "ood/noise_3" in run.data.metrics
    assert (root / "report" / "ftp_trials.png").stat().st_size > 10_000
    assert "| pretrained backbone, no fine-tuning |" in result.table
    assert result.plots == (result.plot,) and result.verdict and result.pipeline == "ftp"
    # one trial per method: the verdict says its differences are illustrative and where the evidence is
    assert any(line.startswith("- Illustrative: 1-1 trial(s) per method") and "bench_ftp_accuracy" in line
               for line in result.verdict)


def test_champion_is_the_best_by_id_validation_and_loads_back(searched):
    cfg, result, uri, root = searched
    best = max(result.rows, key=lambda r: r.val_accuracy)
    assert result.champion.run_id == best.run_id
    assert result.registered == "models:/equiray-ftp@champion" and result.version and not result.reused
    mlflow.set_tracking_uri(uri)
    model, spec = tracking.load_model("models:/equiray-ftp@champion")
    task = load_task(cfg)
    xt, yt = task.test
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
    assert acc == pytest.approx(best.id_test_accuracy, abs=1e-6)
    # calibrated on the in-distribution target domain it was fine-tuned and selected on
    mv = mlflow.MlflowClient(uri).get_model_version_by_alias("equiray-ftp", "champion")
    assert mv.tags["calibration.view"] == result.calibration["view"] == cfg.task.target_view


def test_fine_tuning_learned_the_target_domain(searched):
    """The best trial's new head learned the target domain (its ID validation accuracy rose well above chance over
    the epochs): fails if trials did not actually train, or evaluated the wrong views."""
    cfg, result, uri, root = searched
    best = max(result.rows, key=lambda r: r.val_accuracy)
    curve = [m.value for m in sorted(mlflow.MlflowClient(uri).get_metric_history(best.run_id, "val_accuracy"),
                                     key=lambda m: m.step)]
    assert best.val_accuracy > 0.2 and curve[-1] > curve[0] + 0.05, curve


def test_the_same_config_again_reuses_the_champion(searched):
    """`reuse`: the registered champion made by this same config is returned, read back from the search's run
    (no Ray, no trial), with the same rows, table and champion."""
    cfg, result, uri, root = searched
    again = run_tune(cfg, report_dir=root / "again", reuse=True)
    assert again.reused and again.version == result.version and again.run_id == result.run_id
    assert again.rows == result.rows and again.champion == result.champion and again.table == result.table
    assert again.pretrained == result.pretrained and again.verdict == result.verdict
    assert again.run_name == result.run_name and (root / "again" / "ftp_trials.png").exists()


def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path, monkeypatch):
    """Ctrl+C (SIGINT) a search running as its own driver on the shared Ray once a trial has finished;
    `--resume` then completes it: every trial ends once, the finished one is not trained again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    register_backbone(tmp_path / "digits", uri)
    cfg_file = tmp_path / "ftp.yaml"
    import yaml

    raw = small_config(tmp_path, search={"num_samples": 3, "searcher": "random", "scheduler": "none"},
                       resources={"cpus_per_trial": 0.5, "max_concurrent": 1}, train={"epochs": 6, "batch_size": 16})
    raw["name"] = "interrupted"
    cfg_file.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "equiray_pipelines.ftp", "tune", "--config", str(cfg_file)],
                            cwd=tmp_path, env=driver_env(ray_session, uri), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    client = mlflow.MlflowClient(uri)
    deadline = time.time() + 240
    finished = []
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("test-ftp")
        if exp:
            # the search's own run stays RUNNING until the end: a FINISHED one is a trial that completed
            finished = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' "
                                          "and tags.`equiray.pipeline` = 'ftp'")
            if finished:
                break
        time.sleep(0.3)
    assert finished, "no trial finished before the deadline: " + (proc.stdout.read() if proc.poll() else "")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out  # interrupted (Ctrl+C), not a mistake (2) or a crash (1)
    last = out.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "--resume" in last and "Traceback" not in out, out
    runs = client.search_runs([client.get_experiment_by_name("test-ftp").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"], "the search's own run ends KILLED on Ctrl+C"
    assert not [r for r in runs if r.info.status == "RUNNING"], "a trial stopped mid-training is left RUNNING"
    first = finished[0]
    epochs_before = len(client.get_metric_history(first.info.run_id, "val_accuracy"))
    assert epochs_before == 6

    cfg = load_config(FTPConfig, {**raw, "resume": True})
    resumed_at = time.time() * 1000
    result = run_tune(cfg)
    assert len(result.rows) == 3
    assert all(r.epochs == 6 for r in result.rows)
    for r in result.rows:  # one MLflow run per trial, each epoch logged exactly once
        steps = [m.step for m in client.get_metric_history(r.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(6)), (r.method, steps)
    # the trial that had finished was not trained again: all its epochs were logged before the resume
    assert all(m.timestamp < resumed_at for m in client.get_metric_history(first.info.run_id, "val_accuracy"))
    children = client.search_runs([client.get_experiment_by_name("test-ftp").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 3


def test_config_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="space.methods"):
        load_config(FTPConfig, {"space": {"methods": ["sam"]}})
    with pytest.raises(ConfigError, match="task"):
        load_config(FTPConfig, {"task": {"target_view": "sepia:2"}})
    with pytest.raises(ConfigError, match="space.lr"):
        load_config(FTPConfig, {"space": {"lr": [0.1, 0.01]}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    register_backbone(tmp_path / "digits", uri)
    cfg = load_config(FTPConfig, {**small_config(tmp_path), "resume": True, "name": "never-ran"})
    with pytest.raises(EquirayError, match="nothing to resume"):
        run_tune(cfg)


def test_the_verdict_calls_a_search_of_few_trials_per_method_illustrative():
    """Fewer than 8 trials of some method: one line says the differences are illustrative; 8 of each: none."""
    from equiray_pipelines.ftp.report import verdict
    from equiray_pipelines.ftp.result import TrialRow

    def row(method, i):
        knobs = {"finetune": {}, "ftp": {"k": 0.5, "mu": 0.1, "gamma_init": 1e-6}}[method]
        return TrialRow(method=method, lr=1e-3 * (i + 1), weight_decay=1e-4, knobs=knobs, run_id=f"{method}{i}",
                        epochs=6, val_accuracy=0.8 + i / 100, id_test_accuracy=0.8, ood_mean_accuracy=0.6,
                        ood={"noise:3": 0.6}, epoch_seconds=1.0)

    pretrained = {"noise:3": 0.7}
    few = verdict([row("finetune", i) for i in range(3)] + [row("ftp", i) for i in range(8)], pretrained)
    assert sum(line.startswith("- Illustrative: 3-8 trial(s) per method") for line in few) == 1, few
    enough = verdict([row(m, i) for m in ("finetune", "ftp") for i in range(8)], pretrained)
    assert not any("Illustrative" in line for line in enough) and len(enough) == 2, enough


def test_optunas_own_lines_are_off_unless_verbose():
    """Optuna announces every study at INFO ("A new study created in memory"): off by default, on with -v."""
    import logging

    import optuna

    from equiray_pipelines.ftp.stage import _searcher

    optuna.logging.set_verbosity(optuna.logging.INFO)
    _searcher(FTPConfig())
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    optuna.logging.set_verbosity(optuna.logging.INFO)
    pipelines_log = logging.getLogger("equiray_pipelines")
    level = pipelines_log.level
    pipelines_log.setLevel(logging.DEBUG)  # what `equiray -v` sets
    try:
        _searcher(FTPConfig())
    finally:
        pipelines_log.setLevel(level)
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
