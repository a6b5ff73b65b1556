"""Foundation benchmarks: group actions, data reading, and the cost of Ray Train around a training epoch.

Each row runs equiray and its peer in the same process, on the same data and machine, and reports the ratio.

    .venv/bin/python benchmarks/bench_foundation.py [--quick] [--out BENCHMARKS.md-section.md]

1. Batched group action (random element per image, 256 Fashion-MNIST images) vs torchvision's
   ``transforms.v2.functional.rotate`` applied image by image (how per-sample augmentation is usually written).
2. Reading the training split into tensors: equiray's Parquet shards (pyarrow) vs torchvision's
   ``FashionMNIST`` + ``DataLoader`` + ``ToTensor``.
3. One pretraining epoch of the default backbone: the Ray Train pipeline (Ray Data streaming into a
   ``TorchTrainer`` worker) vs a bare in-process loop over the same tensors (Ray overhead).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import emit, machine  # noqa: E402


def timeit(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_group_action(x: torch.Tensor) -> list[tuple]:
    import torchvision.transforms.v2.functional as TF

    from equiray.groups import cyclic

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, group in (("C4 (exact rot90)", cyclic(4)), ("C8 (interpolated)", cyclic(8))):
        el = group.sample(len(x), generator=gen)
        angles = (group.angles(el) * 180 / torch.pi).tolist()
        ours = timeit(lambda: group.act(x, el))
        peer = timeit(lambda: torch.stack([TF.rotate(img, a) for img, a in zip(x, angles)]))
        rows.append((f"group action {name}, {len(x)} images", "torchvision rotate per image",
                     f"{len(x) / ours:,.0f} img/s", f"{len(x) / peer:,.0f} img/s", peer / ours))
    return rows


def bench_read(data_dir: Path, cache_dir: Path) -> list[tuple]:
    import torchvision
    from torch.utils.data import DataLoader

    from equiray.data import read_split
    from equiray.data.sources import DEBIAN_FASHION_MNIST, stage_idx_files

    stage_idx_files(DEBIAN_FASHION_MNIST, cache_dir / "FashionMNIST" / "raw")
    ours = timeit(lambda: read_split(data_dir, "train"), repeat=3)
    n = len(read_split(data_dir, "train")[1])
    ds = torchvision.datasets.FashionMNIST(str(cache_dir), train=True, download=False,
                                           transform=torchvision.transforms.ToTensor())

    def peer_read():
        xs = [x for x, _ in DataLoader(ds, batch_size=1024, num_workers=0)]
        return torch.cat(xs)

    peer = timeit(peer_read, repeat=3)
    return [(f"read train split into tensors ({n:,} rows)", "torchvision FashionMNIST + DataLoader",
             f"{n / ours:,.0f} img/s", f"{60000 / peer:,.0f} img/s", (peer / 60000) / (ours / n))]


def bench_epoch(data_dir: Path, workdir: Path, max_train: int) -> list[tuple]:
    from equiray.config import load_config
    from equiray.data import read_split
    from equiray.models import create_model
    from equiray.train import train_epoch
    from equiray_pipelines.pretrain import PretrainConfig, run

    x, y = read_split(data_dir, "train", limit=max_train)
    torch.manual_seed(0)
    model = create_model("resnet8")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    perm = torch.randperm(len(y))
    bare = train_epoch(model, ((x[perm[i:i + 128]], y[perm[i:i + 128]]) for i in range(0, len(y), 128)), opt)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(PretrainConfig, {
        "data": {"dir": str(data_dir), "max_train": max_train, "max_eval": 1000},
        "train": {"epochs": 1}, "tracking": {"experiment": "bench", "registered_model": "bench-backbone"},
        "storage_path": str(workdir / "runs")})
    result = run(cfg)
    ray_epoch = result.epochs[-1]["epoch_seconds"]
    ray_total = result.metrics["train_seconds"]
    return [
        (f"pretrain epoch, resnet8, {max_train:,} images (inside the worker)", "bare in-process loop",
         f"{max_train / ray_epoch:,.0f} img/s", f"{max_train / bare.seconds:,.0f} img/s", bare.seconds / ray_epoch),
        (f"pretrain run incl. Ray start, data, checkpoint ({max_train:,} images, 1 epoch)", "bare in-process loop",
         f"{ray_total:.0f} s", f"{bare.seconds:.0f} s", bare.seconds / ray_total),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller epoch benchmark")
    parser.add_argument("--data-dir", default="data/fashion-mnist")
    parser.add_argument("--cache-dir", default=".cache/equiray")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from equiray.data import SourceOptions, prepare, read_split

    prepare("fashion-mnist", args.data_dir, options=SourceOptions(cache_dir=Path(args.cache_dir)))
    x, _ = read_split(args.data_dir, "test", limit=256)
    rows = bench_group_action(x)
    rows += bench_read(Path(args.data_dir), Path(args.cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_epoch(Path(args.data_dir).resolve(), Path(tmp), 10_000 if args.quick else 54_000)
    lines = [f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_foundation.py"
             f"{' --quick' if args.quick else ''}`", "",
             "| what | peer | equiray | peer | speed-up (x, higher is better) |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {p} | {o} | {q} | {r:.2f} |" for w, p, o, q, r in rows]
    table = "\n".join(lines)
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
