"""The driver side of serving: resolve a registry alias to a concrete version, build the application, start
Serve's HTTP proxy, deploy or redeploy, and ``equiray serve run`` / ``serve stop`` around them."""
import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ray import serve

from equiray.config import load_config, to_dict
from equiray.errors import ConfigError, EquirayError
from equiray_pipelines._ray import say, verbose
from equiray_pipelines.serve.config import DEPLOYMENT, ServeConfig, deployment_options
from equiray_pipelines.serve.replica import EquirayModel

log = logging.getLogger(__name__)


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

    from equiray_pipelines import tracking

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
    from equiray_pipelines import tracking

    return {"model": dataclasses.asdict(ref), "tracking_uri": tracking.tracking_uri(),
            "batch": to_dict(cfg.batch), "limits": to_dict(cfg.limits), "min_confidence": cfg.min_confidence}


def code_version() -> str:
    """The deployment's code version: equiray's version and the serving code's own hash. Serve replaces replicas
    only when it changes; a redeploy that changes only the model (``user_config``) reconfigures them in place,
    so a replica keeps its port (direct ingress) and no request meets a replica that is going away."""
    import hashlib
    from pathlib import Path

    import equiray

    here = Path(__file__).parent
    digest = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        digest.update(f.read_bytes())
    return f"{equiray.__version__}-{digest.hexdigest()[:12]}"


def build_application(cfg: ServeConfig, ref: ModelRef, options: dict | None = None):
    options = dict(options or {})
    # the replica's own INFO lines (and access lines, which Serve logs at INFO) only when asked for
    options.setdefault("logging_config", {"enable_access_log": cfg.access_log,
                                          "log_level": "INFO" if cfg.access_log or verbose() else "WARNING"})
    try:
        deployment = EquirayModel.options(user_config=user_config(cfg, ref), **options)
        # serve.run gives every deploy a random code version, so Serve replaced the replica on each model swap:
        # with direct ingress its successor came up on another port. A stable version (the one `serve deploy`
        # derives from its import path) turns a model swap into Serve's in-place update (`reconfigure`). Ray
        # 2.60 takes it only as an internal option.
        deployment = deployment.options(version=code_version(), _internal=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"serve_config: {DEPLOYMENT}: {exc}") from None
    return deployment.bind(cfg.torch_threads, cfg.device)


def build_app(args: dict):
    """The application builder ``serve deploy`` / ``serve run`` call with a Serve config's ``args``
    (``import_path: equiray_pipelines.serve:build_app``): the keys of :class:`ServeConfig`."""
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


def _start_http(cfg: ServeConfig, port: int) -> tuple[str, int]:
    """Start Serve's HTTP proxy on ``port``, or reuse the one already running on this cluster."""
    import ray

    controller = serve_running()
    if controller is not None:
        try:
            http = ray.get(controller.get_http_config.remote(), timeout=30)
            return http.host, int(http.port)
        except Exception:  # noqa: BLE001 - a private API; fall back to the configured address
            return cfg.host, cfg.port
    port = _check_port(cfg.host, port)
    serve.start(http_options={"host": cfg.host, "port": port},
                logging_config={"log_level": "INFO" if verbose() else "WARNING"})  # the controller's and proxy's
    return cfg.host, port


def direct_ingress(cfg: ServeConfig) -> bool:
    """Whether replicas take HTTP themselves here: asked for, and switched on in the Ray this process started or
    joined (for a cluster, as far as this process's environment tells: the URLs are read back after deploying)."""
    return cfg.ingress == "direct" and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"


def ingress_env(cfg: ServeConfig, port: int) -> dict[str, str]:
    """What a local Ray started for ``cfg`` needs in its environment: direct ingress on or off and, when on, the
    replicas' ports from ``port`` up (a second replica on this node takes port+1, ...)."""
    if cfg.ingress == "proxy":
        return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(port + 100, 65536))}


def replica_urls(app_name: str, host: str, *, timeout_s: float = 30.0) -> list[str]:
    """The HTTP addresses the app's replicas answer on themselves (direct ingress), as Serve's controller reports
    them (waiting up to ``timeout_s`` for a replica's server to take its port); empty where requests go through
    the proxy only."""
    import ray

    controller = serve_running()
    if controller is None:
        return []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            groups = ray.get(controller.get_target_groups.remote(app_name), timeout=max(timeout_s, 10.0))
        except Exception:  # noqa: BLE001 - a private API of Serve's controller: no direct URLs, the proxy works
            return []
        targets = [t for g in groups if g.app_name == app_name and str(g.protocol).upper().endswith("HTTP")
                   for t in g.targets]
        if targets or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the replica is running, its server may still be taking its port
    # a replica binds the proxy's host on its own node: all interfaces (reach it at the node's address), or one
    # address such as 127.0.0.1 (reach it there, from that node)
    return sorted({f"http://{t.ip if host in ('0.0.0.0', '::') else host}:{t.port}" for t in targets})


