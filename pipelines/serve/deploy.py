"""The driver side of serving: resolve a registry alias to a concrete version, build the application, start
Serve's HTTP proxy, deploy or redeploy, and ``equiray serve run`` / ``serve stop`` around them."""
import dataclasses
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from equiray.config import load_config, to_dict
from equiray.errors import ConfigError, EquirayError
from pipelines._ray import say
from pipelines.serve.config import DEPLOYMENT, ServeConfig, deployment_options
from pipelines.serve.replica import EquirayModel


# ------------------------------------------------------------------------------------------ the registry side
@dataclass(frozen=True)
class ModelRef:
    """A model as the registry knows it, resolved once in the driver: ``load_uri`` names the concrete version,
    so promoting another version to the alias is visible as a change."""

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    tags: dict = dataclasses.field(default_factory=dict)


def resolve_model(uri: str, *, tracking_uri: str | None = None) -> ModelRef:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` -> the concrete version, its tags and its run's metrics.
    Unknown names, versions and aliases are :class:`EquirayError` naming what exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    tracking_uri = tracking.require_store(tracking_uri or tracking.tracking_uri())
    if uri.startswith("runs:/"):
        return ModelRef(uri, uri, run_id=uri[len("runs:/"):].split("/", 1)[0])
    if not uri.startswith("models:/") or len(uri) <= len("models:/"):
        raise EquirayError(f"model {uri!r}: give a registry URI, models:/NAME@ALIAS or models:/NAME/VERSION "
                           "(e.g. models:/equiray-ensemble@champion)")
    client = MlflowClient(tracking_uri)
    rest = uri[len("models:/"):]
    name, alias, version = rest, None, None
    if "@" in rest:
        name, alias = rest.split("@", 1)
    elif "/" in rest:
        name, version = rest.split("/", 1)
    else:
        raise EquirayError(f"model {uri!r} names no version or alias: models:/{rest}@ALIAS or models:/{rest}/VERSION")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise EquirayError(f"no registered model {name!r} in {tracking_uri} (registered: "
                           f"{', '.join(known) or 'none'}; `equiray demo` registers equiray-ensemble and "
                           "equiray-student)") from None
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version!r}"
        aliases = ", ".join(f"@{a}" for a in sorted(registered.aliases or {})) or "none"
        raise EquirayError(f"{name} has no {what} in {tracking_uri} (aliases: {aliases}; latest version: "
                           f"{max((int(v.version) for v in client.search_model_versions(f'name=' + repr(name))), default='none')})"
                           ) from None
    metrics = {}
    if mv.run_id:
        try:
            metrics = {k: (v if math.isfinite(v) else None) for k, v in client.get_run(mv.run_id).data.metrics.items()}
        except MlflowException:
            metrics = {}
    return ModelRef(uri, f"models:/{name}/{mv.version}", name, str(mv.version), alias, mv.run_id, metrics,
                    dict(mv.tags or {}))


# ------------------------------------------------------------------------------------------------ building
def user_config(cfg: ServeConfig, ref: ModelRef) -> dict:
    from pipelines import tracking

    return {"model": dataclasses.asdict(ref), "tracking_uri": tracking.tracking_uri(),
            "batch": to_dict(cfg.batch), "limits": to_dict(cfg.limits)}



def build_application(cfg: ServeConfig, ref: ModelRef, options: dict | None = None):
    options = dict(options or {})
    options.setdefault("logging_config", {"enable_access_log": cfg.access_log})
    try:
        deployment = EquirayModel.options(user_config=user_config(cfg, ref), **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"serve_config: {DEPLOYMENT}: {exc}") from None
    return deployment.bind(cfg.torch_threads, cfg.device)


def build_app(args: dict):
    """The application builder ``serve deploy`` / ``serve run`` call with a Serve config's ``args``
    (``import_path: pipelines.serve:build_app``): the keys of :class:`ServeConfig`."""
    cfg = load_config(ServeConfig, dict(args or {}))
    return build_application(cfg, resolve_model(cfg.model))


# ------------------------------------------------------------------------------------------------ running
def serve_running() -> Any | None:
    """Serve's controller on this Ray cluster, if Serve is already running there."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None


def _check_port(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if port:
                raise EquirayError(f"port {port} on {host} is in use ({exc.strerror}); choose another with "
                                   "--port (0 picks a free one)") from None
            raise EquirayError(f"cannot listen on {host}: {exc.strerror}") from None
        return s.getsockname()[1]


def _start_http(cfg: ServeConfig) -> tuple[str, int]:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (or reuse the one already running on this cluster)."""
    import ray

    controller = serve_running()
    if controller is not None:
        try:
            http = ray.get(controller.get_http_config.remote(), timeout=30)
            return http.host, int(http.port)
        except Exception:  # noqa: BLE001 - a private API; fall back to the configured address
            return cfg.host, cfg.port
    port = _check_port(cfg.host, cfg.port)
    serve.start(http_options={"host": cfg.host, "port": port})
    return cfg.host, port


def deploy(cfg: ServeConfig) -> dict:
    """Resolve the model, start Serve's proxy if needed and deploy (or redeploy) the app; returns once it answers.
    Deploying again after promoting another version to the alias swaps the model without dropping requests."""
    from pipelines._ray import init_ray

    import ray

    ref = resolve_model(cfg.model)  # a clear error before anything starts
    options = deployment_options(cfg.serve_config, cfg.app_name) if cfg.serve_config else {}
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        _check_port(cfg.host, cfg.port)  # a fresh local Ray has no Serve yet: fail before starting it
    init_ray()
    host, port = _start_http(cfg)
    app = build_application(cfg, ref, options)
    try:
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise EquirayError(f"the deployment did not start: {exc}") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{cfg.route_prefix.rstrip('/')}"
    return {"url": url, "host": host, "port": port, "model": ref.uri, "name": ref.name, "version": ref.version,
            "app": cfg.app_name}


def shutdown(app_name: str | None = None) -> None:
    """Delete one app (``app_name``) or stop Serve altogether."""
    if app_name:
        serve.delete(app_name)
    else:
        serve.shutdown()


def curl_examples(url: str) -> str:
    return (f"  curl -s {url}/v1/model\n"
            f"  curl -s -H 'Content-Type: image/png' --data-binary @image.png {url}/v1/predict\n"
            f"  curl -s -F files=@a.png -F files=@b.png {url}/v1/predict\n"
            f"  curl -s -H 'Content-Type: application/json' -d '{{\"instances\": [[[0.0, 0.5], [1.0, 0.2]]]}}' "
            f"{url}/v1/predict\n"
            f"  docs: {url}/docs")


def run(cfg: ServeConfig, *, report_dir=None, detach: bool = False) -> dict:
    """``equiray serve run``: deploy, print the URL, then block until Ctrl+C / SIGTERM and shut Serve down
    (``detach``: return at once, leaving the app on the cluster named by RAY_ADDRESS)."""
    if detach and not os.environ.get("RAY_ADDRESS"):
        raise EquirayError("--detach leaves the endpoint on a Ray cluster that outlives this command: set "
                           "RAY_ADDRESS (a local Ray instance stops when equiray exits)")
    t0 = time.perf_counter()
    ep = deploy(cfg)
    say(f"serving {ep['model']} (version {ep['version']}) at {ep['url']}  [{time.perf_counter() - t0:.0f} s to start]")
    say(curl_examples(ep["url"]))
    if detach:
        say(f"detached: stop it with `equiray serve stop --app {cfg.app_name}` (RAY_ADDRESS={os.environ['RAY_ADDRESS']})")
        return ep
    stop, reload = threading.Event(), threading.Event()
    # Ctrl+C (SIGINT) and SIGTERM stop it; handlers of our own, so that a shell that started it in the background
    # (where SIGINT is ignored) or a process manager can still stop it cleanly
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hup = signal.signal(signal.SIGHUP, lambda *_: reload.set())
    say(f"press Ctrl+C to stop; `kill -HUP {os.getpid()}` re-reads the alias and swaps in its version")
    try:
        while not stop.wait(1.0):
            if reload.is_set():
                reload.clear()
                try:
                    ep = deploy(dataclasses.replace(cfg, port=ep["port"]))
                    say(f"now serving {ep['model']} version {ep['version']}")
                except EquirayError as exc:
                    say(f"error: {exc} (still serving the previous version)")
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGHUP, previous_hup)
        say("shutting down")
        serve.shutdown()
    return ep


def stop(app_name: str | None) -> None:
    """``equiray serve stop``: delete the app on the cluster at RAY_ADDRESS (all of Serve without ``app_name``)."""
    from pipelines._ray import init_ray

    if not os.environ.get("RAY_ADDRESS"):
        raise EquirayError("set RAY_ADDRESS to the cluster the endpoint runs on (a local endpoint stops with its "
                           "`equiray serve run`)")
    init_ray()
    if serve_running() is None:
        raise EquirayError(f"Serve is not running on {os.environ['RAY_ADDRESS']}")
    shutdown(app_name)

