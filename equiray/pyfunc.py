"""A registered equiray model as MLflow's generic ``pyfunc``: raw images in, labels and probabilities out.

What ``mlflow.pyfunc.load_model("models:/equiray-robust@champion").predict(...)`` and ``mlflow models serve`` run.
The model is rebuilt from the logged ``spec.json`` + safetensors weights (nothing unpickled), and the images are
decoded and resized exactly as equiray's endpoint does (:mod:`equiray.inference`). The input is a DataFrame with
an ``image`` column of PNG/JPEG bytes (base64 in ``mlflow models serve``'s JSON, as MLflow encodes binary
columns), or a list of such bytes; the output one row per image: ``label``, ``class_index``, ``confidence`` and
the probability of every class (one column per class name). The logits are divided by the temperature fitted
when the model was registered (stored with the model as ``artifacts/calibration.json``, and as the version's
``equiray.temperature`` tag); ``params={"temperature": T}`` overrides it (1 for the raw softmax; 0, the
signature's default, keeps it).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

__all__ = ["CALIBRATION_FILE", "ImageClassifier"]

CALIBRATION_FILE = "calibration.json"  # the registered temperature, beside spec.json in the model's artifacts


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; the artifacts ``spec`` (spec.json) and ``weights`` (safetensors) name the model."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from equiray.models import create_model

        with open(context.artifacts["spec"]) as f:
            self.spec = json.load(f)
        spec = self.spec
        if spec.get("builder") == "metanetwork":
            raise ValueError("an NFN metanetwork reads network weights, not images: load it with "
                             "equiray_pipelines.tracking.load_model")
        self.model = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                                  **spec.get("kwargs", {}))
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        self.classes = [str(c) for c in (spec.get("classes") or range(spec["num_classes"]))]
        calibration = Path(context.artifacts["spec"]).parent / CALIBRATION_FILE
        self.temperature = float(json.loads(calibration.read_text())["temperature"]) if calibration.exists() else 1.0

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        # the hint is one MLflow takes as it is (a list[...] hint would make it infer a schema; none, warn)
        from equiray.inference import decode_image, predict_detailed, to_model_input

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"expected a column 'image' of PNG/JPEG bytes, got columns {list(model_input.columns)}")
            images = list(model_input["image"])
        elif isinstance(model_input, (bytes, bytearray)):
            images = [bytes(model_input)]
        else:
            images = list(model_input)
        if not images:
            return pd.DataFrame(columns=["label", "class_index", "confidence", *self.classes])
        shape = self.spec["input_shape"]
        x = to_model_input([decode_image(bytes(b), in_chans=shape[0], what=f"image {i}")
                            for i, b in enumerate(images)], shape)
        temperature = float((params or {}).get("temperature") or self.temperature)
        probs = predict_detailed(self.model, x, temperature=temperature).probabilities
        conf, index = probs.max(-1)
        frame = pd.DataFrame(probs.double().numpy(), columns=self.classes)
        frame.insert(0, "confidence", conf.double().numpy())
        frame.insert(0, "class_index", index.numpy())
        frame.insert(0, "label", [self.classes[int(k)] for k in index])
        return frame
