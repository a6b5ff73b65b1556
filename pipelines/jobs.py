"""Cluster jobs: job specs in ``jobs/*.yaml`` and their submission through Ray's Job Submission API.

A job spec is a small YAML file (``load_job_spec`` rejects unknown keys, naming them)::

    name: pretrain
    description: pretrain the backbone and register it as equiray-backbone@pretrained
    entrypoint: python -m equiray_pipelines.pretrain --config jobs/configs/pretrain.yaml
    entrypoint_num_cpus: 1
    runtime_env:
      working_dir: .                    # uploaded with the job: the code the job runs
      excludes: [data/, runs/, reports/]
      pip: pyproject.toml               # equiray's dependencies, over the nodes' Python (cluster.yaml installs them)
      env_vars:
        RAY_USAGE_STATS_ENABLED: "0"

The configs a spec runs are read off its entrypoint (``python -m equiray_pipelines.X [ACTION] --config F``, which is
``equiray X [ACTION] --config F``; ``serve deploy F``, ``--serve-config F``), found in :mod:`equiray_pipelines.catalog`,
checked to exist before anything is submitted, and loaded by the tests with the pipeline's own config class, so a
cluster-scale config cannot rot unnoticed.

``${VAR}`` / ``${VAR:-default}`` in ``env_vars`` expand from the submitting environment; a variable that is
unset and has no default is an error, not an empty string. ``MLFLOW_TRACKING_URI`` needs no entry: cluster.yaml
sets it for Ray on every node, and a job inherits it (``equiray submit --env`` overrides it).

The client side (``submit``, ``list_jobs``, ``job_info``, ``job_logs``, ``follow_logs``, ``wait``, ``stop``) talks to
the cluster's dashboard (``--address``, else ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``, the port
``ray dashboard cluster.yaml`` forwards) with the cluster's authentication token when one is available
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, as Ray itself looks for it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from equiray.errors import ConfigError, EquirayError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SERVE = "serve"  # a Ray Serve config file: `serve deploy|run FILE` (Ray's CLI), `--serve-config FILE`
PACKAGE = "equiray_pipelines"  # the import name of the repository's pipelines/ folder (pyproject's package-dir)


@dataclass(frozen=True)
class RuntimeEnvSpec:
    """The subset of Ray's ``runtime_env`` a job spec may set (anything else is a typo until proven otherwise)."""

    working_dir: str = "."
    excludes: tuple[str, ...] = ()
    pip: str | tuple[str, ...] | None = None  # requirement strings, a requirements file, or pyproject.toml
    env_vars: dict[str, str] = field(default_factory=dict)
    py_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    entrypoint: str
    name: str = ""
    description: str = ""
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0
    entrypoint_memory: int = 0
    entrypoint_resources: dict[str, float] = field(default_factory=dict)
    runtime_env: RuntimeEnvSpec = RuntimeEnvSpec()
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.entrypoint.strip():
            raise ConfigError("entrypoint: give the command the job runs")
        if min(self.entrypoint_num_cpus, self.entrypoint_num_gpus, self.entrypoint_memory) < 0:
            raise ConfigError("entrypoint_num_cpus, entrypoint_num_gpus and entrypoint_memory must be >= 0")


@dataclass(frozen=True)
class PipelineCommand:
    """One pipeline call found in an entrypoint: ``pipeline`` is a command of ``equiray_pipelines.catalog.PIPELINES``
    (an old spelling given as its command), or ``SERVE`` for a Serve config file; ``config`` the config file it
    runs, ``overrides`` its ``--set`` values."""

    pipeline: str
    config: str | None
    overrides: tuple[str, ...] = ()


