"""Inference latency of registered models next to the bare backbone, in one fresh process, as ratios.

Every model and the backbone take turns on the same batch of test images, round after round (the backbone first
and last in each round); a model's overhead is the median over rounds of its time over the backbone's in that
round (:func:`equiray.canon.paired_latencies`), so a drift in machine load hits both sides of every ratio alike.
Run it on a quiet machine (no Ray, no training beside it).

    .venv/bin/python benchmarks/bench_latency.py [--models models:/equiray-canon-any-angle@champion ...]
        [--batch 256 1] [--threads 2] [--rounds 30] [--out table.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine  # noqa: E402

DEFAULT_MODELS = ("models:/equiray-robust@champion", "models:/equiray-canon-any-angle@champion",
                  "models:/equiray-canon@champion", "models:/equiray-ensemble@champion",
                  "models:/equiray-student@champion")


class Resized(torch.nn.Module):
    """``model`` behind the resize the endpoint does (a model trained at another resolution): timed together."""

    def __init__(self, model: torch.nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from equiray.data import resize

        return self.model(resize(x, self.size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="models:/equiray-backbone@pretrained", help="the reference")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="registered models to time (one that is not registered is skipped, said so)")
    parser.add_argument("--batch", nargs="+", type=int, default=[256, 1], help="batch sizes to time at")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the serving replica's budget)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--data-dir", default="data/fashion-mnist")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    import mlflow

    from equiray.canon import paired_latencies
    from equiray.data import read_split
    from equiray_pipelines import tracking

    torch.set_num_threads(args.threads)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        backbone, _ = tracking.load_model(args.backbone)
    except Exception as e:  # noqa: BLE001 - one line, what to do next
        print(f"error: cannot load {args.backbone} ({e}); run `make demo` (or `equiray pretrain`) first",
              file=sys.stderr)
        return 2
    models, names = [], []
    for uri in args.models:
        try:
            model, spec = tracking.load_model(uri)
        except Exception:  # noqa: BLE001 - not registered here: skipped, said so
            print(f"skipped {uri}: not registered", file=sys.stderr)
            continue
        models.append((model.eval(), spec))
        names.append(uri)
    x, _ = read_split(args.data_dir, "test", limit=max(args.batch))
    rows = []
    for b in args.batch:
        batch = x[:b]
        for (model, spec), name in zip(models, names):
            size = spec.get("input_shape", batch.shape[1:])[-1]
            timed = model if size == batch.shape[-1] else Resized(model, size)  # as the endpoint feeds it
            lat = paired_latencies(backbone, [timed], batch, rounds=args.rounds)
            rows.append(f"| {name} | {b} | {lat.ms_per_image[0]:.3f} | {lat.backbone_ms:.3f} | "
                        f"{lat.overhead[0] * 100:+.0f}% |")
    table = "\n".join([
        f"Inference latency next to `{args.backbone}` ({machine()}, {args.threads} torch threads, "
        f"median of {args.rounds} interleaved rounds, one fresh process):", "",
        "| model | batch | ms / image | backbone ms / image | overhead |", "|---|---:|---:|---:|---:|", *rows])
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
