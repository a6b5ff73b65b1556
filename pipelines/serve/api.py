"""The HTTP side of the endpoint: the OpenAPI schemas (``/docs``), the JSON errors every input problem becomes,
and the decoding of a request into images (raw PNG/JPEG body, multipart files, JSON pixel arrays or base64)."""
# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations at runtime
import base64
import binascii
import json
from typing import AsyncIterator

import torch
from fastapi import Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from equiray.inference import BadInput, InputLimits, decode_image, from_array
from equiray_pipelines.serve.config import LimitsConfig

IMAGE_TYPES = ("image/png", "image/jpeg")
ACCEPTED_TYPES = (*IMAGE_TYPES, "multipart/form-data", "application/json")


class ErrorBody(BaseModel):
    code: str = Field(examples=["bad_image"])
    message: str = Field(examples=["file 'a.png' is a corrupt or truncated PNG (image file is truncated)"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class Prediction(BaseModel):
    label: str = Field(description="the predicted class name")
    class_index: int
    confidence: float = Field(description="the predicted class's probability")
    abstain: bool = Field(description="confidence below the endpoint's min_confidence (never, when it is 0)")
    probabilities: dict[str, float] = Field(description="softmax of the model's logits divided by its fitted "
                                            "temperature (calibrated; 1 for an uncalibrated model), per class name")
    disagreement: float | None = Field(None, description="ensembles and mixtures: share of members whose own top "
                                       "class differs from the whole's")
    group_element: dict | None = Field(None, description="canonicalized models (and mixtures with a canonicalized "
                                       "member): the pose the input was turned back from (index, group, "
                                       "rotation_deg, reflection)")
    pose_deg: float | None = Field(None, description="canonicalized models (and mixtures with a canonicalized "
                                   "member): the angle the input was turned back by, "
                                   "degrees counter-clockwise in [0, 360) (continuous for a continuous pose)")


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
    temperature: float
    min_confidence: float
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
ERRORS = {400: {"model": ErrorResponse, "description": "the input is not a usable image or array"},
           413: {"model": ErrorResponse, "description": "payload, image or batch too large"},
           415: {"model": ErrorResponse, "description": "unsupported Content-Type"}}

# FastAPIOffline: /docs (Swagger UI) and /redoc load their scripts from the package, not from a CDN, so the
# documentation works on a machine without internet (a cluster head, an air-gapped server)
api = FastAPIOffline(title="equiray", version="1", description="Rotation-robust image classifiers from the equiray "
              "registry (augmentation ensembles, distilled students, canonicalized backbones), served by Ray Serve.")


class HTTPProblem(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status)



# ------------------------------------------------------------------------------------------ request decoding
def content_type(request: Request) -> str:
    """The request's media type, refused with 415 unless it is one the endpoint reads."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ACCEPTED_TYPES:
        raise HTTPProblem(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not accepted: "
                          "send image/png or image/jpeg (one image), multipart/form-data (files) or "
                          "application/json ({\"instances\": [...]})")
    return ctype


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPProblem(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            await _discard(request.stream(), DRAIN_FACTOR * limit)
            raise HTTPProblem(413, "payload_too_large", f"the body is {size} bytes; at most {limit}")
    body = bytearray()
    stream = request.stream()
    async for chunk in stream:
        body += chunk
        if len(body) > limit:
            await _discard(stream, DRAIN_FACTOR * limit - len(body))
            raise HTTPProblem(413, "payload_too_large", f"the body is over {limit} bytes")
    return bytes(body)


DRAIN_FACTOR = 8  # an oversized body up to this many times the limit is read (and dropped) before the 413


async def _discard(stream: AsyncIterator[bytes], at_most: int) -> None:
    """Read what is left of the body without keeping it: a server that answers before the client has sent its
    whole body closes a connection the client is still writing to, and the client sees a reset instead of the
    413 (what a 16 MB body got). Bodies beyond ``at_most`` are cut off there."""
    seen = 0
    try:
        async for chunk in stream:
            seen += len(chunk)
            if seen > at_most:
                return
    except Exception:  # noqa: BLE001 - the stream was consumed already, or the client went away: nothing to drain
        return


async def decode_images(request: Request, ctype: str, body: bytes, *, in_chans: int,
                        limits: LimitsConfig) -> list[torch.Tensor]:
    """The images of a request whose (size-checked) ``body`` has media type ``ctype``, as ``in_chans``-channel
    tensors; every problem is an :class:`HTTPProblem` or a :class:`BadInput` (a 400)."""
    image_limits = InputLimits(limits.max_side, limits.max_pixels)
    if ctype in IMAGE_TYPES:
        images = [decode_image(body, in_chans=in_chans, limits=image_limits, what="the request body")]
    elif ctype == "application/json":
        images = from_json(body, in_chans, image_limits, max_images=limits.max_images)
    else:
        images = await from_multipart(request, body, in_chans, image_limits, max_images=limits.max_images)
    if not images:
        raise HTTPProblem(400, "empty_batch", "the request holds no image")
    return images


def from_json(body: bytes, in_chans: int, image_limits: InputLimits, *, max_images: int) -> list[torch.Tensor]:
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
    check_count(len(instances), max_images)
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


async def from_multipart(request: Request, body: bytes, in_chans: int, image_limits: InputLimits, *,
                         max_images: int) -> list[torch.Tensor]:
    request._body = body  # starlette reads the (already size-checked) cached body
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except Exception as exc:  # noqa: BLE001 - starlette's parser raises several kinds for malformed bodies
        raise HTTPProblem(400, "bad_multipart", f"the multipart/form-data body cannot be parsed ({exc})") from None
    try:
        files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
        check_count(len(files), max_images)
        images = []
        for key, f in files:
            data = await f.read()
            images.append(decode_image(data, in_chans=in_chans, limits=image_limits,
                                       what=f"file {f.filename or key!r}"))
        return images
    finally:
        await form.close()


def check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise HTTPProblem(413, "too_many_images", f"{n} images in one request; at most {max_images}")
