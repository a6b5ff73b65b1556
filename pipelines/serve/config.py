"""The endpoint's settings (``equiray serve run --config``, ``configs/serve.yaml``, the ``args`` of a Serve config's
application) and the ``EquirayModel`` deployment's options read from a Serve config file (``--serve-config``)."""

import os
from dataclasses import dataclass
from typing import Any

from equiray.errors import ConfigError

DEPLOYMENT = "EquirayModel"  # the deployment's name in a Serve config's `deployments:` list
INGRESS = ("direct", "proxy")


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching (``@serve.batch``): requests that arrive within ``wait_timeout_s`` of each other share
    one forward pass, up to ``max_batch_size`` requests. ``enabled: false`` runs every request on its own."""

    enabled: bool = True
    max_batch_size: int = 32
    wait_timeout_s: float = 0.005

    def __post_init__(self):
        if self.max_batch_size < 1 or not 0 <= self.wait_timeout_s <= 10:
            raise ConfigError("batch: max_batch_size >= 1 and 0 <= wait_timeout_s <= 10")


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may hold; larger ones get 413, before anything is decoded."""

    max_payload_bytes: int = 8 * 2**20
    max_images: int = 64
    max_side: int = 1024  # pixels, either dimension of one image
    max_pixels: int = 1024 * 1024  # height x width of one image

    def __post_init__(self):
        if min(self.max_payload_bytes, self.max_images, self.max_side, self.max_pixels) < 1:
            raise ConfigError("limits: every limit must be >= 1")


@dataclass(frozen=True)
class ServeConfig:
    model: str = "models:/equiray-robust@champion"  # models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the endpoint to the network: only behind your own auth
    port: int = 8000  # 0: any free port
    # direct: the replica takes HTTP itself on `port` (a second replica on the same node on port+1, ...), Serve's
    # proxy listens on `proxy_port` beside it; proxy: every request goes through Serve's proxy on `port`, which
    # balances over all replicas on all nodes (what several replicas behind one address need). Direct ingress is
    # switched on when Ray starts: a cluster that RAY_ADDRESS names serves the way it was started (cluster.yaml).
    ingress: str = "direct"
    proxy_port: int = 0  # ingress: direct only; 0: any free port
    app_name: str = "equiray"
    route_prefix: str = "/"
    # a Serve config file (the format `serve deploy` takes): the `EquirayModel` deployment's replicas,
    # autoscaling_config, ray_actor_options (num_gpus fractions), max_ongoing_requests are applied from it
    serve_config: str | None = None
    batch: BatchConfig = BatchConfig()
    limits: LimitsConfig = LimitsConfig()
    # an answer whose top probability (after the model's fitted temperature) is below this says "abstain": true
    min_confidence: float = 0.0
    torch_threads: int = 1  # per replica (0: torch's default, all cores)
    access_log: bool = False  # one log line per request from each replica (costly at thousands of requests/s)
    device: str = "auto"  # auto: cuda when the replica was given a GPU (ray_actor_options.num_gpus), else cpu

    def __post_init__(self):
        for key in ("port", "proxy_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise ConfigError(f"{key}: {getattr(self, key)} is not a TCP port (0 picks a free one)")
        if self.ingress not in INGRESS:
            raise ConfigError(f"ingress: {self.ingress!r} is not one of {', '.join(INGRESS)} (direct: the replica "
                              "answers on its own port, fastest; proxy: through Serve's proxy, for several replicas "
                              "behind one address)")
        if self.ingress == "direct" and self.port and self.port == self.proxy_port:
            raise ConfigError(f"proxy_port: {self.proxy_port} is the replica's own port with ingress: direct; "
                              "choose another (0 picks a free one)")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"min_confidence: a probability in [0, 1], not {self.min_confidence}")
        if self.torch_threads < 0:
            raise ConfigError("torch_threads: >= 0 (0: torch's default)")



def deployment_options(path: str | os.PathLike, app_name: str) -> dict:
    """The ``EquirayModel`` deployment's options from a Serve config file (validated with Serve's own schema,
    the one ``serve deploy`` uses): ``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ..."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(open(path))
    except FileNotFoundError:
        raise ConfigError(f"serve_config: {str(path)!r} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"serve_config: {str(path)!r} is not valid YAML: {exc}") from None
    _check_keys(raw, path)
    try:
        schema = ServeDeploySchema.parse_obj(raw)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError (v1 or v2, depending on Ray's shim)
        first = str(exc).strip().splitlines()
        raise ConfigError(f"serve_config: {path} is not a valid Serve config: {' '.join(first[:4])}") from None
    apps = [a for a in schema.applications if a.name == app_name] or (
        schema.applications if len(schema.applications) == 1 else [])
    if not apps:
        raise ConfigError(f"serve_config: {path} has no application named {app_name!r}")
    deployments = [d for d in apps[0].deployments if d.name == DEPLOYMENT]
    if not deployments:
        return {}
    opts = deployments[0].dict(exclude_unset=True)
    opts.pop("name", None)
    if "user_config" in opts:
        raise ConfigError(f"serve_config: {path}: {DEPLOYMENT}'s user_config is set by equiray (the model and "
                          "batching come from the app's args / configs/serve.yaml)")
    return opts


def _check_keys(raw: Any, path) -> None:
    """Serve's schema ignores unknown keys (a typo such as ``num_replicaz`` would silently do nothing): refuse them."""
    import difflib

    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def fields(cls) -> list[str]:
        return list(getattr(cls, "model_fields", None) or cls.__fields__)

    def check(node: Any, cls, where: str) -> None:
        if not isinstance(node, dict):
            return
        known = fields(cls)
        for key in node:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"serve_config: {path}: unknown key {where + str(key)!r}{hint}")

    check(raw, ServeDeploySchema, "")
    for i, app in enumerate((raw or {}).get("applications") or []):
        check(app, ServeApplicationSchema, f"applications[{i}].")
        for j, dep in enumerate((app or {}).get("deployments") or []):
            check(dep, DeploymentSchema, f"applications[{i}].deployments[{j}].")

