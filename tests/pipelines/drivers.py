"""A pipeline run as its own driver process on the session's shared Ray, as a user's command runs: the
environment it needs, and Ctrl+C once it is training (the interruption tests of each stage)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[2]


def driver_env(ray_session, tracking_uri: str) -> dict[str, str]:
    """The environment of a driver that joins the shared Ray and logs to ``tracking_uri``."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT)}


def start(args: list[str], *, cwd, env: dict[str, str], merged: bool = False) -> subprocess.Popen:
    """``python -m ARGS`` (e.g. ``equiray_pipelines.pretrain --config f.yaml``), its output captured as text
    (``merged``:
    standard error into standard output, in the order written)."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True)


def interrupt_once_training(proc: subprocess.Popen, tracking_uri: str, experiment: str, *,
                            metric: str = "train_loss", timeout: float = 480) -> str:
    """Wait until a run of ``experiment`` has logged a metric named ``metric`` or starting ``metric/`` (the workers
    are in their second epoch by then), send SIGINT, wait for the end; returns stderr (or all the output, started
    ``merged``). The signal follows what the workers wrote to MLflow, not the lines Ray forwards to the driver
    (which a busy log monitor can hold back for minutes). When the moment never comes, the driver is killed (a
    later test does not share the cores with it) and the test fails with its output."""
    client = mlflow.MlflowClient(tracking_uri)
    deadline, training = time.time() + timeout, False
    while time.time() < deadline and proc.poll() is None and not training:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        training = any(k == metric or k.startswith(metric + "/") for r in runs for k in r.data.metrics)
        time.sleep(0.5)
    if not training:
        _fail(proc, f"no {metric!r} metric before the end or the deadline")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return err if err is not None else out


def _fail(proc: subprocess.Popen, why: str) -> None:
    """Kill ``proc`` if it still runs and fail the test with ``why`` and the end of its output."""
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=60)
    raise AssertionError(f"{why}:\n{(err or '')[-3000:]}{(out or '')[-3000:]}")


def interrupt_after_line(proc: subprocess.Popen, marker: str, *, timeout: float = 240) -> str:
    """Read ``proc``'s output (started ``merged``) as it comes; on the first line that holds ``marker``, send
    SIGINT; wait for the end. Returns all the output (the marker line among it)."""
    import threading

    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not seen.is_set() and proc.poll() is None and time.time() < deadline:
        seen.wait(0.2)
    if seen.is_set():
        proc.send_signal(signal.SIGINT)
    elif proc.poll() is None:
        proc.kill()  # the marker never came: a driver left running would share the cores with the next tests
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert seen.is_set(), f"no line with {marker!r} before the end or the deadline:\n{''.join(lines)}"
    return "".join(lines)


def interrupt_once_running(proc: subprocess.Popen, tracking_uri: str, experiment: str, *, settle: float = 3.0,
                           timeout: float = 180) -> str:
    """Wait until ``experiment`` holds a run, ``settle`` seconds more (into the stage's work), send SIGINT, wait for
    the end; returns stderr (or all the output, started ``merged``)."""
    client = mlflow.MlflowClient(tracking_uri)
    deadline, started = time.time() + timeout, False
    while time.time() < deadline and proc.poll() is None and not started:
        exp = client.get_experiment_by_name(experiment)
        started = bool(exp and client.search_runs([exp.experiment_id]))
        time.sleep(0.5)
    if not started:
        _fail(proc, "no run before the end or the deadline")
    time.sleep(settle)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return err if err is not None else out
