"""MLflow: the tracking URI, experiments, logging equiray models and handing them over through the registry.

Default store: MLflow 3's own default, a SQLite file ``mlflow.db`` in the working directory, resolved to an
absolute URI in the driver (Ray workers change directory) with artifacts beside it in ``mlartifacts/``.
``MLFLOW_TRACKING_URI`` points everything at a server instead.

Models are logged as MLflow pyfuncs on raw images (:mod:`equiray.pyfunc`: ``mlflow.pyfunc.load_model(uri)
.predict(DataFrame({"image": [png_bytes]}))`` and ``mlflow models serve`` answer labels and probabilities), with
equiray's code and pinned requirements; their artifacts ``spec.json`` + ``weights.safetensors`` are what
:func:`load_model` rebuilds an ``nn.Module`` from with ``equiray.create_model``, without unpickling anything (the
path serving uses).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from equiray.config import flatten
from equiray.errors import EquirayError

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts); equiray trains models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
END_REASON = "equiray.end_reason"  # the tag that says why a run ended KILLED or FAILED: the line the user was shown


def end_reason(exc: BaseException) -> str:
    """The :data:`END_REASON` of a run that ``exc`` ended: ``interrupted (Ctrl+C)`` (or the interruption's own
    advice), else the exception's class and first line."""
    text = str(exc).strip()
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted: {text}" if text else "interrupted (Ctrl+C)"
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (relative SQLite paths made absolute) or ``sqlite:///<cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def require_store(uri: str) -> str:
    """``uri`` for a command that only reads (serving, evaluating a run): a SQLite store that does not exist is an
    error, not a new empty ``mlflow.db`` left in whatever directory the command ran from."""
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise EquirayError(f"no MLflow store at {db}: run from the directory where `equiray demo` (or the "
                           "pipeline) ran, or set MLFLOW_TRACKING_URI to its store")
    return uri


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    db = _sqlite_file(uri)
    if db is not None:
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None  # a server decides


def setup(experiment: str, uri: str | None = None) -> str:
    """Point MLflow at ``uri`` and get or create ``experiment`` (in the driver, before workers start)."""
    import mlflow

    # MLflow's per-download bars (a model read back to calibrate it, members collected) are noise between
    # equiray's own progress lines: off unless the user asked for them, from the API as from the CLI
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = mlflow.create_experiment(experiment, artifact_location=_default_artifact_location(uri, experiment),
                                              tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            if not exp.tags.get("mlflow.experimentKind"):  # made by an earlier equiray
                try:
                    mlflow.MlflowClient().set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
                except Exception as exc:  # noqa: BLE001 - cosmetic (the UI's view); a read-only server may refuse
                    log.warning("could not tag experiment %s with its kind: %s", experiment, exc)
    except Exception as exc:  # noqa: BLE001 - any store failure gets the same actionable message
        if "Connection" in type(exc).__name__ or "connect" in str(exc).lower():
            raise EquirayError(f"the MLflow tracking server at {uri} does not answer ({exc}); start it or unset "
                               "MLFLOW_TRACKING_URI to use the local SQLite store") from None
        raise
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_config(config: Any) -> None:
    """Log a (nested) config as flat params plus the resolved YAML as an artifact."""
    import mlflow
    import yaml

    from equiray.config import to_dict

    params = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(to_dict(config)).items()}
    mlflow.log_params(params)
    mlflow.log_text(yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")


# the splits a stage's run lists as its dataset inputs, under MLflow's contexts
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "evaluation"}


def log_data_inputs(data_dir: str | os.PathLike, *, limits: Mapping[str, int | None] | None = None) -> int:
    """List a prepared dataset's splits as the active run's dataset inputs (the UI's Datasets column): each split
    by its location (its Parquet folder), a digest of the dataset's metadata and files, the image / label schema,
    its rows and the rows the stage used (``limits``: split -> the first N, None all). Metadata only: nothing is
    copied. Returns how many were logged (0 when ``data_dir`` holds no prepared dataset)."""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    from equiray.data import read_meta

    root = Path(data_dir)
    try:
        meta = read_meta(root)
    except EquirayError:
        return 0
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*.parquet"))
    digest = hashlib.sha256(json.dumps([meta, files], sort_keys=True, default=str).encode()).hexdigest()[:12]
    schema = Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.long, "label")])
    datasets, contexts, tags = [], [], []
    for split, context in SPLIT_CONTEXTS.items():
        rows = meta.get("rows", {}).get(split)
        if not rows:
            continue
        where = str((root / split).resolve()) if "://" not in str(root) else f"{root}/{split}"
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (all the same one)
            warnings.simplefilter("ignore")
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            source = resolve_dataset_source(where)
        used = (limits or {}).get(split)
        datasets.append(MetaDataset(source, name=f"{meta.get('source', root.name)}/{split}", digest=digest,
                                    schema=schema))
        contexts.append(context)
        tags.append({"equiray.rows": str(rows), "equiray.rows_used": str(min(rows, used) if used else rows)})
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)
    return len(datasets)


