"""Online serving: Ray Serve hosts a registered equiray model (the ensemble mean, its distilled student, a
canonicalized backbone, any ``models:/NAME@ALIAS``) behind an HTTP API.

    equiray serve run [--model models:/equiray-robust@champion] [--port 8000] [--config configs/serve.yaml]
    serve deploy configs/serve_app.yaml          # the same application on a running cluster

The API (``/docs`` and ``/openapi.json`` describe it):

* ``POST /v1/predict``: one image as a raw ``image/png`` / ``image/jpeg`` body, several as
  ``multipart/form-data`` files, or ``application/json`` ``{"instances": [...]}`` with pixel arrays (or
  ``{"b64": ...}`` images). Answers ``{"predictions": [...]}``, one object per image: ``label``,
  ``class_index``, ``probabilities``; an ensemble's ``disagreement``; a canonicalizer's ``group_element``.
* ``GET /healthz``, ``GET /v1/model`` (name, version, alias, the metrics of the run that registered it).
* ``/docs`` (Swagger UI) and ``/redoc`` work offline: their scripts are served by the endpoint, not a CDN.

Where requests arrive: with ``ingress: direct`` (the default) the replica takes HTTP itself, on ``port`` (Ray
Serve's direct ingress, switched on when equiray starts a local Ray); Serve's proxy listens beside it on
``proxy_port``. The proxy hop is what capped the endpoint near 250 requests/s on 2 cores. Several replicas on one
node take ``port``, ``port+1``, ...; one address in front of all of them is the proxy's (``ingress: proxy``, what
``jobs/configs/serve.yaml`` uses on the cluster) or a load balancer's.

How it is built: the driver resolves the registry alias to a concrete version and hands it to the replicas as
Serve's ``user_config``; ``reconfigure`` loads it pickle-free (``spec.json`` + safetensors through
``equiray.create_model``) in a background thread and swaps it in atomically. Promoting a new version to the
alias and deploying again therefore changes only ``user_config``: replicas swap the model in place, requests in
flight finish on the old one, none is dropped. Requests are batched with ``@serve.batch`` (batch size and wait
configurable, or off); one forward pass per batch runs on the replica's own inference thread, so the event loop
keeps parsing requests meanwhile; an ensemble's members run as one vectorized call. Every input problem is a
4xx with a JSON ``{"error": {"code", "message"}}``; nothing a client sends can take a replica down.

The package, one concept a module: :mod:`~equiray_pipelines.serve.config` (the settings and the Serve config file's
deployment options), :mod:`~equiray_pipelines.serve.api` (the HTTP schemas, errors and request decoding),
:mod:`~equiray_pipelines.serve.replica` (the ``EquirayModel`` deployment) and
:mod:`~equiray_pipelines.serve.endpoint` (resolving, building, deploying, ``serve run`` / ``serve stop``). A Serve config names the application builder as
``import_path: equiray_pipelines.serve:build_app``.
"""
from equiray_pipelines.serve.api import (ACCEPTED_TYPES, IMAGE_TYPES, PREDICT_BODY, ErrorBody, ErrorResponse,
                                         HTTPProblem, ModelInfo, Prediction, PredictResponse, api)
from equiray_pipelines.serve.config import DEPLOYMENT, BatchConfig, LimitsConfig, ServeConfig, deployment_options

# Ray Serve (ray.serve, a second or more to import) is loaded when a name that needs it is first used, so the CLI's
# `--help`, config checks and the stages that only read ServeConfig do not pay for it.
_LAZY = {**dict.fromkeys(("ModelRef", "build_app", "build_application", "curl_examples", "deploy", "resolve_model",
                          "serve_running", "shutdown", "stop", "user_config"), "equiray_pipelines.serve.endpoint"),
         **dict.fromkeys(("EquirayModel", "Loaded", "load"), "equiray_pipelines.serve.replica")}


def run(*args, **kwargs):
    """``equiray serve run`` (:func:`equiray_pipelines.serve.endpoint.run`), defined here so that the CLI's catalog
    names it without importing Ray Serve."""
    from equiray_pipelines.serve.endpoint import run as run_endpoint

    return run_endpoint(*args, **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ACCEPTED_TYPES", "DEPLOYMENT", "IMAGE_TYPES", "PREDICT_BODY", "BatchConfig", "EquirayModel", "ErrorBody",
           "ErrorResponse", "HTTPProblem", "LimitsConfig", "Loaded", "ModelInfo", "ModelRef", "Prediction",
           "PredictResponse", "ServeConfig", "api", "build_app", "build_application", "curl_examples", "deploy",
           "deployment_options", "load", "resolve_model", "run", "serve_running", "shutdown", "stop", "user_config"]
