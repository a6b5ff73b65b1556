"""``equiray models export``: a registered model as an ONNX or TorchScript file, checked against PyTorch on real
images before it is kept (traced control flow is only right for inputs like the ones it was checked on)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from equiray.errors import EquirayError
from equiray_pipelines._ray import say

__all__ = ["TOLERANCE", "export"]

TOLERANCE = 1e-4  # the largest difference of probabilities allowed between the export and PyTorch


def _check_images(data_dir: str | os.PathLike, n: int, input_shape) -> tuple[torch.Tensor, str]:
    """``n`` test images upright and ``n`` turned by a random angle (a canonicalizer's pose branch both ways),
    resized to the model's input; seeded noise where no dataset is prepared."""
    from equiray.data import read_split, resize
    from equiray.data.views import apply_view

    try:
        x, _ = read_split(data_dir, "test", limit=n)
    except Exception:  # noqa: BLE001 - no prepared dataset here: check on noise of the model's shape
        return torch.rand(2 * n, *input_shape, generator=torch.Generator().manual_seed(0)), "seeded noise"
    x = torch.cat([x, apply_view(x, "o2", seed=0)])
    if x.shape[1] != input_shape[0]:
        x = x.expand(-1, input_shape[0], -1, -1) if x.shape[1] == 1 else x[:, :input_shape[0]]
    return resize(x, input_shape[-1]), f"{n} test images upright and {n} at a random pose"


def export(uri: str, out: str | os.PathLike, *, format: str, images: int = 256, tolerance: float = TOLERANCE,
           data_dir: str | os.PathLike = "data/fashion-mnist") -> dict:
    """Export the registered model ``uri`` to ``out`` as ``format`` and check it; a file that differs from PyTorch
    by more than ``tolerance`` (probabilities) is removed and the difference reported as an error."""
    from equiray.export import FORMATS, export_model, load_exported, max_difference
    from equiray_pipelines import tracking

    if format not in FORMATS:
        raise EquirayError(f"--format {format!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise EquirayError(f"{out.parent} is not a folder: create it or choose another --out")
    tracking.require_store(tracking.tracking_uri())
    model, spec = tracking.load_model(uri)
    if "input_shape" not in spec:
        raise EquirayError(f"{uri}: its spec has no input_shape, so the export has no input size")
    shape = tuple(spec["input_shape"])
    x, what = _check_images(data_dir, images, shape)
    version = tracking.registry_version(uri) if uri.startswith("models:/") else uri
    meta = {"equiray_model": version, "input_shape": list(shape), "classes": spec.get("classes"),
            "temperature": float(tracking.model_version(uri).tags.get(tracking.TEMPERATURE_TAG, 1.0))
            if uri.startswith("models:/") else 1.0, "output": "logits (B, K); softmax(logits / temperature)"}
    partial = out.with_name(f".{out.name}.partial")
    try:
        try:
            export_model(model, x[:2], partial, format=format, metadata=meta)
        except ImportError as exc:
            raise EquirayError(f"{format} export needs {exc.name}: pip install 'equiray[export]' (onnx, "
                               "onnxruntime)") from None
        except Exception as exc:  # noqa: BLE001 - the exporters raise many kinds; the first line says what
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EquirayError(f"{uri} cannot be exported to {format}: {first[:300]}") from None
        diff = max_difference(model, load_exported(partial, format=format), x)
        if diff["probabilities"] > tolerance:
            raise EquirayError(f"the {format} export of {uri} differs from PyTorch by {diff['probabilities']:.2e} in "
                               f"probability on {what} (tolerance {tolerance:g}); nothing written: the traced graph "
                               "does not generalise to these inputs")
        partial.replace(out)  # only a checked file takes the name
    finally:
        partial.unlink(missing_ok=True)
    say(f"exported {version} to {out} ({format}, {out.stat().st_size / 2**20:.1f} MiB): on {what} the largest "
        f"difference from PyTorch is {diff['probabilities']:.1e} in probability, {diff['logits']:.1e} in logits")
    return {"path": str(out), "format": format, "model": version, **{f"max_diff_{k}": v for k, v in diff.items()}}
