"""The CLI as a user runs it: a real subprocess, real exit codes, no tracebacks for user mistakes."""
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


EQUIRAY = [sys.executable, "-m", "equiray_pipelines.cli"]


def run(*args, cwd=None):
    return subprocess.run([*EQUIRAY, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_every_command():
    res = run("--help")
    assert res.returncode == 0
    listing = res.stdout.split("  COMMAND\n", 1)[1].split("\n\n")[0]  # "    NAME  help" lines
    listed = [line.split()[0] for line in listing.splitlines() if line.startswith("    ") and line[4] != " "]
    for cmd in ("demo", "pretrain", "ensemble", "distill", "canon", "ftp", "nfn", "serve", "data", "submit", "jobs",
                "models"):
        assert cmd in listed, listed
    assert "tune" not in listed  # the old spelling of `ftp tune` is accepted, not advertised
    assert "equiray ftp tune --config" in res.stdout
    subs = (("pretrain",), ("data", "prepare"), ("demo",), ("ensemble", "train"), ("ensemble", "eval"), ("distill",),
            ("canon", "sweep"), ("ftp", "tune"), ("tune", "ftp"), ("nfn", "zoo"), ("nfn", "train"))
    with ThreadPoolExecutor(2) as pool:  # two processes at a time: each mostly imports torch
        helps = dict(zip(subs, pool.map(lambda sub: run(*sub, "--help"), subs)))
    for sub, res in helps.items():
        assert res.returncode == 0 and "--" in res.stdout, sub
    assert "--set KEY=VALUE" in helps["pretrain",].stdout
    assert "--resume" in helps["ftp", "tune"].stdout and "--resume" in helps["tune", "ftp"].stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "equiray"
    assert script.exists(), "pip install -e . should have installed the `equiray` console script"
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout.startswith("equiray ")


def test_ctrl_c_while_the_command_loads_is_one_line_and_130():
    """The console script imports torch, Ray and MLflow for a few seconds before the command runs: Ctrl+C then
    ends as it does during a command, not with the import machinery's traceback."""
    script = Path(sys.executable).parent / "equiray"
    proc = subprocess.Popen([str(script), "models", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)  # the interpreter is up, the imports are not done (they take seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["interrupted"], err


def test_completion_script_completes_commands_actions_options_and_files(tmp_path):
    res = run("completion", "bash")
    assert res.returncode == 0
    (tmp_path / "equiray.bash").write_text(res.stdout)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain-big.yaml").write_text("{}")
    probe = """source equiray.bash
comp() { COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
         _shtab_equiray; echo "${COMPREPLY[*]}"; }
comp equiray pre
comp equiray canon ""
comp equiray serve ""
comp equiray pretrain --co
comp equiray pretrain --config configs/pre
comp equiray models export --format ""
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.splitlines() == ["pretrain", "sweep", "run stop", "--config", "configs/pretrain-big.yaml",
                                       "onnx torchscript"], out.stderr
    zsh = run("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef equiray")
    assert run("completion", "fish").returncode == 2  # not a shell it writes for: argparse's usage error


def test_python_dash_m_and_short_version_flag():
    out = subprocess.run([sys.executable, "-m", "equiray", "-V"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("equiray ")
    helped = subprocess.run([sys.executable, "-m", "equiray", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: equiray" in helped.stdout


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
    assert "test 270 rows in 1 shard" in res.stdout  # every split's shards are checked
    shard = tmp_path / "d" / "val" / "part-00000.parquet"
    shard.write_bytes(b"PAR1 not really")
    res = run("data", "info", str(tmp_path / "d"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("error: ")] == [
        line for line in res.stderr.splitlines() if line.strip()] and str(shard) in res.stderr


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
    res = subprocess.run([sys.executable, "-m", "equiray_pipelines.serve", "run", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--serve-config" in res.stdout
    res = subprocess.run([sys.executable, "-m", "equiray_pipelines.ensemble", "eval", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--run-id" in res.stdout


def test_every_catalog_pipeline_is_a_command_named_after_its_module_function_and_config(capsys):
    """`equiray ftp tune` is equiray_pipelines.ftp.run_tune with FTPConfig: the first word names the module, the action
    the function (`run_ACTION`, or `run`), and the config class lives beside it."""
    import pytest

    from equiray_pipelines.catalog import ALIASES, CATALOG, PIPELINES
    from equiray_pipelines.cli import main

    assert [p.command for p in CATALOG] == ["demo", "pretrain", "ensemble train", "ensemble eval", "distill",
                                            "canon sweep", "ftp tune", "nfn zoo", "nfn train", "robust", "serve run"]
    for p in CATALOG:
        first, *action = p.words
        assert p.run.__module__.split(".")[:2] == ["equiray_pipelines", first], p.command
        assert p.run.__name__ in ("run", *(f"run_{a}" for a in action)), p.command
        assert p.config.__module__.split(".")[:2] == ["equiray_pipelines", first], p.command
        assert PIPELINES.get(p.command) is p
        with pytest.raises(SystemExit) as exit_:
            main([*p.words, "--help"])
        assert exit_.value.code == 0 and p.description[:30] in " ".join(capsys.readouterr().out.split()), p.command
    assert all(command in PIPELINES for command in ALIASES.values())


def test_shipped_configs_load_with_their_pipelines_config_class():
    from equiray_pipelines.catalog import CATALOG

    root = Path(__file__).resolve().parents[2]
    for p in CATALOG:
        assert p.example_config, p.command
        assert isinstance(p.load_config(root / p.example_config), p.config), p.command


def test_the_cli_is_a_leaf():
    """Nothing imports equiray_pipelines.cli but the entry points (`python -m`, the console script); the CLI resolves no module names
    from strings."""
    import ast

    root = Path(__file__).resolve().parents[2]
    importers = []
    for path in sorted((root / "pipelines").rglob("*.py")) + sorted((root / "equiray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "equiray_pipelines.cli" or n.startswith("equiray_pipelines.cli.") for n in names):
                importers.append(path.relative_to(root))
    assert all(p.name in ("__main__.py", "_entry.py") for p in importers), importers
    assert "importlib" not in (root / "pipelines" / "cli.py").read_text()


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


def test_a_pipeline_result_is_printed_as_its_table_verdict_plots_and_summary(capsys):
    """What `_cmd_pipeline` prints for a stage's typed result; a pipeline that prints its own output (serve run,
    demo) gets nothing added. The options of the catalog entry become overrides and keyword arguments."""
    import dataclasses
    import json

    from equiray_pipelines.catalog import Option, Pipeline
    from equiray_pipelines.cli import _cmd_pipeline, build_parser
    from equiray_pipelines.stage import StageResult

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        epochs: int = 1
        resume: bool = False

    seen = {}

    def fake_run(cfg, *, report_dir=None, run_id=None):
        seen.update(cfg=cfg, report_dir=report_dir, run_id=run_id)
        return StageResult(pipeline="fake", run_id="r1", tracking_uri="sqlite:///x.db", registered="models:/m@a",
                           table="| a | b |\n|---|---|\n| 1 | 2 |", verdict=("first", "second"), plots=("p.png",))

    p = Pipeline("pretrain", Cfg, fake_run, "fake", options=(
        Option("--resume", "r", sets="resume", value="true"), Option("--run-id", "i", kwarg="run_id")))
    args = build_parser().parse_args(["pretrain", "--set", "epochs=3", "--report-dir", "out"])
    args.resume, args.run_id = True, "abc"
    assert _cmd_pipeline(p, args) == 0
    assert seen == {"cfg": Cfg(epochs=3, resume=True), "report_dir": "out", "run_id": "abc"}
    out = capsys.readouterr().out
    table, rest = out.split("\nfirst\nsecond\nplot: p.png\n")
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |"
    summary = json.loads(rest)
    assert summary["run_id"] == "r1" and summary["registered"] == "models:/m@a" and summary["plots"] == ["p.png"]
    assert "table" not in summary and "verdict" not in summary
    assert _cmd_pipeline(dataclasses.replace(p, prints=False), args) == 0
    assert capsys.readouterr().out == ""


def test_print_config_shows_the_resolved_config_and_runs_nothing(capsys):
    """``--print-config`` prints defaults + ``--set`` + the command's own options as YAML that loads back into the
    same config, and starts nothing (no Ray, no MLflow run)."""
    import yaml

    from equiray.config import load_config
    from equiray_pipelines.canon import CanonConfig
    from equiray_pipelines.cli import main

    assert main(["canon", "sweep", "--print-config", "--set", "curve_step=5", "--set", "grid.pose=[angle]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(CanonConfig, printed)
    assert cfg.curve_step == 5.0 and cfg.grid.pose == ("angle",) and cfg == load_config(
        CanonConfig, {"curve_step": 5, "grid": {"pose": ["angle"]}})
    assert main(["ftp", "tune", "--print-config", "--resume"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["resume"] is True
