"""Job specs (jobs/*.yaml): every one loads, every config it runs exists and loads with its pipeline's config
class (the cluster-scale configs are valid); mistakes in a spec are one clear error; no cluster is one error line."""
import os
import tomllib
from pathlib import Path

import pytest
import yaml

from equiray.errors import ConfigError, EquirayError
from equiray_pipelines import jobs
from equiray_pipelines.catalog import PIPELINES
from equiray_pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "jobs").glob("*.yaml"))
EXPECTED = {"pretrain", "ensemble train", "ensemble eval", "distill", "canon sweep", "ftp tune", "nfn zoo",
            "nfn train", "serve run", jobs.SERVE}


def test_there_is_a_spec_for_every_pipeline():
    covered = {c.pipeline for f in SPECS for c in jobs.pipeline_commands(jobs.load_job_spec(f).entrypoint)}
    assert EXPECTED <= covered


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_and_the_cluster_scale_configs_it_runs_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = jobs.load_job_spec(path)
    env = jobs.runtime_env(spec)  # working dir, configs and requirements exist; ${VAR}s expand
    assert Path(env["working_dir"]) == REPO
    assert "MLFLOW_TRACKING_URI" not in env["env_vars"]  # the cluster's own (cluster.yaml), unless --env
    assert "torch>=2.4" in env["pip"]  # equiray's dependencies, from pyproject.toml
    commands = jobs.pipeline_commands(spec.entrypoint)
    assert commands, f"{path.name} runs no equiray pipeline"
    for cmd in commands:
        assert cmd.config and cmd.config.startswith("jobs/configs/"), "a job runs a cluster-scale config"
        assert (REPO / cmd.config).is_file()
        if cmd.pipeline == jobs.SERVE:
            from ray.serve.schema import ServeDeploySchema

            serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load((REPO / cmd.config).read_text()))
            assert serve_cfg.http_options.host == "127.0.0.1"  # reached through port forwarding only
            continue
        assert cmd.pipeline in PIPELINES, cmd
        cfg = PIPELINES.get(cmd.pipeline).load_config(cmd.config, list(cmd.overrides))
        scaling = getattr(cfg, "scaling", None)
        if scaling is not None:
            assert scaling.use_gpu, f"{cmd.config} is a GPU-cluster config"


def test_ensemble_job_is_ten_thousand_members():
    from equiray.config import load_config
    from equiray_pipelines.ensemble import EnsembleConfig

    cfg = load_config(EnsembleConfig, REPO / "jobs/configs/ensemble.yaml")
    assert cfg.members * len(cfg.settings) == 10_000
    assert cfg.scaling.num_workers * cfg.scaling.gpus_per_worker == 8  # GPUs: cluster.yaml's gpu_1x max_workers


def test_pip_requirements_are_the_projects(tmp_path):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert jobs._requirements("pyproject.toml", REPO) == deps  # what the specs say: no copy to keep in step
    (tmp_path / "req.txt").write_text("# extras\nfoo>=1\n\nbar\n")
    assert jobs._requirements(str(tmp_path / "req.txt"), ".") == ["foo>=1", "bar"]
    assert jobs._requirements(("baz",), ".") == ["baz"]
    with pytest.raises(ConfigError, match="runtime_env.pip: 'nope.txt' not found"):
        jobs._requirements("nope.txt", tmp_path)


