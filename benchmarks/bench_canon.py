"""Canonicalizers: equiray vs ``equiadapt`` (the papers' own library), in one run, same data, backbone and training.

Every variant starts from the same pretrained backbone (``models:/equiray-backbone@pretrained`` when the MLflow
store has it, otherwise a resnet8 pretrained here on upright images), is fine-tuned for the same epochs with the
same optimizer, batch order and prior weight on upright Fashion-MNIST, and is measured the same way: upright
and C8-avg test accuracy, identity rate, and inference ms per image on one batch (models take turns in a random
order each round, best of 30 rounds kept, in a fresh process). Rows:

* equiadapt's ``GroupEquivariantImageCanonicalization`` with its e2cnn ``ESCNNEquivariantNetwork`` (its image
  default), at two canonicalizer learning rates (the better is compared);
* equiray's equivariant canonicalizer with the same widths and kernels as that network, reading the same 28x28
  input (like for like), and with equiray's defaults (1x1 hidden group conv, 9x9 input, batch norm and dropout
  like equiadapt's network), those defaults without batch norm and dropout, and with a 7x7 input;
* equiray's optimized canonicalizer (Panigrahi & Mondal) with its defaults.

    .venv/bin/python benchmarks/bench_canon.py [--train 6000 --epochs 3 --seeds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine  # noqa: E402


def pretrained_backbone(x, y):
    """The registered backbone, or a resnet8 trained here for 2 epochs on the upright images given."""
    from equiray_pipelines import tracking

    try:
        model, spec = tracking.load_model("models:/equiray-backbone@pretrained")
        return model, spec, "models:/equiray-backbone@pretrained"
    except Exception:  # noqa: BLE001 - no store / not registered: pretrain here
        from equiray.models import create_model
        from equiray.train import train_epoch

        torch.manual_seed(0)
        model = create_model("resnet8")
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for _ in range(2):
            perm = torch.randperm(len(y))
            train_epoch(model, ((x[i], y[i]) for i in perm.split(128)), opt)
        return model.eval(), {"name": "resnet8", "in_chans": 1, "num_classes": 10, "kwargs": {}}, "resnet8 (here)"


class EquiadaptModel(nn.Module):
    """equiadapt's canonicalizer in front of a backbone: ``backbone(canonicalize(x))`` (invariant logits)."""

    def __init__(self, backbone: nn.Module, canonicalizer: nn.Module):
        super().__init__()
        self.backbone, self.canonicalizer = backbone, canonicalizer

    def forward(self, x):
        return self.backbone(self.canonicalizer(x))


def equiadapt_model(backbone, *, out_channels: int, kernel_size: int, num_layers: int, beta: float):
    from equiadapt.images.canonicalization.discrete_group import GroupEquivariantImageCanonicalization
    from equiadapt.images.canonicalization_networks import ESCNNEquivariantNetwork
    from omegaconf import OmegaConf

    net = ESCNNEquivariantNetwork((1, 28, 28), out_channels, kernel_size, group_type="rotation", num_rotations=8,
                                  num_layers=num_layers)
    hp = OmegaConf.create({"beta": beta, "input_crop_ratio": 1.0, "resize_shape": 28})
    return EquiadaptModel(backbone, GroupEquivariantImageCanonicalization(net, hp, (1, 28, 28)))


def train_equiadapt(model: EquiadaptModel, x, y, t: dict, prior_weight: float) -> None:
    """The same loop as equiray's ``train_variant`` (AdamW groups, seed, batch order), with equiadapt's prior."""
    gen = torch.Generator().manual_seed(t["seed"])
    torch.manual_seed(t["seed"])
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": t["lr"]},
                             {"params": model.canonicalizer.parameters(), "lr": t["canon_lr"]}],
                            weight_decay=t["weight_decay"])
    for _ in range(t["epochs"]):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(t["batch_size"]):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + prior_weight * model.canonicalizer.get_prior_regularization_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def evaluate(model, xt, yt) -> dict:
    from equiray.canon import evaluate_variant

    from equiray.data.views import apply_view
    from equiray.train import accuracy, predict

    out = evaluate_variant(model, xt, yt, "C8")
    model.eval()
    for view in ("so2", "o2"):  # any angle, then a mirror too: the views `equiray robust` judges by (seed 0)
        out[f"{view}_accuracy"] = accuracy(predict(model, apply_view(xt, view, seed=0), batch_size=512), yt)
    if isinstance(model, EquiadaptModel):
        model.canonicalizer(xt[:1000])
        out["identity_rate"] = float(model.canonicalizer.get_identity_metric())
    return out


