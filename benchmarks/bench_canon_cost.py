"""What a canonicalizer costs at inference, as a share of the backbone it sits in front of.

A canonicalizer's cost does not grow with the backbone: it reads a small downsampled copy of the input, and the
only full-size work is turning the input back (one bilinear resample). So its overhead is a property of the pair:
large in front of the demo's resnet8 at 28x28 (a few million multiply-adds), small in front of the backbones the
canonicalization papers use (ResNet-50 at 224x224). This benchmark times every pair in one fresh process, the
canonicalized model and its bare backbone taking turns round by round (:func:`equiray.canon.paired_latencies`), so
the ratios are robust to drifts in machine load. Weights are random: a forward pass costs the same whatever they
are. Run it on a quiet machine (no Ray, no training beside it).

    .venv/bin/python benchmarks/bench_canon_cost.py [--threads 2] [--rounds 15] [--out table.md]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the serving replica's budget)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    from equiray.canon import CanonicalizedModel, create_canonicalizer, paired_latencies
    from equiray.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for label, name, size, chans, batch in BACKBONES:
            backbone = create_model(name, in_chans=chans, num_classes=10).eval()
            models = [CanonicalizedModel(backbone, create_canonicalizer("equivariant", group, in_chans=chans, **kw),
                                         pose="angle").eval() for _, group, kw in CANONICALIZERS]
            x = torch.rand(batch, chans, size, size)
            lat = paired_latencies(backbone, models, x, rounds=args.rounds)
            for (canon, _, _), ms, over in zip(CANONICALIZERS, lat.ms_per_image, lat.overhead):
                rows.append(f"| {label} | {size}x{size}x{chans} | {batch} | {lat.backbone_ms:.3f} | {canon} | "
                            f"{ms:.3f} | {over * 100:+.0f}% |")
            print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join([
        f"Canonicalized model vs its bare backbone ({machine()}, {args.threads} torch threads, median of "
        f"{args.rounds} interleaved rounds, one fresh process, random weights):", "",
        "| backbone | input | batch | backbone ms / image | canonicalizer | canonicalized ms / image | overhead |",
        "|---|---|---:|---:|---|---:|---:|", *rows])
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
