"""Online serving: Ray Serve hosts a registered equiray model (the ensemble mean, its distilled student, a
canonicalized backbone, any ``models:/NAME@ALIAS``) behind an HTTP API.

    equiray serve run --model models:/equiray-ensemble@champion [--port 8000] [--config configs/serve.yaml]
    serve deploy configs/serve_app.yaml          # the same application on a running cluster

The API (``/docs`` and ``/openapi.json`` describe it):

* ``POST /v1/predict``: one image as a raw ``image/png`` / ``image/jpeg`` body, several as
  ``multipart/form-data`` files, or ``application/json`` ``{"instances": [...]}`` with pixel arrays (or
  ``{"b64": ...}`` images). Answers ``{"predictions": [...]}``, one object per image: ``label``,
  ``class_index``, ``probabilities``; an ensemble's ``disagreement``; a canonicalizer's ``group_element``.
* ``GET /healthz``, ``GET /v1/model`` (name, version, alias, the metrics of the run that registered it).

How it is built: the driver resolves the registry alias to a concrete version and hands it to the replicas as
Serve's ``user_config``; ``reconfigure`` loads it pickle-free (``spec.json`` + safetensors through
``equiray.create_model``) in a background thread and swaps it in atomically. Promoting a new version to the
alias and deploying again therefore changes only ``user_config``: replicas swap the model in place, requests in
flight finish on the old one, none is dropped. Requests are batched with ``@serve.batch`` (batch size and wait
configurable, or off); one forward pass per batch runs on the replica's own inference thread, so the event loop
keeps parsing requests meanwhile; an ensemble's members run as one vectorized call. Every input problem is a
4xx with a JSON ``{"error": {"code", "message"}}``; nothing a client sends can take a replica down.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations at runtime
import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from equiray.config import load_config, to_dict
from equiray.errors import ConfigError, EquirayError
from equiray.inference import (BadInput, InputLimits, decode_image, describe_element, from_array,
                               predict_detailed, to_model_input)

log = logging.getLogger(__name__)

DEPLOYMENT = "EquirayModel"  # the deployment's name in a Serve config's `deployments:` list
IMAGE_TYPES = ("image/png", "image/jpeg")
ACCEPTED_TYPES = (*IMAGE_TYPES, "multipart/form-data", "application/json")


# ----------------------------------------------------------------------------------------------------- config
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
    model: str = "models:/equiray-ensemble@champion"  # models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the endpoint to the network: only behind your own auth
    port: int = 8000  # 0: any free port
    app_name: str = "equiray"
    route_prefix: str = "/"
    # a Serve config file (the format `serve deploy` takes): the `EquirayModel` deployment's replicas,
    # autoscaling_config, ray_actor_options (num_gpus fractions), max_ongoing_requests are applied from it
    serve_config: str | None = None
    batch: BatchConfig = BatchConfig()
    limits: LimitsConfig = LimitsConfig()
    torch_threads: int = 1  # per replica (0: torch's default, all cores)
    access_log: bool = False  # one log line per request from each replica (costly at thousands of requests/s)
    device: str = "auto"  # auto: cuda when the replica was given a GPU (ray_actor_options.num_gpus), else cpu

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port (0 picks a free one)")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.torch_threads < 0:
            raise ConfigError("torch_threads: >= 0 (0: torch's default)")


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

    from pipelines import _tracking

    tracking_uri = tracking_uri or _tracking.tracking_uri()
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


# ----------------------------------------------------------------------------------------------- the replica
class ErrorBody(BaseModel):
    code: str = Field(examples=["bad_image"])
    message: str = Field(examples=["file 'a.png' is a corrupt or truncated PNG (image file is truncated)"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class Prediction(BaseModel):
    label: str = Field(description="the predicted class name")
    class_index: int
    probabilities: dict[str, float] = Field(description="softmax of the model's logits, per class name")
    disagreement: float | None = Field(None, description="ensembles: share of members whose own top class "
                                       "differs from the ensemble's")
    group_element: dict | None = Field(None, description="canonicalized models: the pose the input was turned "
                                       "back from (index, group, rotation_deg, reflection)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: str
    version: str | None


class ModelInfo(BaseModel):
    name: str | None
    version: str | None
    alias: str | None
    uri: str
    run_id: str | None
    kind: str
    input_shape: list[int]
    classes: list[str]
    group: str | None
    members: int | None
    metrics: dict[str, float | None]
    tags: dict[str, str]
    batching: dict
    limits: dict


_PIXELS = {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "array"}]}, "minItems": 1,
           "description": "(H, W), (C, H, W) or (H, W, C) pixel values in [0, 1]"}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}}}},
    "application/json": {"schema": {"type": "object", "required": ["instances"], "properties": {
        "instances": {"type": "array", "minItems": 1, "items": {"anyOf": [
            _PIXELS, {"type": "object", "required": ["b64"], "properties": {
                "b64": {"type": "string", "description": "a base64-encoded PNG or JPEG"}}}]}}}},
        "example": {"instances": [[[0.0, 0.5], [1.0, 0.25]]]}},
}}}
_ERRORS = {400: {"model": ErrorResponse, "description": "the input is not a usable image or array"},
           413: {"model": ErrorResponse, "description": "payload, image or batch too large"},
           415: {"model": ErrorResponse, "description": "unsupported Content-Type"}}

api = FastAPI(title="equiray", version="1", description="Rotation-robust image classifiers from the equiray "
              "registry (augmentation ensembles, distilled students, canonicalized backbones), served by Ray Serve.")


class HTTPProblem(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status)


@dataclass(frozen=True)
class Loaded:
    """One loaded model version; swapped as a whole, so a batch never mixes two versions."""

    model: torch.nn.Module
    input_shape: tuple[int, int, int]
    classes: list[str]
    group: Any
    info: dict
    device: torch.device


def load(user_config: dict, device: torch.device) -> Loaded:
    """Rebuild the version named in ``user_config`` without unpickling (``spec.json`` + safetensors)."""
    import mlflow

    from equiray.canon import CanonicalizedModel
    from equiray.ensembles import StackedEnsemble
    from equiray.groups import get_group
    from pipelines import _tracking

    mlflow.set_tracking_uri(user_config["tracking_uri"])
    ref = user_config["model"]
    model, spec = _tracking.load_model(ref["load_uri"], device=device)
    if "input_shape" not in spec:
        raise EquirayError(f"{ref['uri']}: its spec has no input_shape, so inputs cannot be sized for it")
    kind = ("ensemble" if isinstance(model, StackedEnsemble) else
            "canonicalized" if isinstance(model, CanonicalizedModel) else "model")
    group = model.group if isinstance(model, CanonicalizedModel) else None
    classes = [str(c) for c in (spec.get("classes") or range(spec["num_classes"]))]
    info = {"name": ref["name"], "version": ref["version"], "alias": ref["alias"], "uri": ref["uri"],
            "run_id": ref["run_id"], "kind": kind, "input_shape": list(spec["input_shape"]), "classes": classes,
            "group": group.name if group is not None else spec.get("group"),
            "members": model.num_members if kind == "ensemble" else None,
            "metrics": ref["metrics"], "tags": {k: str(v) for k, v in ref["tags"].items()},
            "batching": user_config["batch"], "limits": user_config["limits"]}
    return Loaded(model, tuple(spec["input_shape"]), classes, group, info, device)


def _predictions(loaded: Loaded, images: list[torch.Tensor]) -> list[dict]:
    x = to_model_input(images, loaded.input_shape).to(loaded.device)  # (B, C, H, W)
    out = predict_detailed(loaded.model, x)
    probs = out.probabilities.cpu().tolist()
    rows = []
    for i, p in enumerate(probs):
        k = max(range(len(p)), key=p.__getitem__)
        row = {"label": loaded.classes[k], "class_index": k, "probabilities": dict(zip(loaded.classes, p))}
        if out.disagreement is not None:
            row["disagreement"] = float(out.disagreement[i])
        if out.element is not None:
            row["group_element"] = describe_element(loaded.group, int(out.element[i]))
        rows.append(row)
    return rows


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPProblem(413, "payload_too_large", f"the body is {int(declared)} bytes; at most {limit}")
        except ValueError:
            raise HTTPProblem(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPProblem(413, "payload_too_large", f"the body is over {limit} bytes")
    return bytes(body)


# Everything the replica class uses is defined above it: Serve serializes the class where it is decorated.
@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, graceful_shutdown_timeout_s=30,
                  max_constructor_retry_count=3, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class EquirayModel:
    """One replica: HTTP parsing and validation in the event loop, forward passes on one inference thread."""

    def __init__(self, torch_threads: int = 1, device: str = "auto"):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="equiray-forward")
        self._loaded: Loaded | None = None
        self._config: dict = {}
        self._swap = asyncio.Lock()

    async def reconfigure(self, user_config: dict) -> None:
        """Called by Serve with the model version and batching (at start, and on every redeploy that changes
        them): the new version is loaded beside the old one, which answers until the swap."""
        async with self._swap:
            same_model = self._loaded is not None and self._config.get("model") == user_config["model"]
            if not same_model:
                loop = asyncio.get_running_loop()
                loaded = await loop.run_in_executor(None, load, user_config, self._device)
            else:
                loaded = dataclasses.replace(self._loaded, info={**self._loaded.info, "batching": user_config["batch"],
                                                                 "limits": user_config["limits"]})
            batch = user_config["batch"]
            self._predict_batched.set_max_batch_size(batch["max_batch_size"])
            self._predict_batched.set_batch_wait_timeout_s(batch["wait_timeout_s"])
            self._config, self._loaded = user_config, loaded
            self._limits = LimitsConfig(**user_config["limits"])
            log.info("serving %s (version %s)", loaded.info["uri"], loaded.info["version"])

    # ------------------------------------------------------------------------------------------ endpoints
    @api.get("/healthz", summary="liveness and the model version being served")
    async def healthz(self) -> dict:
        info = self._loaded.info
        return {"status": "ok", "model": info["name"] or info["uri"], "version": info["version"]}

    @api.get("/v1/model", response_model=ModelInfo, summary="the model being served and how it was registered")
    async def model_info(self):
        return JSONResponse(self._loaded.info)

    @api.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=PREDICT_BODY,
              summary="classify one or more images",
              description="A raw image/png or image/jpeg body (one image), multipart/form-data files (several), or "
              "application/json {\"instances\": [...]} with pixel arrays in [0, 1] or {\"b64\": ...} images. "
              "Images are converted to the model's channels and resized to its input size.")
    async def predict(self, request: Request):
        try:
            images = await self._read_images(request)
            if self._config["batch"]["enabled"]:
                answer = await self._predict_batched(images)
            else:
                answer = (await self._run(self._loaded, [images]))[0]
            if isinstance(answer, Exception):
                raise answer
        except HTTPProblem as problem:
            return problem.response()
        except BadInput as exc:
            return HTTPProblem(400, "bad_input", str(exc)).response()
        return JSONResponse(answer)

    # ------------------------------------------------------------------------------------------ inference
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_batched(self, requests: list[list[torch.Tensor]]) -> list:
        return await self._run(self._loaded, requests)

    async def _run(self, loaded: Loaded, requests: list[list[torch.Tensor]]) -> list:
        """One forward pass for all images of all ``requests`` on the inference thread; per request its answer
        (predictions and the version that made them) or the :class:`BadInput` that request alone caused."""
        ok = []
        results: list = [None] * len(requests)
        for i, images in enumerate(requests):
            bad = next((img for img in images if img.shape[0] != loaded.input_shape[0]), None)
            if bad is not None:  # only possible across a swap to a model with other channels
                results[i] = BadInput(f"an image has {bad.shape[0]} channels; this model takes {loaded.input_shape[0]}")
            else:
                ok.append(i)
        flat = [img for i in ok for img in requests[i]]
        if flat:
            rows = await asyncio.get_running_loop().run_in_executor(self._forward, _predictions, loaded, flat)
            start = 0
            model = loaded.info["name"] or loaded.info["uri"]
            for i in ok:
                results[i] = {"predictions": rows[start:start + len(requests[i])], "model": model,
                              "version": loaded.info["version"]}
                start += len(requests[i])
        return results

    # ------------------------------------------------------------------------------------------ parsing
    async def _read_images(self, request: Request) -> list[torch.Tensor]:
        limits = self._limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise HTTPProblem(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not accepted: "
                              "send image/png or image/jpeg (one image), multipart/form-data (files) or "
                              "application/json ({\"instances\": [...]})")
        body = await _read_body(request, limits.max_payload_bytes)
        in_chans = self._loaded.input_shape[0]
        image_limits = InputLimits(limits.max_side, limits.max_pixels)
        if ctype in IMAGE_TYPES:
            images = [decode_image(body, in_chans=in_chans, limits=image_limits, what="the request body")]
        elif ctype == "application/json":
            images = self._from_json(body, in_chans, image_limits)
        else:
            images = await self._from_multipart(request, body, in_chans, image_limits)
        if not images:
            raise HTTPProblem(400, "empty_batch", "the request holds no image")
        return images

    def _from_json(self, body: bytes, in_chans: int, image_limits: InputLimits) -> list[torch.Tensor]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPProblem(400, "bad_json", f"the body is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or "instances" not in doc:
            raise HTTPProblem(400, "bad_json", "expected a JSON object {\"instances\": [...]}")
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise HTTPProblem(400, "bad_json", "\"instances\" must be a list of pixel arrays or {\"b64\": ...}")
        if not instances:
            raise HTTPProblem(400, "empty_batch", "\"instances\" is empty")
        self._check_count(len(instances))
        images = []
        for i, inst in enumerate(instances):
            if isinstance(inst, dict):
                if not isinstance(inst.get("b64"), str):
                    raise BadInput(f"instance {i}: an object instance must be {{\"b64\": \"<base64 PNG/JPEG>\"}}")
                try:
                    data = base64.b64decode(inst["b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise BadInput(f"instance {i}: \"b64\" is not valid base64") from None
                images.append(decode_image(data, in_chans=in_chans, limits=image_limits, what=f"instance {i}"))
            else:
                images.append(from_array(inst, in_chans=in_chans, limits=image_limits, what=f"instance {i}"))
        return images

    async def _from_multipart(self, request: Request, body: bytes, in_chans: int, image_limits: InputLimits):
        request._body = body  # starlette reads the (already size-checked) cached body
        try:
            form = await request.form(max_files=self._limits.max_images + 1, max_fields=100)
        except Exception as exc:  # noqa: BLE001 - starlette's parser raises several kinds for malformed bodies
            raise HTTPProblem(400, "bad_multipart", f"the multipart/form-data body cannot be parsed ({exc})") from None
        try:
            files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
            self._check_count(len(files))
            images = []
            for key, f in files:
                data = await f.read()
                images.append(decode_image(data, in_chans=in_chans, limits=image_limits,
                                           what=f"file {f.filename or key!r}"))
            return images
        finally:
            await form.close()

    def _check_count(self, n: int) -> None:
        if n > self._limits.max_images:
            raise HTTPProblem(413, "too_many_images", f"{n} images in one request; at most {self._limits.max_images}")


# ------------------------------------------------------------------------------------------------ building
def user_config(cfg: ServeConfig, ref: ModelRef) -> dict:
    from pipelines import _tracking

    return {"model": dataclasses.asdict(ref), "tracking_uri": _tracking.tracking_uri(),
            "batch": to_dict(cfg.batch), "limits": to_dict(cfg.limits)}


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
def _serve_running() -> Any | None:
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

    controller = _serve_running()
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
    print(f"serving {ep['model']} (version {ep['version']}) at {ep['url']}  [{time.perf_counter() - t0:.0f} s to start]")
    print(curl_examples(ep["url"]), flush=True)
    if detach:
        print(f"detached: stop it with `equiray serve stop --app {cfg.app_name}` (RAY_ADDRESS={os.environ['RAY_ADDRESS']})")
        return ep
    stop, reload = threading.Event(), threading.Event()
    # Ctrl+C (SIGINT) and SIGTERM stop it; handlers of our own, so that a shell that started it in the background
    # (where SIGINT is ignored) or a process manager can still stop it cleanly
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hup = signal.signal(signal.SIGHUP, lambda *_: reload.set())
    print(f"press Ctrl+C to stop; `kill -HUP {os.getpid()}` re-reads the alias and swaps in its version", flush=True)
    try:
        while not stop.wait(1.0):
            if reload.is_set():
                reload.clear()
                try:
                    ep = deploy(dataclasses.replace(cfg, port=ep["port"]))
                    print(f"now serving {ep['model']} version {ep['version']}", flush=True)
                except EquirayError as exc:
                    print(f"error: {exc} (still serving the previous version)", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGHUP, previous_hup)
        print("shutting down", flush=True)
        serve.shutdown()
    return ep


def stop(app_name: str | None) -> None:
    """``equiray serve stop``: delete the app on the cluster at RAY_ADDRESS (all of Serve without ``app_name``)."""
    from pipelines._ray import init_ray

    if not os.environ.get("RAY_ADDRESS"):
        raise EquirayError("set RAY_ADDRESS to the cluster the endpoint runs on (a local endpoint stops with its "
                           "`equiray serve run`)")
    init_ray()
    if _serve_running() is None:
        raise EquirayError(f"Serve is not running on {os.environ['RAY_ADDRESS']}")
    shutdown(app_name)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("serve", argv)


if __name__ == "__main__":
    raise SystemExit(main())