def latencies(models: dict, batch: torch.Tensor, rounds: int = 30) -> dict:
    """Best ms per image over ``rounds``; every round runs each model once, in a fresh random order (so that no
    model always follows the same one)."""
    best = {k: float("inf") for k in models}
    order = random.Random(0)
    with torch.no_grad():
        for m in models.values():
            m.eval()(batch)
        for _ in range(rounds):
            for k in order.sample(list(models), len(models)):
                m = models[k]
                start = time.perf_counter()
                m(batch)
                best[k] = min(best[k], time.perf_counter() - start)
    return {k: 1000 * v / len(batch) for k, v in best.items()}


def rebuild(recipe: dict) -> nn.Module:
    """A timed model from its recipe: how to construct it, and its trained weights."""
    from equiray.models import create_model

    spec = recipe["spec"]
    model = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                         **spec.get("kwargs", {}))
    if recipe["kind"] == "equiadapt":
        model = equiadapt_model(model, **recipe["options"])
    model.load_state_dict(recipe["state"])
    return model.eval()


def _time_recipes(path: str, out: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    job = torch.load(path, weights_only=False)
    ms = latencies({k: rebuild(r) for k, r in job["recipes"].items()}, job["batch"])
    Path(out).write_text(json.dumps(ms))


def latencies_in_fresh_process(recipes: dict, batch: torch.Tensor) -> dict:
    """Time every model in a new process: after many minutes of training in this one, the same models run
    10-15% slower here (the bare backbone too; allocator state), and not by the same factor for every model."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.pt", Path(tmp) / "ms.json"
        torch.save({"recipes": recipes, "batch": batch}, job)
        subprocess.run([sys.executable, __file__, "--time-recipes", str(job), str(out)], check=True)
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=6000, help="upright training images")
    parser.add_argument("--test", type=int, default=2000, help="test images (each in its 8 rotations)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prior-weight", type=float, default=100.0)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row (accuracy: mean +- std)")
    parser.add_argument("--data-dir", default="data/fashion-mnist")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--time-recipes", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.time_recipes:
        _time_recipes(*args.time_recipes)
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")

    from equiray.config import load_config
    from equiray.data import SourceOptions, prepare, read_split
    from equiray.canon import Variant, build_variant, train_variant
    from equiray.stats import compare, mean_interval
    from equiray_pipelines.canon import CanonConfig

    prepare("fashion-mnist", args.data_dir, options=SourceOptions())
    x, y = read_split(args.data_dir, "train", limit=args.train)
    xt, yt = read_split(args.data_dir, "test", limit=args.test)
    backbone, spec, source = pretrained_backbone(x, y)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = load_config(CanonConfig, {"train": {"epochs": args.epochs}})
    t = cfg.train.options()  # train_variant's keywords (beta, pose_snap, upright_backbone build the model)

    def fresh_backbone():
        from equiray.models import create_model

        m = create_model(spec["name"], in_chans=1, num_classes=10, **spec.get("kwargs", {}))
        m.load_state_dict(state)
        return m

    width, kernel, layers = 4, 5, 2  # the like-for-like canonicalizer size
    variant = {"kind": "equivariant", "group": "C8", "augment": False, "prior_weight": args.prior_weight,
               "backbone": "finetune"}
    runs: dict[str, list[dict]] = {}
    recipes = {"bare backbone": {"kind": "equiray", "spec": spec, "state": state}}

    def record(name, model, start, recipe):
        result = {**evaluate(model, xt, yt), "train_s": time.perf_counter() - start}
        runs.setdefault(name, []).append(result)
        recipes[name] = {**recipe, "state": model.state_dict()}  # the last seed's model is the one timed
        print(name, {k: round(v, 4) for k, v in result.items() if not k.startswith("accuracy_rot")}, flush=True)

    def ours(name, kind, kwargs, tr):
        start = time.perf_counter()
        v = Variant(name=name, **{**variant, "kind": kind})
        model, model_spec = build_variant(v, spec, state, canonicalizer_kwargs=kwargs, beta=cfg.train.beta,
                                          seed=tr["seed"])  # the canonicalizer's initialisation too, as equiadapt's
        train_variant(model, v, x, y, **tr)
        record(name, model, start, {"kind": "equiray", "spec": model_spec})

    def theirs(name, canon_lr, tr):
        start = time.perf_counter()
        torch.manual_seed(tr["seed"])
        options = {"out_channels": width, "kernel_size": kernel, "num_layers": layers, "beta": cfg.train.beta}
        model = equiadapt_model(fresh_backbone(), **options)
        train_equiadapt(model, x, y, {**tr, "canon_lr": canon_lr}, args.prior_weight)
        record(name, model, start, {"kind": "equiadapt", "spec": spec, "options": options})

    equivariant = cfg.canonicalizers.kwargs("equivariant")
    plain = {k: v for k, v in equivariant.items() if k not in ("batch_norm", "dropout")}
    px = equivariant["input_size"]
    for seed in range(args.seeds):
        tr = {**t, "seed": seed}
        theirs(f"equiadapt ESCNN ({width} fields, k{kernel}, {layers} layers, 28px), canon lr {t['canon_lr']:g}",
               t["canon_lr"], tr)
        theirs(f"equiadapt ESCNN ({width} fields, k{kernel}, {layers} layers, 28px), canon lr 0.001", 1e-3, tr)
        ours(f"equiray equivariant, like for like ({width} ch, k{kernel}, hidden k{kernel}, 28px)", "equivariant",
             {"channels": width, "layers": layers, "kernel_size": kernel, "hidden_kernel_size": kernel,
              "input_size": None}, tr)
        ours(f"equiray equivariant, no batch norm / dropout (8 ch, hidden 1x1, {px}px)", "equivariant", plain, tr)
        ours(f"equiray equivariant, defaults (8 ch, batch norm, dropout 0.5, hidden 1x1, {px}px)", "equivariant",
             equivariant, tr)
        ours("equiray equivariant, defaults with a 7px input", "equivariant", {**equivariant, "input_size": 7}, tr)
        ours("equiray optimized, defaults (small_cnn w4, 7px)", "optimized", cfg.canonicalizers.kwargs("optimized"), tr)
    ms = latencies_in_fresh_process(recipes, xt[:256])

    def mean(name, key):
        return statistics.mean(r[key] for r in runs[name])

    def cell(name, key):
        iv = mean_interval([100 * r[key] for r in runs[name]])
        return f"{iv.mean:.2f}%" + (f" +- {iv.half_width:.1f}" if iv.n > 1 else "")

    peers = [k for k in runs if k.startswith("equiadapt")]
    peer = max(peers, key=lambda k: mean(k, "cn_avg_accuracy"))
    bare = ms["bare backbone"]
    lines = [
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_canon.py --train {args.train} "
        f"--test {args.test} "
        f"--epochs {args.epochs} --seeds {args.seeds}`. Backbone: {source}; C8, prior weight {args.prior_weight:g}, "
        f"fine-tuned backbone, {args.train} upright training images, {args.epochs} epochs, {args.test} test images x "
        f"8 rotations (and at a seeded uniformly random angle, SO(2), then after a random mirror too, O(2)); "
        f"accuracies are means over {args.seeds} training seeds +- the 95% interval (Student t; seed s: the same "
        f"initialisation and batch order for every row); the last column compares with equiadapt seed by seed.", "",
        "| canonicalizer | upright acc | C8-avg acc | SO(2) acc | O(2) acc | identity rate | ms / image (batch 256) "
        "| overhead vs backbone | speed vs equiadapt (x) | C8-avg vs equiadapt (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| bare backbone (no canonicalizer) | | | | | | {bare:.3f} | | | |",
    ]
    for k in runs:
        mark = " (compared)" if k == peer else ""
        diff, verdict = compare([100 * r["cn_avg_accuracy"] for r in runs[k]],
                                [100 * r["cn_avg_accuracy"] for r in runs[peer]])
        versus = "-" if k == peer else f"{diff.mean:+.1f} ({verdict})"
        lines.append(f"| {k}{mark} | {cell(k, 'upright_accuracy')} | {cell(k, 'cn_avg_accuracy')} | "
                     f"{cell(k, 'so2_accuracy')} | {cell(k, 'o2_accuracy')} | "
                     f"{100 * mean(k, 'identity_rate'):.1f}% | {ms[k]:.3f} | {(ms[k] / bare - 1) * 100:+.0f}% | "
                     f"{ms[peer] / ms[k]:.2f} | {versus} |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
