"""The CLI as a user runs it: a real subprocess, real exit codes, no tracebacks for user mistakes."""
import subprocess
import sys
from pathlib import Path


EQUIRAY = [sys.executable, "-m", "pipelines.cli"]


def run(*args, cwd=None):
    return subprocess.run([*EQUIRAY, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_every_command():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("demo", "pretrain", "ensemble", "distill", "canon", "tune", "nfn", "data", "models"):
        assert cmd in res.stdout
    for sub in (["pretrain", "--help"], ["data", "prepare", "--help"], ["demo", "--help"],
                ["ensemble", "train", "--help"], ["ensemble", "eval", "--help"], ["distill", "--help"],
                ["canon", "sweep", "--help"], ["tune", "ftp", "--help"], ["nfn", "zoo", "--help"],
                ["nfn", "train", "--help"]):
        res = run(*sub)
        assert res.returncode == 0 and "--" in res.stdout, sub
    assert "--set KEY=VALUE" in run("pretrain", "--help").stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "equiray"
    assert script.exists(), "pip install -e . should have installed the `equiray` console script"
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout.startswith("equiray ")


def test_unknown_config_key_is_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    res = run("pretrain", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    assert "error: unknown config key 'train.epochz'" in res.stderr and "did you mean 'epochs'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started, nothing written
    res = run("pretrain", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr


def test_data_prepare_and_info(tmp_path):
    res = run("data", "prepare", "digits", "--out", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    assert "train 1347" in res.stdout
    res = run("data", "info", str(tmp_path / "d"))
    assert res.returncode == 0 and '"num_classes": 10' in res.stdout and "image: binary" in res.stdout


def test_data_prepare_bad_source_leaves_nothing(tmp_path):
    res = run("data", "prepare", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    res = run("data", "prepare", "imagenet", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "unknown data source" in res.stderr


def test_models_list():
    res = run("models", "list")
    assert res.returncode == 0 and "small_cnn" in res.stdout.split() and "resnet8" in res.stdout.split()


def test_pipeline_modules_are_job_entrypoints():
    res = subprocess.run([sys.executable, "-m", "pipelines.ensemble", "eval", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--run-id" in res.stdout


def test_canon_without_action_and_bad_grid_are_clear(tmp_path):
    res = run("canon", cwd=tmp_path)
    assert res.returncode == 2 and "choose an action: equiray canon sweep" in res.stderr
    res = run("canon", "sweep", "--set", "grid.kind=[magic]", cwd=tmp_path)
    assert res.returncode == 2 and "grid.kind: unknown canonicalizer 'magic'" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_ensemble_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("settings:\n  - {name: a, support: diagonal}\n")
    res = run("ensemble", "train", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2 and "settings[0].support: 'diagonal' is not one of" in res.stderr
    assert "Traceback" not in res.stderr


def test_nfn_train_mistakes_are_one_clear_line(tmp_path):
    res = run("nfn", "train", "--set", f"zoo={tmp_path / 'nothing'}", cwd=tmp_path)
    assert res.returncode == 2 and "no zoo at" in res.stderr and "Traceback" not in res.stderr
    res = run("nfn", "train", "--set", "metanetworks={np: {}}", cwd=tmp_path)
    assert res.returncode == 2 and "metanetworks: unknown ['np']" in res.stderr
    res = run("ensemble", "eval", "--select-by", "best", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice" in res.stderr
