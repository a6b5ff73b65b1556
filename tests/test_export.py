"""ONNX and TorchScript exports answer as the PyTorch model does, on inputs at any pose (a canonicalizer's traced
branches included), and the check that guards them fails when they do not."""
import onnx
import pytest
import torch

from equiray import create_model
from equiray.data.views import apply_view
from equiray.export import FORMATS, export_model, load_exported, max_difference

SPECS = {
    "small_cnn": dict(name="small_cnn", in_chans=1, num_classes=10, width=4),
    "ensemble": dict(name="ensemble", in_chans=1, num_classes=10, member="small_cnn",
                     member_kwargs={"width": 4}, num_members=3),
    # the served recipe's kind: a continuous pose (the angle read off a D8 net), any angle turned back
    "canonicalized D8 angle": dict(name="canonicalized", in_chans=1, num_classes=10, backbone="small_cnn",
                                   backbone_kwargs={"width": 4}, canonicalizer="equivariant",
                                   canonicalizer_kwargs={"channels": 4}, group="D8", pose="angle"),
    # the robust champion's kind: that recipe and a plain net mixed, each averaged at test time over a few poses
    "mixture of test-time averages": dict(name="mixture", in_chans=1, num_classes=10, weights=[0.5, 0.5], members=[
        {"name": "orbit_averaged", "kwargs": {
            "backbone": "canonicalized", "group": "D16", "modulo": "D8", "backbone_kwargs": dict(
                backbone="small_cnn", backbone_kwargs={"width": 4}, canonicalizer="equivariant",
                canonicalizer_kwargs={"channels": 4}, group="D8", pose="angle")}},
        {"name": "orbit_averaged", "kwargs": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4},
                                              "group": "D1"}}]),
}
# a pose picked among the group's elements is applied with data-dependent indexing that a trace fixes to the
# example's poses (and rot90, which ONNX lacks): it is refused, with what went wrong
DISCRETE = dict(name="canonicalized", in_chans=1, num_classes=10, backbone="small_cnn", backbone_kwargs={"width": 4},
                canonicalizer="equivariant", canonicalizer_kwargs={"channels": 4}, group="C8")


def inputs(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 14, 14, generator=g) * 0.3
    x[:, :, 3:11, 6:9] += 0.7  # a bar: something with a pose
    return torch.cat([x, apply_view(x, "o2", seed=1), apply_view(x, "angle:90", seed=0)])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(SPECS))
def test_the_export_answers_as_pytorch_at_any_pose(kind, fmt, tmp_path):
    torch.manual_seed(0)
    model = create_model(**SPECS[kind]).eval()
    x = inputs()
    path = export_model(model, x[:2], tmp_path / f"m.{fmt}", format=fmt,
                        metadata={"classes": list("abcdefghij"), "temperature": 1.5})
    diff = max_difference(model, load_exported(path, format=fmt), x)
    assert diff["probabilities"] < 1e-4 and diff["logits"] < 1e-3, diff
    if fmt == "onnx":  # the metadata travels with the file
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["temperature"] == "1.5" and '"j"' in props["classes"]
    else:
        extra = {"spec.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        assert b'"temperature": 1.5' in extra["spec.json"]


def test_the_check_sees_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = create_model(**SPECS["small_cnn"]).eval()
    x = inputs()
    path = export_model(model, x[:2], tmp_path / "m.onnx", format="onnx")
    torch.manual_seed(1)
    other = create_model(**SPECS["small_cnn"]).eval()
    assert max_difference(other, load_exported(path, format="onnx"), x)["probabilities"] > 1e-3


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_model(create_model(**SPECS["small_cnn"]), torch.rand(2, 1, 14, 14), tmp_path / "m", format="tflite")


def test_a_registered_model_whose_export_differs_is_refused_and_nothing_is_written(tmp_path, mlflow_store, capsys):
    import mlflow

    from equiray.errors import EquirayError
    from equiray_pipelines import tracking
    from equiray_pipelines.export import export

    spec = {**{k: v for k, v in DISCRETE.items() if k not in ("name", "in_chans", "num_classes")}}
    full = {"name": "canonicalized", "in_chans": 1, "num_classes": 10, "input_shape": [1, 14, 14], "kwargs": spec}
    good = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "input_shape": [1, 14, 14],
            "kwargs": {"width": 4}, "classes": list("abcdefghij")}
    tracking.setup("t-export", mlflow_store)
    torch.manual_seed(0)
    with mlflow.start_run():
        tracking.register(tracking.log_model(create_model(**DISCRETE), full), "t-discrete", "champion")
        tracking.register(tracking.log_model(create_model(**SPECS["small_cnn"]), good), "t-good", "champion",
                          tags={tracking.TEMPERATURE_TAG: "1.7"})
    out = tmp_path / "discrete.onnx"
    with pytest.raises(EquirayError, match="cannot be exported to onnx|differs from PyTorch"):
        export("models:/t-discrete@champion", out, format="onnx", images=64, data_dir=tmp_path / "none")
    assert list(tmp_path.glob("*.onnx*")) == []  # neither the file nor its partial
    result = export("models:/t-good@champion", tmp_path / "good.onnx", format="onnx", images=64,
                    data_dir=tmp_path / "none")
    assert result["max_diff_probabilities"] < 1e-4 and (tmp_path / "good.onnx").exists()
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "good.onnx")).metadata_props}
    assert props["temperature"] == "1.7" and props["equiray_model"] == "t-good/1"
    assert "seeded noise" in capsys.readouterr().out  # no dataset there: checked on noise, and said so
