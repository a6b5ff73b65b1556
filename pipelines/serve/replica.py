"""One replica of the ``EquirayModel`` deployment: it loads the registered version it is given (pickle-free:
``spec.json`` + safetensors through ``equiray.create_model``), swaps it in atomically on every ``reconfigure``,
parses requests in the event loop and runs the forward passes of dynamic batches on its own inference thread."""
# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations at runtime
import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from equiray.errors import EquirayError
from equiray.inference import BadInput, describe_element, predict_detailed, to_model_input
from equiray_pipelines.serve.api import (ERRORS, PREDICT_BODY, HTTPProblem, ModelInfo, PredictResponse, api,
                                         content_type, decode_images, read_body)
from equiray_pipelines.serve.config import DEPLOYMENT, LimitsConfig
from equiray_pipelines.tracking import TEMPERATURE_TAG

log = logging.getLogger(__name__)


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

    from equiray.canon import canonicalized_in
    from equiray.ensembles import StackedEnsemble
    from equiray.models import Mixture
    from equiray_pipelines import tracking

    mlflow.set_tracking_uri(user_config["tracking_uri"])
    ref = user_config["model"]
    model, spec = tracking.load_model(ref["load_uri"], device=device)
    if "input_shape" not in spec:
        raise EquirayError(f"{ref['uri']}: its spec has no input_shape, so inputs cannot be sized for it")
    kind = ("ensemble" if isinstance(model, StackedEnsemble) else "mixture" if isinstance(model, Mixture) else
            "canonicalized" if canonicalized_in(model) is not None else "model")
    # the group of the canonicalized model, or of a mixture's canonicalized member (whose pose the answers carry)
    canon = next((c for m in (model.members if kind == "mixture" else [model])
                  if (c := canonicalized_in(m)) is not None), None)
    group = canon.group if canon is not None else None
    classes = [str(c) for c in (spec.get("classes") or range(spec["num_classes"]))]
    info = {"name": ref["name"], "version": ref["version"], "alias": ref["alias"], "uri": ref["uri"],
            "run_id": ref["run_id"], "kind": kind, "input_shape": list(spec["input_shape"]), "classes": classes,
            "group": group.name if group is not None else spec.get("group"),
            "members": model.num_members if kind == "ensemble" else len(model.members) if kind == "mixture" else None,
            "metrics": ref["metrics"], "tags": {k: str(v) for k, v in ref["tags"].items()},
            # the registered version's fitted softmax temperature (1: uncalibrated)
            "temperature": float(ref["tags"].get(TEMPERATURE_TAG, 1.0)), "min_confidence": user_config.get("min_confidence", 0.0),
            "batching": user_config["batch"], "limits": user_config["limits"]}
    return Loaded(model, tuple(spec["input_shape"]), classes, group, info, device)


def _predictions(loaded: Loaded, images: list[torch.Tensor]) -> list[dict]:
    x = to_model_input(images, loaded.input_shape).to(loaded.device)  # (B, C, H, W)
    out = predict_detailed(loaded.model, x, temperature=loaded.info["temperature"])
    probs = out.probabilities.cpu().tolist()
    floor = loaded.info["min_confidence"]
    rows = []
    for i, p in enumerate(probs):
        k = max(range(len(p)), key=p.__getitem__)
        row = {"label": loaded.classes[k], "class_index": k, "confidence": p[k], "abstain": p[k] < floor,
               "probabilities": dict(zip(loaded.classes, p))}
        if out.disagreement is not None:
            row["disagreement"] = float(out.disagreement[i])
        if out.element is not None:
            row["group_element"] = describe_element(loaded.group, int(out.element[i]))
            row["pose_deg"] = round(float(out.pose_deg[i]), 2)
        rows.append(row)
    return rows


# Serve serializes the class where it is decorated: everything it uses is defined above it or imported.
@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, graceful_shutdown_timeout_s=5,
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
                                                                 "min_confidence": user_config.get("min_confidence", 0.0),
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

    @api.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
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
        ctype = content_type(request)
        body = await read_body(request, limits.max_payload_bytes)
        return await decode_images(request, ctype, body, in_chans=self._loaded.input_shape[0], limits=limits)