def load_job_spec(path: str | os.PathLike) -> JobSpec:
    """Read and validate a job spec (unknown keys, wrong types and a missing file are ``ConfigError``)."""
    from equiray.config import load_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job spec {str(path)!r} not found (the specs are in jobs/*.yaml)")
    try:
        spec = load_config(JobSpec, path)
    except ConfigError as exc:
        raise ConfigError(f"job spec {path}: {exc}") from None
    return dataclasses.replace(spec, name=spec.name or path.stem)


def pipeline_commands(entrypoint: str) -> list[PipelineCommand]:
    """Every equiray pipeline (and Serve config) the entrypoint runs, in order."""
    from equiray_pipelines.catalog import ALIASES, PIPELINES

    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise ConfigError(f"entrypoint: cannot parse {entrypoint!r}: {exc}") from None
    commands, current = [], []
    for tok in tokens:  # split into the shell's simple commands at ; && || | & (quotes respected)
        if tok and set(tok) <= set(";&|()<>"):
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    out = []
    for argv in commands:
        if argv[:2] in (["python", "-m"], ["python3", "-m"]) and len(argv) > 2 and argv[2].startswith("pipelines."):
            raise ConfigError(f"entrypoint: `python -m {argv[2]}`: the package is `equiray_pipelines` now; write "
                              f"`python -m equiray_{argv[2]}` (or `equiray {argv[2].split('.', 1)[1]}`)")
        if argv[:2] in (["python", "-m"], ["python3", "-m"]) and len(argv) > 2 and argv[2].startswith(PACKAGE + "."):
            module = argv[2].split(".", 1)[1]  # `python -m equiray_pipelines.X ...` is `equiray X ...`
            words, rest = ([] if module == "cli" else [module]), argv[3:]
        elif argv[:1] == ["equiray"]:
            words, rest = [], argv[1:]
        elif argv[:1] == ["serve"] and len(argv) > 2 and argv[1] in ("deploy", "run"):
            out.append(PipelineCommand(SERVE, argv[2]))
            continue
        else:
            continue
        while rest and not rest[0].startswith("-"):
            words.append(rest.pop(0))
        name = " ".join(words)
        name = ALIASES.get(name, name)
        config, overrides = None, []
        for i, arg in enumerate(rest):
            if arg in ("--config", "-c") and i + 1 < len(rest):
                config = rest[i + 1]
            elif arg.startswith("--config="):
                config = arg.split("=", 1)[1]
            elif arg == "--set" and i + 1 < len(rest):
                overrides.append(rest[i + 1])
        if name in PIPELINES:
            out.append(PipelineCommand(name, config, tuple(overrides)))
        else:
            raise ConfigError(f"entrypoint: {name!r} is not an equiray pipeline; known: {', '.join(PIPELINES.names())}")
        for i, arg in enumerate(rest):  # `serve run --serve-config F`: a Serve config file as well
            if arg == "--serve-config" and i + 1 < len(rest):
                out.append(PipelineCommand(SERVE, rest[i + 1]))
    return out


def config_paths(spec: JobSpec, *, root: str | os.PathLike = ".") -> list[Path]:
    """The config files the spec's entrypoint runs, resolved against ``root`` (the job's working dir)."""
    paths = []
    for cmd in pipeline_commands(spec.entrypoint):
        if cmd.config is not None:
            p = Path(cmd.config)
            paths.append(p if p.is_absolute() else Path(root) / p)
    return paths


def _expand(value: str, key: str, environ) -> str:
    def repl(m: re.Match) -> str:
        var, default = m.group(1), m.group(3)
        if var in environ and environ[var] != "":
            return environ[var]
        if default is not None:
            return default
        raise ConfigError(f"runtime_env.env_vars.{key} needs ${var}: set it in the shell that submits "
                          f"(or pass --env {key}=VALUE)")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", repl, value)


def runtime_env(spec: JobSpec, *, root: str | os.PathLike = ".", env: dict[str, str] | None = None,
                environ=None) -> dict[str, Any]:
    """Ray's ``runtime_env`` dict for ``spec``: paths resolved against ``root`` and checked, ``${VAR}`` expanded,
    ``env`` (``--env KEY=VALUE``) on top."""
    environ = os.environ if environ is None else environ
    r = spec.runtime_env
    working_dir = Path(root) / r.working_dir if not Path(r.working_dir).is_absolute() else Path(r.working_dir)
    if not working_dir.is_dir():
        raise ConfigError(f"runtime_env.working_dir {r.working_dir!r}: no such directory "
                          f"(relative paths are taken from {Path(root).resolve()}; submit from the repository root)")
    for cfg in config_paths(spec, root=working_dir):
        if not cfg.is_file():
            raise ConfigError(f"the entrypoint's config {str(cfg)!r} does not exist")
    out: dict[str, Any] = {"working_dir": str(working_dir.resolve())}
    if r.excludes:
        out["excludes"] = list(r.excludes)
    if r.py_modules:
        out["py_modules"] = [str((Path(root) / m).resolve()) for m in r.py_modules]
    if r.pip is not None:
        out["pip"] = _requirements(r.pip, root)
    env_vars = {k: _expand(str(v), k, environ) for k, v in r.env_vars.items() if k not in (env or {})}
    env_vars.update(env or {})
    if env_vars:
        out["env_vars"] = env_vars
    return out


def _requirements(pip: str | tuple[str, ...], root: str | os.PathLike) -> list[str]:
    """``runtime_env.pip`` as a list: a list as is; a requirements file's lines; ``pyproject.toml``: its
    ``[project.dependencies]`` (so a job needs exactly what ``pip install equiray`` installs, with no copy to
    keep in step)."""
    if not isinstance(pip, str):
        return list(pip)
    path = Path(pip) if Path(pip).is_absolute() else Path(root) / pip
    if not path.is_file():
        raise ConfigError(f"runtime_env.pip: {pip!r} not found")
    if path.name == "pyproject.toml":
        import tomllib

        try:
            return list(tomllib.loads(path.read_text())["project"]["dependencies"])
        except (KeyError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"runtime_env.pip: {pip} has no [project] dependencies list ({exc})") from None
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ------------------------------------------------------------------------------------------- the client
def resolve_address(address: str | None = None) -> str:
    """``address``, else ``RAY_ADDRESS``, else the dashboard ``ray dashboard cluster.yaml`` forwards."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def address_origin(address: str | None = None) -> str:
    """Where :func:`resolve_address` took the address from, as a user reads it: without ``--address`` or
    ``RAY_ADDRESS`` the default port answers for whichever Ray listens there, a forwarded cluster or a local one."""
    if address:
        return "--address"
    if os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS"
    return ("the default: the dashboard `ray dashboard cluster.yaml` forwards, or a Ray started on this machine; "
            "--address or RAY_ADDRESS names a cluster")


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a cluster with token authentication (Ray 2.59+), from the places Ray
    itself reads the token; empty when there is none or ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
            if candidate and Path(candidate).is_file():
                token = Path(candidate).read_text().strip()
                break
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None):
    """A ``JobSubmissionClient`` for the cluster at ``address``; ``EquirayError`` when nothing answers there."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except AuthenticationError as exc:
        raise EquirayError(f"the Ray cluster at {url} refused the authentication token: "
                           f"{str(exc).splitlines()[0]}. Put the cluster's token in ~/.ray/auth_token or "
                           "RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it)") from None
    except (ConnectionError, OSError) as exc:
        raise EquirayError(f"no Ray cluster answers at {url} ({str(exc).splitlines()[0]}); start one with "
                           "`ray up cluster.yaml` and forward its dashboard with `ray dashboard cluster.yaml`, "
                           "or pass --address / set RAY_ADDRESS") from None


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-").lower() or "job"
    return f"equiray-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def submit(spec: JobSpec, *, address: str | None = None, root: str | os.PathLike = ".",
           env: dict[str, str] | None = None, ready_timeout_s: float = 60.0) -> str:
    """Submit ``spec`` to the cluster; returns the job id. A freshly started head answers HTTP a few seconds
    before its job agent is ready: that one error is retried for up to ``ready_timeout_s``."""
    c = client(address)
    with _pipelines_as_package(runtime_env(spec, root=root, env=env)) as renv:
        return _submit(c, spec, renv, address, ready_timeout_s)


@contextlib.contextmanager
def _pipelines_as_package(renv: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``renv`` with the working dir's ``pipelines/`` folder sent as the package ``equiray_pipelines``, the name
    the job imports it by (a copy under that name in ``py_modules``, the folder left out of the working dir): the
    job runs the submitted code, not a copy installed on the nodes. A working dir without the folder: as is."""
    folder = Path(renv["working_dir"]) / "pipelines"
    if not (folder / "__init__.py").is_file():
        yield renv
        return
    with tempfile.TemporaryDirectory(prefix="equiray-job-") as tmp:
        staged = Path(tmp) / PACKAGE
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield {**renv, "py_modules": [*renv.get("py_modules", []), str(staged)],
               "excludes": [*renv.get("excludes", []), "/pipelines/"]}  # uploaded once, under its package name


def _submit(c, spec: JobSpec, renv: dict[str, Any], address: str | None, ready_timeout_s: float) -> str:
    metadata = {"equiray.spec": spec.name, **spec.metadata}
    kwargs = dict(entrypoint=spec.entrypoint, runtime_env=renv, metadata=metadata,
                  submission_id=_submission_id(spec.name),
                  entrypoint_num_cpus=spec.entrypoint_num_cpus or None,
                  entrypoint_num_gpus=spec.entrypoint_num_gpus or None,
                  entrypoint_memory=spec.entrypoint_memory or None,
                  entrypoint_resources=spec.entrypoint_resources or None)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            return c.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise EquirayError(f"the cluster at {resolve_address(address)} rejected the job: {exc}") from None


def _known(c, job_id: str, address: str | None):
    try:
        return c.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise EquirayError(f"no job {job_id!r} on the cluster at {resolve_address(address)}; "
                               "`equiray jobs list` shows the jobs there") from None
        raise


def job_info(job_id: str, *, address: str | None = None):
    """Ray's ``JobDetails`` of one job (status, message, times, entrypoint, metadata)."""
    return _known(client(address), job_id, address)


def list_jobs(*, address: str | None = None) -> list:
    """Every job the cluster knows, newest first."""
    jobs = client(address).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def job_logs(job_id: str, *, address: str | None = None) -> str:
    c = client(address)
    _known(c, job_id, address)
    return c.get_job_logs(job_id)


def follow_logs(job_id: str, *, address: str | None = None) -> Iterator[str]:
    """Yield the job's log as it grows (from the start), until the job ends."""
    import asyncio

    c = client(address)
    _known(c, job_id, address)

    # tail_job_logs is an async iterator; drive it one chunk at a time from this (synchronous) generator
    loop = asyncio.new_event_loop()
    try:
        agen = c.tail_job_logs(job_id).__aiter__()
        while True:
            try:
                chunk = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                break
            yield chunk
    finally:
        loop.close()


def wait(job_id: str, *, address: str | None = None, timeout_s: float | None = None, poll_s: float = 1.0):
    """Block until the job reaches a terminal state; returns its ``JobDetails``."""
    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = _known(c, job_id, address)
        if str(info.status) in TERMINAL or getattr(info.status, "value", None) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise EquirayError(f"job {job_id} still {info.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stop(job_id: str, *, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    c = client(address)
    _known(c, job_id, address)
    return c.stop_job(job_id)


def status_name(info) -> str:
    return getattr(info.status, "value", str(info.status))
