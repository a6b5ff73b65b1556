"""Ensemble training throughput: equiray vs torchensemble, and the cost of running it through Ray.

    .venv/bin/pip install torchensemble          # the peer (pip install -e '.[bench]')
    .venv/bin/python benchmarks/bench_ensemble.py [--members 16] [--images 2000]
    .venv/bin/python benchmarks/bench_ensemble.py --ray-workers 2 --ray-threads 1 --group-size 24 --ray-epochs 12
    python benchmarks/bench_ensemble.py --device cuda --skip-ray --members 16,64,256,1024 --images 4000  # a GPU node

1. Member-samples per second, one epoch, the same member network (Nordenfors & Flinth's 3x16 conv net), the
   same Fashion-MNIST images at 28x28, batch 32 per member (as in the paper), SGD lr 0.01, no augmentation
   (torchensemble has no per-sample group augmentation), on this machine, in one process:
   equiray's vectorized member groups vs torchensemble's ``VotingClassifier`` (``n_jobs=1``, and ``n_jobs=2`` on
   CPU; on a GPU also equiray through ``vmap(functional_call)``). equiray with per-sample C4 augmentation is
   reported too. ``--device cuda --skip-ray`` runs this part alone on a GPU node (no Ray or MLflow needed).
2. Ray overhead: the same members trained by ``equiray ensemble train`` (Ray Train, Ray Data, checkpoint
   every round, MLflow) vs the bare in-process loop; a run of a few minutes.
3. The largest ensemble that trains here in 10 minutes, from the measured throughput.
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def equiray_throughput(x, y, members: int, *, augment: bool, device: str = "cpu",
                       vectorize: str = "auto") -> float:
    from equiray.ensembles import MemberSpec, build_members, train_members_epoch
    from equiray.groups import cyclic

    ens = build_members(MemberSpec("small_cnn", {"width": 16}), range(members)).to(device)
    x, y = x.to(device), y.to(device)  # the pipeline's workers hold their data on the device too
    opt = torch.optim.SGD(ens.parameters(), lr=0.01)
    gens = [torch.Generator().manual_seed(i) for i in range(members)]
    _sync(device)
    t = time.perf_counter()
    stats = train_members_epoch(ens, x, y, opt, batch_size=32, group=cyclic(4) if augment else None, generators=gens,
                                device=device, vectorize=vectorize)
    _sync(device)
    return stats["member_samples"] / (time.perf_counter() - t)


def torchensemble_throughput(x, y, members: int, n_jobs: int, device: str = "cpu") -> float:
    import logging

    from torch.utils.data import DataLoader, TensorDataset
    from torchensemble import VotingClassifier

    from equiray.models.small import SmallCNN

    logging.getLogger("torchensemble").setLevel(logging.ERROR)
    model = VotingClassifier(estimator=SmallCNN, estimator_args={"width": 16}, n_estimators=members,
                             cuda=device.startswith("cuda"), n_jobs=n_jobs)
    model.set_optimizer("SGD", lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True)
    _sync(device)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model.fit(loader, epochs=1, log_interval=10**9, save_model=False, save_dir=tmp)
    _sync(device)
    return members * (len(y) // 32) * 32 / (time.perf_counter() - t)


def ray_overhead(data_dir: Path, members: int, images: int, epochs: int, size: int, workdir: Path,
                 group_size: int, workers: int = 1, threads: int = 0) -> tuple:
    from equiray.config import load_config
    from equiray.data import read_split
    from equiray.ensembles import MemberSpec, build_members, train_members_epoch
    from equiray.groups import cyclic
    from equiray.data import resize
    from pipelines.ensemble import EnsembleConfig, run_train

    x, y = read_split(data_dir, "train", limit=images)
    x = resize(x, size)
    t = time.perf_counter()
    for start in range(0, members, group_size):  # the same member groups, one after the other
        ids = range(start, min(start + group_size, members))
        ens = build_members(MemberSpec("small_cnn", {"width": 16, "support": "symmetric"}), ids)
        opt = torch.optim.Adam(ens.parameters(), lr=0.01)
        gens = [torch.Generator().manual_seed(i) for i in ids]
        for _ in range(epochs):
            train_members_epoch(ens, x, y, opt, batch_size=32, group=cyclic(4), generators=gens)
    bare = time.perf_counter() - t
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(EnsembleConfig, {
        "data": {"dir": str(data_dir), "max_train": images, "resize": size},
        "settings": [{"name": "symmetric+aug"}], "members": members, "members_per_group": group_size,
        "train": {"epochs": epochs}, "scaling": {"num_workers": workers, "torch_threads": threads, "cpus_per_worker": 1.0 / workers},
        "tracking": {"experiment": "bench", "registered_model": "bench-ensemble"},
        "eval": {"max_eval": 500}, "storage_path": str(workdir / "runs")})
    t = time.perf_counter()
    result = run_train(cfg)
    pipeline = time.perf_counter() - t
    return bare, pipeline, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="16",
                        help="members for the throughput comparison; a comma-separated list runs each")
    parser.add_argument("--images", type=int, default=2000, help="training images for the throughput comparison")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the throughput comparison; Ray runs on CPU)")
    parser.add_argument("--skip-ray", action="store_true", help="only the throughput comparison (no Ray, no MLflow)")
    parser.add_argument("--ray-members", type=int, default=96, help="members for the Ray-overhead run")
    parser.add_argument("--group-size", type=int, default=32, help="members per vectorized group in that run")
    parser.add_argument("--ray-workers", type=int, default=1, help="Ray Train workers in that run")
    parser.add_argument("--ray-threads", type=int, default=0,
                        help="torch threads per worker in that run (0: the cores shared among the workers)")
    parser.add_argument("--ray-epochs", type=int, default=3, help="epochs in that run")
    parser.add_argument("--data-dir", default="data/fashion-mnist")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    counts = [int(m) for m in args.members.split(",")]
    gpu = args.device.startswith("cuda")

    from equiray.data import SourceOptions, prepare, read_split

    prepare("fashion-mnist", args.data_dir, options=SourceOptions())
    data_dir = Path(args.data_dir).resolve()
    x, y = read_split(data_dir, "train", limit=args.images)
    if gpu:  # CUDA context, cuDNN handles and kernels loaded once, before anything is timed, for both libraries
        equiray_throughput(x[:256], y[:256], 4, augment=True, device=args.device)
        torchensemble_throughput(x[:256], y[:256], 2, 1, device=args.device)
    rows, ours_by_count = [], {}
    for m in counts:
        ours = ours_by_count[m] = equiray_throughput(x, y, m, augment=False, device=args.device)
        ours_aug = equiray_throughput(x, y, m, augment=True, device=args.device)
        peer1 = torchensemble_throughput(x, y, m, 1, device=args.device)
        what = f"training throughput on {args.device}, {m} members, {args.images} images 28x28, batch 32, 1 epoch"
        rows += [
            f"| {what} | torchensemble VotingClassifier n_jobs=1 | {ours:,.0f} member-samples/s | {peer1:,.0f} "
            f"| {ours / peer1:.2f} |",
            f"| same, equiray with per-sample C4 augmentation | torchensemble n_jobs=1 (no augmentation) "
            f"| {ours_aug:,.0f} | {peer1:,.0f} | {ours_aug / peer1:.2f} |"]
        if gpu:
            ours_vmap = equiray_throughput(x, y, m, augment=False, device=args.device, vectorize="vmap")
            rows.append(f"| same, equiray through `vmap(functional_call)` instead of grouped convolutions "
                        f"| torchensemble n_jobs=1 | {ours_vmap:,.0f} | {peer1:,.0f} | {ours_vmap / peer1:.2f} |")
        else:
            peer2 = torchensemble_throughput(x, y, m, 2)
            rows.append(f"| same | torchensemble VotingClassifier n_jobs=2 | {ours:,.0f} | {peer2:,.0f} "
                        f"| {ours / peer2:.2f} |")
        print("\n".join(rows[-3:]), flush=True)  # progress: this size's rows as they are measured
    best = max(ours_by_count.values())
    footer = [f"Largest ensemble in 10 minutes on this {'GPU' if gpu else 'machine'} at the paper's scale "
              f"(60,000 images at 28x28, 10 epochs, {best:,.0f} member-samples/s): ~{int(600 * best / 6e5):,} members."]
    command = (f".venv/bin/python benchmarks/bench_ensemble.py --members {args.members} --images {args.images}"
               + (f" --device {args.device}" if gpu else ""))
    if args.skip_ray:
        command += " --skip-ray"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bare, pipeline, _ = ray_overhead(data_dir, args.ray_members, 4000, args.ray_epochs, 14, Path(tmp),
                                             args.group_size, args.ray_workers, args.ray_threads)
        per_member_epoch = 4000 * args.ray_epochs * args.ray_members / bare  # member-samples/s, 14px, C4 aug
        threads = args.ray_threads or max(1, (os.cpu_count() or 1) // args.ray_workers)
        rows.append(
            f"| Ray overhead: {args.ray_members} members in groups of {args.group_size}, 4,000 images 14x14, "
            f"{args.ray_epochs} epochs, C4 aug (`equiray ensemble train`, {args.ray_workers} worker(s) x {threads} "
            f"torch thread(s), vs the bare loop, {torch.get_num_threads()} threads) | bare in-process loop "
            f"| {pipeline:.0f} s | {bare:.0f} s | {bare / pipeline:.2f} (pipeline takes {pipeline / bare:.2f}x) |")
        footer.insert(0, f"Largest ensemble in 10 minutes on this machine at demo scale (4,000 images at 14x14, 3 "
                         f"epochs, C4 augmentation; {per_member_epoch:,.0f} member-samples/s in the bare loop): "
                         f"~{int(600 * per_member_epoch / (4000 * 3)):,} members.")
        command += (f" --ray-members {args.ray_members} --group-size {args.group_size} --ray-workers "
                    f"{args.ray_workers} --ray-threads {args.ray_threads} --ray-epochs {args.ray_epochs}")
    table = "\n".join([
        f"Machine: {machine()}. Command: `{command}`", "",
        "| what | peer | equiray | peer | ratio (x, higher is better for equiray) |", "|---|---|---|---|---|",
        *rows, "", *footer])
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
