"""Inference on untrusted inputs: decode image bytes and pixel arrays safely, and predict with what each kind of
model can say about its answer (an ensemble's member disagreement, a canonicalizer's chosen group element).

Plain PyTorch + Pillow, no Ray: the Serve endpoint (``equiray_pipelines.serve``) is built on these, and they are what a
test compares the endpoint with. Every problem with an input is a :class:`BadInput` whose message names the
image and what was wrong, so a server can answer 400 with it.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.errors import EquirayError

__all__ = ["BadInput", "InputLimits", "Detailed", "decode_image", "from_array", "to_model_input",
           "predict_detailed", "describe_element"]

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}


class BadInput(EquirayError):
    """An input cannot be used (not an image, truncated, wrong shape, NaN, too large); the message says why."""


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """Bounds on one input image, checked before any pixel is decoded (a PNG header can claim 60,000 x 60,000)."""

    max_side: int = 1024  # pixels, either dimension
    max_pixels: int = 1024 * 1024  # height x width

    def check(self, height: int, width: int, what: str) -> None:
        if height < 1 or width < 1:
            raise BadInput(f"{what} is empty ({height} x {width} pixels)")
        if max(height, width) > self.max_side or height * width > self.max_pixels:
            raise BadInput(f"{what} is {height} x {width} pixels; at most {self.max_side} per side and "
                           f"{self.max_pixels} pixels in all are accepted")


def decode_image(data: bytes, *, in_chans: int, limits: InputLimits = InputLimits(), what: str = "image"
                 ) -> torch.Tensor:
    """PNG or JPEG bytes -> ``(C, H, W)`` float in [0, 1] with ``C = in_chans`` (colour converted to grey or
    grey to RGB, as Pillow does). The size is checked from the header before decoding; truncated files fail."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInput(f"{what} is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise BadInput(f"{what} is not a PNG or JPEG image ({len(data)} bytes starting {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"{what} cannot be read as an image: {exc}") from None
    width, height = img.size
    limits.check(height, width, what)
    try:
        img.load()  # the whole file: a truncated PNG/JPEG raises here (Pillow's LOAD_TRUNCATED_IMAGES is off)
        img = img.convert("L" if in_chans == 1 else "RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        raise BadInput(f"{what} is a corrupt or truncated {img.format} ({exc})") from None
    if in_chans not in (1, 3):
        raise BadInput(f"this model takes {in_chans}-channel inputs: send them as pixel arrays, not {img.format}")
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]  # (H, W, 1)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)  # (C, H, W)


def from_array(values: Any, *, in_chans: int, limits: InputLimits = InputLimits(), what: str = "instance"
               ) -> torch.Tensor:
    """A nested list of pixel values (what ``{"instances": [...]}`` carries) -> ``(C, H, W)`` float tensor.

    Accepted shapes: ``(H, W)`` for one-channel models, ``(C, H, W)`` or ``(H, W, C)`` with ``C = in_chans``;
    values are the model's input scale, floats in [0, 1]; NaN, infinities and other ranges are refused."""
    try:
        arr = np.array(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise BadInput(f"{what} is not a rectangular array of numbers") from None
    if arr.ndim == 2 and in_chans == 1:
        arr = arr[None]  # (1, H, W)
    elif arr.ndim == 3 and arr.shape[0] == in_chans:
        pass
    elif arr.ndim == 3 and arr.shape[2] == in_chans:
        arr = arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    else:
        accepted = "(H, W), " if in_chans == 1 else ""
        raise BadInput(f"{what} has shape {tuple(arr.shape)}; this model takes {accepted}({in_chans}, H, W) or "
                       f"(H, W, {in_chans}) pixel arrays")
    limits.check(arr.shape[1], arr.shape[2], what)
    if not np.isfinite(arr).all():
        raise BadInput(f"{what} holds NaN or infinite values")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 1:
        hint = " (divide 0-255 values by 255)" if high <= 255 and low >= 0 else ""
        raise BadInput(f"{what} has values in [{low:g}, {high:g}]; pixel values must be in [0, 1]{hint}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_model_input(images: Sequence[torch.Tensor], input_shape: Sequence[int]) -> torch.Tensor:
    """``(C, H, W)`` images of any size -> one ``(B, C, H', W')`` batch at the model's input size: area averaging
    to shrink, bilinear to enlarge (the resampling the pipelines use for ``data.resize``)."""
    c, h, w = (int(s) for s in input_shape)
    out = []
    for img in images:
        if img.shape[0] != c:
            raise BadInput(f"an image has {img.shape[0]} channels; this model takes {c}")
        if tuple(img.shape[-2:]) != (h, w):
            mode = "area" if img.shape[-1] > w else "bilinear"
            img = F.interpolate(img[None], size=(h, w), mode=mode)[0]
        out.append(img)
    return torch.stack(out)  # (B, C, H, W)


@dataclasses.dataclass(frozen=True)
class Detailed:
    """A batch's predictions with what the model can say about them.

    ``logits`` (B, K) are what the model's ``forward`` returns; ``probabilities`` their softmax (B, K);
    ``disagreement`` (B,), ensembles and mixtures only: the share of members whose own top class differs from the
    whole's; ``element`` (B,), canonicalized models (and mixtures with a canonicalized member) only: the group
    element each input was turned back from; ``pose_deg`` (B,), the same models only: the angle each input was
    turned back by, in degrees in [0, 360) counter-clockwise (the continuous angle with ``pose="angle"``, else the
    element's rotation)."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    disagreement: torch.Tensor | None = None
    element: torch.Tensor | None = None
    pose_deg: torch.Tensor | None = None


def predict_detailed(model: nn.Module, x: torch.Tensor, *, temperature: float = 1.0) -> Detailed:
    """One forward pass of ``model`` on ``x`` (B, C, H, W). An ensemble runs all its members in one vectorized
    call (:meth:`~equiray.ensembles.StackedEnsemble.member_logits`) and averages them, as its ``forward`` does.
    ``probabilities`` are ``softmax(logits / temperature)`` (a calibrated model's fitted temperature; after the
    members are averaged for an ensemble); ``logits`` stay as the model returned them."""
    from equiray.canon import canonicalized_in
    from equiray.ensembles import StackedEnsemble
    from equiray.models import Mixture

    disagreement = element = pose = None
    with torch.inference_mode():
        if isinstance(model, StackedEnsemble):
            members = model.member_logits(x)  # (N, B, K)
            logits = members.mean(0)  # (B, K)
            disagreement = (members.argmax(-1) != logits.argmax(-1)).float().mean(0)  # (B,)
        elif (canon := canonicalized_in(model)) is not None:  # (or a test-time average of one)
            logits, info = model.forward_with_info(x)
            element, pose = info.element, info.degrees(canon.group)
        elif isinstance(model, Mixture):  # each member once; a canonicalized member tells its pose
            member_logp = []
            for m in model.members:
                if (canon := canonicalized_in(m)) is not None and pose is None:
                    out, info = m.forward_with_info(x)
                    element, pose = info.element, info.degrees(canon.group)
                else:
                    out = m(x)
                member_logp.append(out.float().log_softmax(-1))
            members = torch.stack(member_logp)  # (N, B, K)
            logits = model.mix(members)
            disagreement = (members.argmax(-1) != logits.argmax(-1)).float().mean(0)
        else:
            logits = model(x)
        return Detailed(logits, (logits.float() / temperature).softmax(-1), disagreement, element, pose)


def describe_element(group, element: int) -> dict:
    """A group element as a client reads it: its index, the rotation in degrees and whether it reflects."""
    return {"index": int(element), "group": group.name,
            "rotation_deg": int(group.rotation(int(element))) * 360 / group.n,
            "reflection": bool(group.reflection(int(element)))}
