"""A trained equiray model as a file other runtimes load: ONNX (onnxruntime, TensorRT, ...) or TorchScript
(libtorch, C++), with the check that it answers as the PyTorch model does.

Both are traced (ONNX with PyTorch's TorchScript-based exporter, opset 20: the first with the affine grids
that a canonicalizer turns images back with): the operations one forward pass runs
on an example batch are recorded, with the batch dimension left free. A branch that depends on the values of the
input is recorded as taken on the example, so :func:`max_difference` must be run on real inputs (the test set,
upright and turned), not only on the example: ``equiray models export`` does that and refuses a file whose
probabilities differ from PyTorch's by more than ``tolerance``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["FORMATS", "export_model", "load_exported", "max_difference"]

FORMATS = ("onnx", "torchscript")
OPSET = 20


def export_model(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, format: str,
                 metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``model`` (its ``forward``: images (B, C, H, W) -> logits (B, K)) to ``path`` as ``format``, traced on
    ``example``; ``metadata`` (e.g. the spec: classes, input shape, temperature) goes with it: ONNX metadata
    properties, or a ``spec.json`` extra file in the TorchScript archive."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: one of {', '.join(FORMATS)}")
    path = Path(path)
    model = model.eval()
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # checked by max_difference instead
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript-based ONNX exporter
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's own deprecation notice
        model(example)  # eagerly first: weights a model derives and caches (a canonicalizer's folded filters)
        # are then constants of the graph, not operations the exporter has to know
        if format == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"spec.json": json.dumps(dict(metadata or {})).encode()})
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            if meta:
                import onnx

                proto = onnx.load(str(path))
                for key, value in meta.items():
                    proto.metadata_props.add(key=key, value=value)
                onnx.save(proto, str(path))
    return path


def load_exported(path: str | os.PathLike, *, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported model as a function images -> logits (onnxruntime on the CPU, or ``torch.jit.load``)."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu").eval()
        return lambda x: module(x)
    if format != "onnx":
        raise ValueError(f"format {format!r}: one of {', '.join(FORMATS)}")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


@torch.no_grad()
def max_difference(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                   batch_size: int = 256) -> dict[str, float]:
    """The largest absolute differences between ``model`` and its export on ``x``: of the logits, and of the
    probabilities (softmax), which is what the tolerance is judged on."""
    logits = probs = 0.0
    model = model.eval()
    for i in range(0, len(x), batch_size):
        a, b = model(x[i:i + batch_size]).float(), exported(x[i:i + batch_size]).float()
        if a.shape != b.shape:
            raise ValueError(f"the export answers with shape {tuple(b.shape)}, PyTorch with {tuple(a.shape)}")
        logits = max(logits, float((a - b).abs().max()))
        probs = max(probs, float((a.softmax(-1) - b.softmax(-1)).abs().max()))
    return {"logits": logits, "probabilities": probs}