def deploy(cfg: ServeConfig) -> dict:
    """Resolve the model, start Serve's proxy if needed and deploy (or redeploy) the app; returns once it answers.
    Deploying again after promoting another version to the alias swaps the model without dropping requests.
    ``url`` is where to send requests: the replica itself with direct ingress, else the proxy (``proxy_url``)."""
    from equiray_pipelines._ray import init_ray

    import ray

    ref = resolve_model(cfg.model)  # a clear error before anything starts
    options = deployment_options(cfg.serve_config, cfg.app_name) if cfg.serve_config else {}
    proxy_port = cfg.port
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # a fresh local Ray has no Serve yet: fail before starting it, and start it with the ingress asked for:
        # the replica on `port`, the proxy beside it
        port = _check_port(cfg.host, cfg.port)
        if cfg.ingress == "direct":
            proxy_port = _check_port(cfg.host, cfg.proxy_port) if cfg.proxy_port else 0
        os.environ.update(ingress_env(cfg, port))
    # (a Ray that was up already has its replicas' ports: the proxy takes `port`, the replica answers on its own)
    t0 = time.perf_counter()  # warm-up progress: a line per step, so the ~30 s before the URL are not silent
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        say(f"[serve] joining the Ray cluster at {address}" if address else
            "[serve] starting a local Ray instance (~20 s here; RAY_ADDRESS joins a running cluster instead)")
    init_ray()
    if not verbose():  # importing ray.serve set its driver-side logger to INFO ("Started Serve in namespace ...")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    host, port = _start_http(cfg, proxy_port)
    app = build_application(cfg, ref, options)
    say(f"[serve] loading {ref.uri} (version {ref.version}) into its replicas; "
        f"{time.perf_counter() - t0:.0f} s so far")
    try:
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise EquirayError(f"the deployment did not start: {exc}") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proxy_url = f"http://{shown}:{port}{cfg.route_prefix.rstrip('/')}"
    # a cluster joined through RAY_ADDRESS may run direct ingress without this process knowing: ask, not wait
    direct = [u + cfg.route_prefix.rstrip("/") for u in
              replica_urls(cfg.app_name, host, timeout_s=30.0 if direct_ingress(cfg) else 0.0)] \
        if cfg.ingress == "direct" else []
    url = direct[0] if direct else proxy_url
    return {"url": url, "proxy_url": proxy_url, "replica_urls": direct, "ingress": "direct" if direct else "proxy",
            "host": host, "port": urlsplit(url).port, "proxy_port": port, "model": ref.uri, "name": ref.name,
            "version": ref.version, "app": cfg.app_name}


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
    if len(ep["replica_urls"]) > 1:
        say(f"{len(ep['replica_urls'])} replicas answer on their own ports ({', '.join(ep['replica_urls'])}); Serve's "
            f"proxy at {ep['proxy_url']} balances over all of them")
    elif ep["ingress"] == "direct":
        say(f"the replica answers on its own port (direct ingress); Serve's proxy answers too, at {ep['proxy_url']}")
    elif cfg.ingress == "direct":
        say("direct ingress is off on this Ray cluster (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 when it starts switches it "
            "on): requests go through Serve's proxy")
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
                    ep = deploy(cfg)
                    say(f"now serving {ep['model']} version {ep['version']}")
                except EquirayError as exc:
                    say(f"error: {exc} (still serving the previous version)")
    except KeyboardInterrupt:
        pass
    finally:
        # a second SIGINT / SIGTERM while stopping (a process manager's follow-up, an impatient Ctrl+C) must not
        # kill this process halfway and leave Ray behind: the stop is already under way
        for sig in previous:
            signal.signal(sig, lambda *_: None)
        signal.signal(signal.SIGHUP, previous_hup)
        say("shutting down")
        t0 = time.perf_counter()
        stop_serving(STOP_S)
        say(f"stopped in {time.perf_counter() - t0:.1f} s")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ep


# `serve run` gives requests in flight this long to finish before the local Ray is stopped: 4 s, so that stopping
# Ray and the interpreter's exit after it still end within the 10 s a process manager waits before SIGKILL (on a
# busy 2-core machine those took 2-2.5 s, once 6 s in a full CI run: 11.0 s in all with 5 s here; at 8 s a loaded
# run took 10.2 s)
STOP_S = 4.0


def stop_serving(within_s: float) -> None:
    """Stop Serve gracefully (requests in flight finish), and the local Ray this process started with it, within
    ``within_s``: Serve's own shutdown can hang for a minute right after heavy load ("Controller failed to shut
    down within 30.0s"), answering requests meanwhile; past the budget the local instance is stopped outright.
    On a cluster (RAY_ADDRESS) only this app's Serve is shut down, as far as it gets in the budget."""
    import ray

    done = threading.Event()

    def graceful() -> None:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down: say what failed, the hard stop follows
            log.warning("Serve's shutdown failed: %s", exc)
        finally:
            done.set()

    threading.Thread(target=graceful, name="equiray-serve-shutdown", daemon=True).start()
    if not done.wait(within_s):
        say(f"Serve did not stop within {within_s:.0f} s: stopping Ray")
    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():
        ray.shutdown()


def stop(app_name: str | None) -> None:
    """``equiray serve stop``: delete the app on the cluster at RAY_ADDRESS (all of Serve without ``app_name``)."""
    from equiray_pipelines._ray import init_ray

    if not os.environ.get("RAY_ADDRESS"):
        raise EquirayError("set RAY_ADDRESS to the cluster the endpoint runs on (a local endpoint stops with its "
                           "`equiray serve run`)")
    init_ray()
    if serve_running() is None:
        raise EquirayError(f"Serve is not running on {os.environ['RAY_ADDRESS']}")
    shutdown(app_name)