def test_entrypoints_are_parsed_into_pipelines_and_configs():
    cmds = jobs.pipeline_commands("python -m equiray_pipelines.ensemble train --config a.yaml --set train.epochs=2 && "
                                  "python -m equiray_pipelines.ftp tune --config=b.yaml --resume; "
                                  "equiray canon sweep -c c.yaml; "
                                  "echo done; serve deploy d.yaml; "
                                  "python -m equiray_pipelines.serve run --serve-config e.yaml")
    assert [(c.pipeline, c.config, c.overrides) for c in cmds] == [
        ("ensemble train", "a.yaml", ("train.epochs=2",)), ("ftp tune", "b.yaml", ()), ("canon sweep", "c.yaml", ()),
        (jobs.SERVE, "d.yaml", ()), ("serve run", None, ()), (jobs.SERVE, "e.yaml", ())]
    # the old spelling `equiray tune ftp` is the same command; `python -m equiray_pipelines.cli` is `equiray`
    cmds = jobs.pipeline_commands("equiray tune ftp -c f.yaml; python -m equiray_pipelines.cli nfn zoo --config g.yaml")
    assert [(c.pipeline, c.config) for c in cmds] == [("ftp tune", "f.yaml"), ("nfn zoo", "g.yaml")]
    with pytest.raises(ConfigError, match="'ensemble trian' is not an equiray pipeline"):
        jobs.pipeline_commands("python -m equiray_pipelines.ensemble trian --config a.yaml")
    # `python -m equiray_pipelines.X` is `equiray X`
    with pytest.raises(ConfigError, match="'ftp' is not an equiray pipeline"):
        jobs.pipeline_commands("python -m equiray_pipelines.ftp --config b.yaml")
    # the package's old name, which would import whatever `pipelines` a node has installed, is caught before submitting
    with pytest.raises(ConfigError, match=r"`python -m pipelines.ftp`: the package is `equiray_pipelines` now; write "
                                          r"`python -m equiray_pipelines.ftp` \(or `equiray ftp`\)"):
        jobs.pipeline_commands("python -m pipelines.ftp tune --config b.yaml")


def test_a_checkout_sends_its_pipelines_folder_under_the_package_name(tmp_path):
    """`equiray submit` from a checkout: the job imports `equiray_pipelines` from the code submitted (a copy of
    pipelines/ under that name in py_modules; the folder itself not uploaded twice); the copy is gone afterwards."""
    renv = {"working_dir": str(REPO), "excludes": ["data/"], "py_modules": ["/somewhere/extra"]}
    with jobs._pipelines_as_package(renv) as sent:
        staged = Path(sent["py_modules"][-1])
        assert sent["py_modules"][0] == "/somewhere/extra" and staged.name == "equiray_pipelines"
        assert sent["excludes"] == ["data/", "/pipelines/"] and sent["working_dir"] == str(REPO)
        copied = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*.py"))
        assert copied == sorted(p.relative_to(REPO / "pipelines").as_posix() for p in (REPO / "pipelines").rglob("*.py"))
        assert not list(staged.rglob("__pycache__"))
        assert (staged / "jobs.py").read_text() == (REPO / "pipelines" / "jobs.py").read_text()
    assert not staged.exists()
    other = {"working_dir": str(tmp_path)}  # a working dir that is not a checkout is sent as it is
    with jobs._pipelines_as_package(other) as sent:
        assert sent == other


def test_python_dash_m_of_a_pipeline_package_is_equiray_with_its_name():
    """What pipeline_commands assumes: ``python -m equiray_pipelines.X ARGS`` runs ``equiray X ARGS``, so a package's
    ``__main__`` passes its own name and the arguments on, as written."""
    checked = []
    for first in sorted({p.words[0] for _, p in PIPELINES.items()}):
        main_py = REPO / "pipelines" / first / "__main__.py"
        if main_py.is_file():  # (a module not yet a package has no __main__.py)
            assert f'main(["{first}", *sys.argv[1:]])' in main_py.read_text(), main_py
            checked.append(first)
    assert "serve" in checked


