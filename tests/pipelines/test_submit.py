"""`equiray submit` and `equiray jobs` against a real Ray head (`ray start --head --block`, dashboard on loopback,
its own temp dir and ports), started and stopped by this module: a real pipeline job succeeds, a failing one is
reported with its log, a running one is stopped."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from equiray_pipelines import jobs
from equiray_pipelines.cli import main
from ports import free_port as _free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


class Head(NamedTuple):
    url: str  # the dashboard (Job API)
    gcs_port: int
    mlflow_uri: str  # the tracking URI in the head's environment



def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` alone (it stops its own processes); whatever of its process group is left
    after 30 s gets SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this head only (its own session / process group)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def head(sole_ray, tmp_path_factory):
    """A Ray head of its own; yields its dashboard URL. Token authentication stays as Ray sets it up (on when
    ~/.ray/auth_token exists); the client side sends the token."""
    root = tmp_path_factory.mktemp("head")
    temp_dir = Path("/tmp") / f"eqr-{os.getpid()}-{_free_port()}"  # short: Ray's socket paths have a length limit
    gcs, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    # as cluster.yaml does: Ray's own environment names the MLflow store, so every job logs there
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run this Python
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM stop at once (no Serve to drain here)
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
         # every port Ray would otherwise take at its default (52365, 10001, ...) is one another Ray on this
         # machine may hold: pick free ones
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--metrics-export-port={_free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(root / 'head.log').read_text()[-2000:]}")
            try:
                jobs.client(url)
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    logs = sorted(temp_dir.glob("session_latest/logs/dashboard*.log"))
                    tails = "".join(f"\n--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}" for f in logs)
                    raise RuntimeError(f"the test's Ray head did not answer at {url} in 120 s ({exc}); "
                                       f"head.log:\n{(root / 'head.log').read_text()[-1500:]}{tails}") from None
                time.sleep(1)
        yield Head(url, gcs, env["MLFLOW_TRACKING_URI"])
    finally:
        _stop_head(proc)
        log.close()
        alive = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
        assert not alive, f"processes of the test's Ray head survived: {alive}"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _spec(path: Path, entrypoint: str, **runtime_env) -> Path:
    path.write_text(yaml.safe_dump({
        "name": path.stem, "entrypoint": entrypoint, "entrypoint_num_cpus": 0.5,
        "runtime_env": {"working_dir": str(REPO), "excludes": ["data/", "runs/", "reports/", "docs/", "benchmarks/"],
                        "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}, **runtime_env}}))
    return path


def _job_id(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("submitted "))
    return line.split(" as job ")[1].split()[0]


@pytest.mark.long
def test_a_pipeline_job_runs_to_success_and_its_log_is_followed(head, tmp_path, capsys):
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"source": "digits", "dir": str(tmp_path / "digits")},
        "model": {"name": "small_cnn", "kwargs": {"width": 8}}, "train": {"epochs": 1, "batch_size": 64},
        "scaling": {"cpus_per_worker": 0.5}, "tracking": {"experiment": "test-submit"},
        "eval": {"corruptions": []}, "storage_path": str(tmp_path / "runs")}))
    spec = _spec(tmp_path / "tiny-pretrain.yaml",
                 f"python -c 'import equiray, equiray_pipelines as p, os; "
                 f"print(\"code:\", equiray.__file__, p.__file__, \"ray:\", os.environ[\"RAY_ADDRESS\"])' "
                 f"&& python -m equiray_pipelines.pretrain --config {cfg} --report-dir {tmp_path / 'report'}")
    # no `pip:` here, unlike jobs/*.yaml: from inside a virtualenv (this test's Python) Ray clones the whole
    # virtualenv for a pip runtime env (6.6 GB, ~3 minutes on this machine); it works, but not at test speed
    code = main(["submit", str(spec), "--address", head.url, "--follow"])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-2000:]
    job_id = _job_id(out.out)
    assert job_id.startswith("equiray-tiny-pretrain-")
    assert f"job {job_id}: SUCCEEDED" in out.err
    # the job ran the uploaded code, the library and the pipelines (sent as the package equiray_pipelines), not the
    # copies installed here, and joined the cluster it was submitted to
    code_line = next(line for line in out.out.splitlines() if line.startswith("code:"))
    library, pipelines = code_line.split()[1:3]
    assert "runtime_resources" in library and not library.startswith(str(REPO)), code_line
    assert "runtime_resources" in pipelines and pipelines.endswith("equiray_pipelines/__init__.py"), code_line
    assert code_line.split("ray: ")[1].endswith(f":{head.gcs_port}")
    assert "equiray-backbone" in out.out  # the pipeline's own result, streamed from the job's log
    import mlflow

    # it logged to the cluster's tracking store (the job spec named none)
    mv = mlflow.MlflowClient(head.mlflow_uri).get_model_version_by_alias("equiray-backbone", "pretrained")
    assert str(mv.version) == "1" and mv.run_id in out.out
    # status and the stored log agree after the fact
    assert main(["jobs", "status", job_id, "--address", head.url]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", head.url]) == 0
    assert "equiray-backbone" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", head.url]) == 0
    assert job_id in capsys.readouterr().out


def test_a_failing_job_is_reported_with_its_log(head, tmp_path, capsys):
    spec = _spec(tmp_path / "bad.yaml", "python -m equiray_pipelines.pretrain --set train.epochz=1")
    code = main(["submit", str(spec), "--address", head.url, "--wait"])
    out = capsys.readouterr()
    assert code == 1
    job_id = _job_id(out.out)
    assert "error: unknown config key 'train.epochz'" in out.out  # the pipeline's own error, from the job log
    assert f"job {job_id}: FAILED" in out.err
    assert main(["jobs", "status", job_id, "--address", head.url]) == 0
    status = capsys.readouterr().out
    assert f"{job_id}: FAILED" in status and "exit code 2" in status


def test_a_running_job_is_stopped(head, tmp_path, capsys):
    spec = _spec(tmp_path / "sleeper.yaml", "python -c \"import time; print('started', flush=True); time.sleep(600)\"")
    assert main(["submit", str(spec), "--address", head.url]) == 0
    out = capsys.readouterr().out
    job_id = _job_id(out)
    assert f"equiray jobs logs {job_id} --follow" in out  # how to follow it
    deadline = time.monotonic() + 60
    while "started" not in jobs.job_logs(job_id, address=head.url):
        assert time.monotonic() < deadline, jobs.job_info(job_id, address=head.url)
        time.sleep(0.5)
    assert jobs.status_name(jobs.job_info(job_id, address=head.url)) == "RUNNING"
    assert main(["jobs", "stop", job_id, "--address", head.url, "--wait"]) == 0
    assert f"job {job_id}: STOPPED" in capsys.readouterr().out
    # stopping it again is not an error
    assert main(["jobs", "stop", job_id, "--address", head.url]) == 0
    assert "already ended: STOPPED" in capsys.readouterr().out


def test_unknown_job_id_is_one_error_line(head, capsys):
    assert main(["jobs", "logs", "no-such-job", "--address", head.url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no job 'no-such-job'") and "Traceback" not in err
