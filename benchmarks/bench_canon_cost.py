"""What a canonicalizer costs at inference, as a share of the backbone it sits in front of.

A canonicalizer's cost does not grow with the backbone: it reads a small downsampled copy of the input, and the
only full-size work is turning the input back (one bilinear resample). So its overhead is a property of the pair:
large in front of the demo's resnet8 at 28x28 (a few million multiply-adds), small in front of the backbones the
canonicalization papers use (ResNet-50 at 224x224). This benchmark times every pair in one fresh process, the
canonicalized model and its bare backbone taking turns round by round (:func:`equiray.canon.paired_latencies`), so
the ratios are robust to drifts in machine load. Weights are random: a forward pass costs the same whatever they
are. Run it on a quiet machine (no Ray, no training beside it).

    .venv/bin/python benchmarks/bench_canon_cost.py [--table recipes|defaults|all] [--threads 2] [--rounds 15]
                                                    [--out table.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine  # noqa: E402

# (name, model, image size, channels, batch): the demo's backbone, then the papers' kind at growing cost
BACKBONES = (("resnet8 (the demo's)", "resnet8", 28, 1, 256),
             ("timm resnet18", "resnet18", 64, 3, 64),
             ("timm resnet50", "resnet50", 128, 3, 16),
             ("timm resnet50", "resnet50", 224, 3, 8))

# (name, group, canonicalizer options): the any-angle recipe's (configs/canon_any_angle_fast.yaml), then cheaper ones
CANONICALIZERS = (
    ("D8, 8 fields, pooled, 14x14 (the demo's)", "D8",
     dict(channels=8, layers=3, kernel_size=5, hidden_kernel_size=3, pool=2, input_size=14, batch_norm=True)),
    ("D8, 4 fields, pooled, 14x14", "D8",
     dict(channels=4, layers=3, kernel_size=5, hidden_kernel_size=3, pool=2, input_size=14, batch_norm=True)),
    ("C8, 8 fields, pooled, 14x14", "C8",
     dict(channels=8, layers=3, kernel_size=5, hidden_kernel_size=3, pool=2, input_size=14, batch_norm=True)),
)


# The defaults a user gets on the canonicalization papers' kind of backbone (timm ResNets at 224 px, batch 16, as
# issue 22 measured): each kind with no options at all (its input size "auto": 224 px averaged down to 56), beside
# the same reading the full image, and the optimized kind with the sweep's smaller network.
DEFAULT_BACKBONES = (("timm resnet18", "resnet18", 224, 3, 16), ("timm resnet50", "resnet50", 224, 3, 16))
DEFAULT_CANONICALIZERS = (
    ("equivariant C8, defaults (reads 56x56)", "equivariant", "C8", {}),
    ("equivariant C8, full image", "equivariant", "C8", {"input_size": "full"}),
    ("optimized C8, defaults (small_cnn width 4, embed 16; reads 56x56)", "optimized", "C8", {}),
    ("optimized C8, small_cnn width 16, embed 32 (the default until session 24; 56x56)", "optimized", "C8",
     {"network_kwargs": {"width": 16}, "embed_dim": 32}),
    ("optimized C8, full image", "optimized", "C8", {"input_size": "full"}),
)


def _rows(backbones, canonicalizers, rounds: int) -> list[str]:
    """One table row per (backbone, canonicalizer): ``canonicalizers`` holds (label, kind, group, options)."""
    from equiray.canon import CanonicalizedModel, create_canonicalizer, paired_latencies
    from equiray.models import create_model

    rows = []
    with torch.inference_mode():
        for label, name, size, chans, batch in backbones:
            backbone = create_model(name, in_chans=chans, num_classes=10).eval()
            models = [CanonicalizedModel(backbone, create_canonicalizer(kind, group, in_chans=chans, **kw),
                                         pose="angle").eval() for _, kind, group, kw in canonicalizers]
            x = torch.rand(batch, chans, size, size)
            lat = paired_latencies(backbone, models, x, rounds=rounds)
            for (canon, *_), ms, over in zip(canonicalizers, lat.ms_per_image, lat.overhead):
                rows.append(f"| {label} | {size}x{size}x{chans} | {batch} | {lat.backbone_ms:.3f} | {canon} | "
                            f"{ms:.3f} | {over * 100:+.0f}% |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the serving replica's budget)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--table", choices=("recipes", "defaults", "all"), default="all",
                        help="recipes: the any-angle recipe's canonicalizers from 28 to 224 px; defaults: each kind "
                             "with no options on timm ResNets at 224 px (issue 22); all: both")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = ["| backbone | input | batch | backbone ms / image | canonicalizer | canonicalized ms / image | overhead |",
            "|---|---|---:|---:|---|---:|---:|"]
    tables = []
    if args.table in ("recipes", "all"):
        rows = _rows(BACKBONES, [(label, "equivariant", group, kw) for label, group, kw in CANONICALIZERS],
                     args.rounds)
        tables += ["The any-angle recipe's canonicalizers by backbone:", "", *head, *rows, ""]
    if args.table in ("defaults", "all"):
        rows = _rows(DEFAULT_BACKBONES, DEFAULT_CANONICALIZERS, args.rounds)
        tables += ["Each kind with its defaults on 224-px backbones:", "", *head, *rows, ""]
    table = "\n".join([
        f"Canonicalized model vs its bare backbone ({machine()}, {args.threads} torch threads, median of "
        f"{args.rounds} interleaved rounds, one fresh process, random weights).", "", *tables]).rstrip()
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