def _write(tmp_path, data, name="job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_spec_mistakes_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="job spec 'nowhere.yaml' not found"):
        jobs.load_job_spec("nowhere.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'entrypoint_num_gpu' \(did you mean 'entrypoint_num_gpus'"):
        jobs.load_job_spec(_write(tmp_path, {"entrypoint": "python x.py", "entrypoint_num_gpu": 1}))
    with pytest.raises(ConfigError, match=r"unknown config key 'runtime_env.conda'"):
        jobs.load_job_spec(_write(tmp_path, {"entrypoint": "python x.py", "runtime_env": {"conda": "env"}}))
    spec = jobs.load_job_spec(_write(tmp_path, {"entrypoint": "python -m equiray_pipelines.pretrain --config jobs/configs/nope.yaml"}))
    with pytest.raises(ConfigError, match="config 'jobs/configs/nope.yaml' does not exist"):
        jobs.runtime_env(spec)
    spec = jobs.load_job_spec(_write(tmp_path, {"entrypoint": "python x.py", "runtime_env": {"working_dir": "no/dir"}}))
    with pytest.raises(ConfigError, match="working_dir 'no/dir': no such directory"):
        jobs.runtime_env(spec)
    spec = jobs.load_job_spec(_write(tmp_path, {"entrypoint": "python x.py", "runtime_env": {
        "env_vars": {"A": "${EQUIRAY_TEST_UNSET}", "B": "${EQUIRAY_TEST_UNSET:-fallback}", "C": "x-${HOME}"}}}))
    with pytest.raises(ConfigError, match=r"env_vars.A needs \$EQUIRAY_TEST_UNSET"):
        jobs.runtime_env(spec)
    env = jobs.runtime_env(spec, env={"A": "given"})["env_vars"]  # --env wins
    assert env["A"] == "given" and env["B"] == "fallback" and env["C"].startswith("x-/")
    assert spec.name == "job"  # the file's stem when the spec names none


def test_cli_spec_error_is_one_line(tmp_path, capsys):
    assert main(["submit", str(_write(tmp_path, {"entrypoint": "python x.py", "entrypoin_num_cpus": 1})),
                 "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: job spec") and "entrypoin_num_cpus" in err and "Traceback" not in err


def test_no_cluster_at_the_address_is_one_error_line(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")  # the default address
    spec = _write(tmp_path, {"entrypoint": "python x.py", "runtime_env": {"working_dir": str(tmp_path)}})
    assert main(["submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no Ray cluster answers at http://127.0.0.1:{port}") and "ray up cluster.yaml" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["jobs", "list"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err
    with pytest.raises(EquirayError, match="no Ray cluster answers"):
        jobs.job_info("x", address=f"http://127.0.0.1:{port}")


def test_token_is_sent_from_where_ray_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert jobs.auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("def\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_headers() == {"Authorization": "Bearer def"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == {}


def test_submit_and_jobs_have_help(capsys):
    for args in (["submit", "--help"], ["jobs", "list", "--help"], ["jobs", "logs", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "--address" in out, args
    assert "--follow" in out


def test_a_dashboard_url_in_ray_address_is_not_joined_by_a_pipeline():
    """In a fresh process (this one may already hold the shared test Ray)."""
    import subprocess
    import sys

    code = ("from equiray_pipelines._ray import init_ray\nfrom equiray.errors import EquirayError\n"
            "try:\n    init_ray()\nexcept EquirayError as exc:\n    print('refused:', exc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert res.returncode == 0 and "refused:" in res.stdout, res.stderr[-2000:]
    assert "dashboard" in res.stdout and "equiray submit" in res.stdout


def test_without_an_address_a_pipeline_starts_its_own_ray(monkeypatch):
    """`ray.init(address=None)` would join any `ray start` cluster on the machine; init_ray asks for "local"."""
    import ray

    from equiray_pipelines import _ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(_ray, "quiet_data_progress", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _ray.init_ray(num_cpus=2)
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 2
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside a Ray job: Ray sets it to the job's cluster
    _ray.init_ray()
    assert calls[-1]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[-1]


def test_the_address_says_where_it_came_from(monkeypatch):
    """`equiray jobs list` names the cluster it asked and why that one: without --address or RAY_ADDRESS the
    default port may be a local Ray, not the cluster."""
    from equiray_pipelines import jobs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address() == jobs.DEFAULT_ADDRESS
    assert "default" in jobs.address_origin() and "RAY_ADDRESS" in jobs.address_origin()
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert (jobs.resolve_address(), jobs.address_origin()) == ("http://head:8265", "RAY_ADDRESS")
    assert (jobs.resolve_address("http://other:8265"), jobs.address_origin("http://other:8265")) == \
        ("http://other:8265", "--address")