def source_tags() -> dict[str, str]:
    """Where a run's code came from: the git commit of the checkout equiray runs from (MLflow's own
    ``mlflow.source.git.*`` tags, which it sets only for scripts run from a repository), whether the checkout had
    uncommitted changes, and the versions of equiray and the libraries that shape a result."""
    import subprocess

    import mlflow
    import ray

    import equiray

    tags = {"equiray.version": equiray.__version__, "torch.version": torch.__version__, "ray.version": ray.__version__,
            "mlflow.version": mlflow.__version__, "python.version": sys.version.split()[0]}
    repo = Path(equiray.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:  # GIT_OPTIONAL_LOCKS=0: `git status` leaves the user's index alone
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                 env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (repo / ".git").exists() else None
    if commit:
        tags["mlflow.source.git.commit"] = commit
        status = git("status", "--porcelain", "--untracked-files=no")
        tags["equiray.git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def signature(spec: Mapping[str, Any]):
    """The pyfunc's MLflow signature from the model's spec: a column ``image`` of PNG/JPEG bytes in; ``label``,
    ``class_index``, ``confidence`` and one probability column per class out; a ``temperature`` parameter
    (default 0: the temperature stored with the model at registration, or 1 if none). None when the spec does not
    say its input shape."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    shape, classes = spec.get("input_shape"), spec.get("num_classes")
    if not shape or not classes:
        return None
    names = [str(c) for c in (spec.get("classes") or range(int(classes)))]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("long", "class_index"), ColSpec("double", "confidence"),
                        *(ColSpec("double", c) for c in names)]),
        params=ParamSchema([ParamSpec("temperature", "double", 0.0)]))


def requirements() -> list[str]:
    """What a logged model needs installed, pinned to the versions it was made with (equiray itself travels with
    it as code)."""
    from importlib.metadata import version

    return [f"torch=={torch.__version__.split('+')[0]}", *(f"{p}=={version(p)}" for p in
            ("timm", "safetensors", "pillow", "numpy", "pandas"))]


# A registered version's softmax temperature (temperature scaling, equiray.calibration): the endpoint divides the
# model's logits by it before the softmax; absent means 1 (uncalibrated)
TEMPERATURE_TAG = "equiray.temperature"


def _not_signature_inference(record: logging.LogRecord) -> bool:
    """Drops MLflow's 'Failed to infer model signature' warning: :func:`log_model` gives the signature, and MLflow
    still tries the pyfunc's type hints first and warns that they say nothing."""
    return not record.getMessage().startswith("Failed to infer model signature")


def log_model(model: torch.nn.Module, spec: Mapping[str, Any], *, name: str = "model") -> str:
    """Log ``model`` (built by ``equiray.create_model(**spec)``) to the active run as an MLflow pyfunc that takes
    raw images (:class:`equiray.pyfunc.ImageClassifier`; equiray's code travels with it, the requirements are
    pinned); returns its model URI."""
    import mlflow.pyfunc
    from safetensors.torch import save_file

    import equiray

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    if _not_signature_inference not in pyfunc_log.filters:
        pyfunc_log.addFilter(_not_signature_inference)
    model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(dict(spec), indent=2))
        weights = Path(tmp) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        with warnings.catch_warnings():
            # the signature is given (image bytes in): MLflow's advice to add an input example (which it would run
            # through the model at logging time) says nothing a user can act on (its message starts with a colour)
            warnings.filterwarnings("ignore", message=r".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(equiray.__file__).parent / "_pyfunc_model.py"),
                artifacts={"spec": str(spec_path), "weights": str(weights)},
                code_paths=[str(Path(equiray.__file__).parent)], pip_requirements=requirements(),
                signature=signature(spec))
    return info.model_uri


def end_unfinished_children(tracking_uri_: str, experiment_id: str, parent_run_id: str) -> int:
    """Mark KILLED the nested runs of ``parent_run_id`` still RUNNING: trials that Ray Tune stopped mid-training on
    Ctrl+C cannot end their own. A resumed trial reopens its run and ends it FINISHED. Returns how many."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri_)
    running = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                 "attributes.status = 'RUNNING'")
    for r in running:
        client.set_tag(r.info.run_id, END_REASON, "interrupted (Ctrl+C) before the trial ended")
        client.set_terminated(r.info.run_id, "KILLED")
    return len(running)


def config_hash(config: Any) -> str:
    """A short stable hash of a resolved config (minus the run name), to recognise work already done."""
    import hashlib

    from equiray.config import to_dict

    data = to_dict(config)
    data.get("tracking", {}).pop("run_name", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_version(uri: str):
    """The registry version (MLflow's ``ModelVersion``: tags, source, run) behind ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``; MLflow's exception when there is none."""
    from mlflow import MlflowClient

    ref = uri[len("models:/"):]
    if "@" in ref:
        return MlflowClient().get_model_version_by_alias(*ref.split("@", 1))
    return MlflowClient().get_model_version(*ref.rsplit("/", 1))


def registry_version(uri: str) -> str:
    """The concrete registry version behind a ``models:/name@alias`` URI (so a new upstream model is new work)."""
    from mlflow import MlflowClient

    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/"):].split("@", 1)
        return f"{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return uri


def fetch_results(run_id: str, data_path: str, plot_path: str, report_dir) -> tuple[Any, Path]:
    """A finished sweep's JSON results and its plot, read back from its MLflow run; the plot is copied into
    ``report_dir`` (or a temporary folder). What a reused stage shows instead of running again."""
    import shutil

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=data_path,
                                                                   dst_path=tmp)).read_text())
        plot = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=plot_path, dst_path=tmp))
        out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-plots-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        plot = Path(shutil.copy(plot, out_dir / plot.name))
    return data, plot


def fetch_plot(run_id: str, plot_path: str, report_dir) -> Path | None:
    """A run's plot copied into ``report_dir`` (or a temporary folder); None when the run has no such artifact (an
    older run, or a plot that was not made)."""
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            plot = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=plot_path, dst_path=tmp))
        except (MlflowException, OSError):
            return None
        out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-plots-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(plot, out_dir / plot.name))


def find_version(name: str, alias: str, *, config_hash_value: str):
    """The model version behind ``name@alias`` if it was produced by a config with this hash, else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return mv if mv.tags.get("equiray.config_hash") == config_hash_value else None


def attach_temperature(model_uri: str, temperature: float) -> bool:
    """Store ``temperature`` inside the logged model (``artifacts/calibration.json``), so that
    ``mlflow.pyfunc.load_model(...)`` of it returns calibrated probabilities without being told the temperature
    (the registry tag says the same for equiray's own readers). False for a model that is not an MLflow 3 logged
    model (``models:/m-...``), which keeps its probabilities uncalibrated in the pyfunc."""
    from mlflow import MlflowClient

    from equiray.pyfunc import CALIBRATION_FILE

    model_id = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/m-") or "/" in model_id or "@" in model_id:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CALIBRATION_FILE
        path.write_text(json.dumps({"temperature": float(temperature)}))
        MlflowClient().log_model_artifact(model_id, str(path), artifact_path="artifacts")
    return True


def register(model_uri: str, name: str, alias: str, *, tags: Mapping[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it; returns the version. A
    ``equiray.temperature`` tag also goes into the model itself (:func:`attach_temperature`)."""
    import mlflow
    from mlflow import MlflowClient

    if TEMPERATURE_TAG in (tags or {}):
        attach_temperature(model_uri, float(tags[TEMPERATURE_TAG]))

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # MLflow prints its registry steps; equiray says it in one line below
            mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    finally:
        chatter = re.compile(r"Successfully registered model|Registered model .* already exists|Created version ")
        sys.stderr.write("".join(line for line in said.getvalue().splitlines(keepends=True)
                                 if not chatter.match(line)))
    MlflowClient().set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s as %s@%s", model_uri, mv.version, name, alias)
    return str(mv.version)


def load_model(uri: str, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild an equiray model from a registry URI (``models:/equiray-backbone@pretrained``) without unpickling:
    ``equiray.create_model(**spec)`` + safetensors weights. Returns ``(model in eval mode, spec)``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from safetensors.torch import load_file

    from equiray.models import create_model

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as exc:
        raise EquirayError(f"cannot load {uri}: {exc.message}. Is it registered in {mlflow.get_tracking_uri()}?") from None
    spec_file = next(iter(local.rglob("spec.json")), None)
    weights = next(iter(local.rglob("weights.safetensors")), None)
    if spec_file is None or weights is None:
        raise EquirayError(f"{uri} is not an equiray model (no spec.json / weights.safetensors)")
    spec = json.loads(spec_file.read_text())
    if spec.get("builder") == "metanetwork":  # equiray-nfn: a metanetwork over a zoo architecture
        from equiray.nfn import LayerSpec, NetworkSpec, create_metanetwork

        net = NetworkSpec(tuple(LayerSpec(o, i, tuple(k)) for o, i, k in spec["network_spec"]))
        model = create_metanetwork(spec["name"], net, **spec.get("kwargs", {}))
    else:
        model = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                             **spec.get("kwargs", {}))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), spec
