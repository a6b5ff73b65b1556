"""Ensemble training throughput: equiray vs torchensemble, and the cost of running it through Ray.

    .venv/bin/pip install torchensemble          # the peer (pip install -e '.[bench]')
    .venv/bin/python benchmarks/bench_ensemble.py [--members 16] [--images 2000]
    .venv/bin/python benchmarks/bench_ensemble.py --ray-workers 2 --ray-threads 1 --group-size 24 --ray-epochs 12
    python benchmarks/bench_ensemble.py --device cuda --skip-ray --members 16,64,256,1024 --images 4000  # a GPU node
    python3 benchmarks/bench_ensemble.py --variants lib:256,fast-bf16-graph:1024 --images 2000   # a GPU node (4.)
    python3 benchmarks/bench_ensemble.py --ray-config jobs/configs/ensemble.yaml --ray-set members=64 ...   # (5.)
    .venv/bin/python benchmarks/bench_ensemble.py --ray-config configs/ensemble_thousands.yaml \
        --scale 250,1000,2000,4000 --out /tmp/scale.md                                                   # (6.)
    (benchmarks/gpu_check.sh runs 4. and 5. and tests/test_cuda.py on a leased GPU through the device tool)

1. Member-samples per second, one epoch, the same member network (Nordenfors & Flinth's 3x16 conv net), the
   same Fashion-MNIST images at 28x28, batch 32 per member (as in the paper), SGD lr 0.01, no augmentation
   (torchensemble has no per-sample group augmentation), on this machine, in one process:
   equiray's vectorized member groups vs torchensemble's ``VotingClassifier`` (``n_jobs=1``, and ``n_jobs=2`` on
   CPU; on a GPU also equiray through ``vmap(functional_call)``). equiray with per-sample C4 augmentation is
   reported too. ``--device cuda --skip-ray`` runs this part alone on a GPU node (no Ray or MLflow needed).
2. Ray overhead: the same members trained by ``equiray ensemble train`` (Ray Train, Ray Data, checkpoint
   every round, MLflow) vs the bare in-process loop; a run of a few minutes.
3. The largest ensemble that trains here in 10 minutes, from the measured throughput.
4. ``--variants``: on a GPU, the member's training step (small_cnn at 28x28, per-sample C4 augmentation) run other
   ways: everything on the device with no host syncs, bf16, autocast, NCHW vs channels-last, one CUDA graph per
   step, ``torch.compile``, larger member groups; member-samples/s and effective TFLOP/s per variant.
5. ``--ray-config``: a pipeline config (e.g. jobs/configs/ensemble.yaml, fractional GPUs per worker) through Ray
   Train, as ``equiray ensemble train`` runs it, vs the bare loop over the same member groups on the same device:
   the whole stage, Ray Train's ``fit()``, and the steady state (rank 0's epochs, timed by their MLflow metrics).
6. ``--scale N1,N2,..`` with ``--ray-config``: 5. at each ensemble size (``members=N``): the pipeline's overhead
   over the bare loop per member, where it goes (Ray Train's rounds and checkpoints, the driver's collection,
   MLflow artifacts, evaluation, registration), the artifacts and checkpoint bytes a run leaves, and from a line
   fitted to the sizes the largest ensemble that trains in 10 minutes with and without Ray.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
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
    from equiray_pipelines.ensemble import EnsembleConfig, run_train

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


# ------------------------------------------------------------------------------------------------------------------
# GPU variants of the member's training step (``--variants``): the same member (small_cnn, width 16, the stacked
# members as grouped convolutions in channels-last layout), SGD lr 0.01, batch 32 per member, every member its own
# data order and its own uniformly random C4 element per sample; what changes is how the step runs.
#   lib                   the library's ``train_members_epoch`` (fp32; host syncs for the loss and accuracy, the
#                         augmentation's data-dependent branches)
#   fast[-fp32]           the same step with everything on the device: data order (argsort of uniform noise per
#                         member), C4 elements (``torch.randint`` on the GPU), quarter turns as one gather of the
#                         group's cached pixel permutations, no host syncs
#   -bf16                 activations and the convolutions' weights in bf16 (fp32 master weights, fp32 loss)
#   -autocast             ``torch.autocast(bfloat16)`` around the fp32 forward instead (group_norm stays fp32)
#   -nchw                 contiguous NCHW activations instead of channels-last
#   -graph                the whole step (gather, augmentation, forward, backward, SGD) captured in one CUDA graph
#   -compile              the forward + loss through ``torch.compile`` (inductor fuses group_norm + tanh, both ways)
# A variant is NAME:MEMBERS, e.g. ``fast-bf16-graph:1024``; results (member-samples/s, effective TFLOP/s) go to
# ``--json`` after every variant, so a run stopped by a timeout keeps what it measured.
# ------------------------------------------------------------------------------------------------------------------
def member_train_flops(size: int = 28, width: int = 16, depth: int = 3, in_chans: int = 1) -> float:
    """Convolution FLOPs of one member-sample's training step (forward + input and weight gradients: 3x the
    forward; the first layer's input gradient is not needed, counted anyway), full 3x3 kernels as computed."""
    fwd, c = 0, in_chans
    for _ in range(depth):
        fwd += 2 * size * size * width * c * 9
        c = width
    return 3.0 * fwd


def _member_forward(params: dict, buffers: dict, x: torch.Tensor, n: int, *, dtype: torch.dtype,
                    channels_last: bool) -> torch.Tensor:
    """``StackedEnsemble.member_logits`` for small_cnn members on a GPU (the library's ``_small_cnn_grouped``
    without the CPU's chunking), with the activations' dtype and layout as parameters. ``x``: (N, B, C, H, W)."""
    import torch.nn.functional as F

    b = x.shape[1]
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[-2:]).to(dtype)  # (B, N*C, H, W), member-major channels
    h = h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    layer = 0
    while f"features.{layer}.weight" in params:
        w = params[f"features.{layer}.weight"] * buffers[f"features.{layer}.mask"][:, None, None]
        h = F.conv2d(h, w.flatten(0, 1).to(dtype), padding=1, groups=n)
        h = F.group_norm(h, n, params[f"features.{layer + 1}.weight"].flatten().to(dtype),
                         params[f"features.{layer + 1}.bias"].flatten().to(dtype), eps=1e-5)
        h = torch.tanh(h)
        layer += 3
    feats = h.mean(dim=(-2, -1), dtype=torch.float32).view(b, n, -1).transpose(0, 1)  # (N, B, O)
    head_w, head_b = params["head.weight"], params["head.bias"]
    return torch.baddbmm(head_b[:, None, :], feats, head_w.transpose(1, 2))  # (N, B, K), fp32


class _DeviceStep:
    """One training step of ``n`` stacked members with data order, augmentation and optimizer on the device."""

    def __init__(self, n: int, x: torch.Tensor, y: torch.Tensor, *, batch: int, augment: bool, dtype: torch.dtype,
                 autocast: bool, channels_last: bool, compile: bool, seed: int = 0):
        import torch.nn.functional as F

        from equiray.ensembles import MemberSpec, build_members
        from equiray.groups import cyclic

        self.n, self.x, self.y, self.batch, self.augment = n, x, y, batch, augment
        self.ens = build_members(MemberSpec("small_cnn", {"width": 16}), range(seed, seed + n)).to(x.device)
        self.params, self.buffers = self.ens.stacked_state()
        self.opt = torch.optim.SGD(self.ens.parameters(), lr=0.01)
        self.turns = cyclic(4)._quarter_turns(x.shape[-2], x.shape[-1], x.device)  # (4, H*W), what C4's act gathers
        self.idx = torch.zeros(n, batch, dtype=torch.long, device=x.device)  # this step's samples (static for graphs)
        self.loss_sum = torch.zeros((), device=x.device)
        self.gen = torch.Generator(device=x.device).manual_seed(seed)

        def loss_fn(params, buffers, xb, yb):
            with torch.autocast(xb.device.type, torch.bfloat16, enabled=autocast):
                logits = _member_forward(params, buffers, xb, n, dtype=dtype, channels_last=channels_last)
            return F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum") / batch

        self.loss_fn = torch.compile(loss_fn, dynamic=False) if compile else loss_fn

    def epoch_order(self) -> torch.Tensor:
        """Every member its own random order of the data: ``(steps, N, B)`` sample indices."""
        steps = len(self.y) // self.batch
        perm = torch.rand(self.n, len(self.y), device=self.x.device, generator=self.gen).argsort(1)
        return perm[:, :steps * self.batch].view(self.n, steps, self.batch).transpose(0, 1)

    def step(self) -> None:
        n, b = self.n, self.batch
        xb, yb = self.x[self.idx], self.y[self.idx]  # (N, B, C, H, W), (N, B)
        if self.augment:  # a uniformly random quarter turn per sample, drawn on the GPU (graph-safe RNG)
            el = torch.randint(4, (n * b,), device=xb.device)
            c, hw = xb.shape[2], xb.shape[3] * xb.shape[4]
            flat = xb.reshape(n * b, c, hw)
            xb = flat.gather(2, self.turns[el].unsqueeze(1).expand(-1, c, -1)).view_as(xb)
        loss = self.loss_fn(self.params, self.buffers, xb, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach()


def _run_variant(spec: str, x: torch.Tensor, y: torch.Tensor, *, batch: int = 32, epochs: int = 2) -> dict:
    """Train ``spec``'s members ``epochs`` epochs (the first also warms up: cuDNN's autotuning, compilation, graph
    capture) and time the last with CUDA events; returns the measurement."""
    name, members = spec.split(":")
    n = int(members)
    parts = set(name.split("-"))
    out = {"variant": name, "members": n, "images": len(y), "batch": batch}
    size = x.shape[-1]
    flops = member_train_flops(size)
    if "lib" in parts:  # the library's own epoch, as ``equiray ensemble train`` runs it
        equiray_throughput(x[:256], y[:256], n, augment=True, device="cuda")  # warm-up at this size
        torch.cuda.synchronize()
        t = time.perf_counter()
        rate = equiray_throughput(x, y, n, augment=True, device="cuda")
        out.update(member_samples_per_s=rate, seconds=time.perf_counter() - t, tflops=rate * flops / 1e12)
        return out
    unknown = parts - {"fast", "fp32", "bf16", "autocast", "nchw", "graph", "compile", "noaug"}
    if unknown:
        raise ValueError(f"unknown variant part(s) {sorted(unknown)} in {spec!r}")
    torch.backends.cudnn.benchmark = True
    st = _DeviceStep(n, x, y, batch=batch, augment="noaug" not in parts,
                     dtype=torch.bfloat16 if "bf16" in parts else torch.float32, autocast="autocast" in parts,
                     channels_last="nchw" not in parts, compile="compile" in parts)
    graph = None
    t_setup = time.perf_counter()
    order = st.epoch_order()
    warm = min(len(order), 3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture wants
        for s in range(warm):
            st.idx.copy_(order[s])
            st.step()
    torch.cuda.current_stream().wait_stream(side)
    if "graph" in parts:
        graph = torch.cuda.CUDAGraph()
        st.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            st.step()
    torch.cuda.synchronize()
    out["setup_s"] = time.perf_counter() - t_setup
    losses = []
    for epoch in range(epochs):
        st.loss_sum.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        order = st.epoch_order()
        for s in range(len(order)):
            st.idx.copy_(order[s])
            if graph is not None:
                graph.replay()
            else:
                st.step()
        end.record()
        end.synchronize()
        losses.append(float(st.loss_sum) / len(order) / n)  # mean member loss
        ms = start.elapsed_time(end)
    steps = len(order)
    rate = n * batch * steps / (ms / 1e3)
    out.update(member_samples_per_s=rate, seconds=ms / 1e3, step_ms=ms / steps, tflops=rate * flops / 1e12,
               epoch_losses=losses, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    if not all(math.isfinite(v) for v in losses):
        out["error"] = "non-finite loss"
    del st, graph
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def check_member_forward(device: str = "cuda") -> dict:
    """The bench's forward against the library's ``member_logits``: fp32 exactly the same function, bf16 within its
    rounding (relative Frobenius error)."""
    from equiray.ensembles import MemberSpec, build_members

    ens = build_members(MemberSpec("small_cnn", {"width": 16}), range(8)).to(device)
    xb = torch.rand(8, 32, 1, 28, 28, device=device)
    params, buffers = ens.stacked_state()
    with torch.no_grad():
        ref = ens.member_logits(xb).double()
        err = {}
        for name, kw in {"fp32": dict(dtype=torch.float32, channels_last=True),
                         "fp32-nchw": dict(dtype=torch.float32, channels_last=False),
                         "bf16": dict(dtype=torch.bfloat16, channels_last=True)}.items():
            out = _member_forward(params, buffers, xb, 8, **kw).double()
            err[name] = float((out - ref).norm() / ref.norm())
    return err


def run_variants(specs: list[str], x: torch.Tensor, y: torch.Tensor, json_out: str | None) -> list[dict]:
    import traceback

    results = [{"check": check_member_forward()}]
    print(f"forward check (relative error vs the library's member_logits): {results[0]['check']}", flush=True)
    for spec in specs:
        t = time.perf_counter()
        try:
            r = _run_variant(spec, x, y)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not cost the others
            r = {"variant": spec, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
            torch.cuda.empty_cache()
        r["wall_s"] = time.perf_counter() - t
        results.append(r)
        rate = r.get("member_samples_per_s")
        print(f"variant {spec}: " + (f"{rate:,.0f} member-samples/s, {r['tflops']:.1f} TFLOP/s, "
                                     f"step {r.get('step_ms', float('nan')):.2f} ms, losses {r.get('epoch_losses')}"
                                     if rate else r.get("error", "?")) + f"  ({r['wall_s']:.0f} s)", flush=True)
        if json_out:
            Path(json_out).write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------------------------------------------
# ``--ray-config``: a pipeline config (e.g. jobs/configs/ensemble.yaml with --ray-set overrides) through Ray Train,
# as ``equiray ensemble train --config FILE --set ...`` runs it, vs the bare loop over the same member groups in one
# process on the same device (no Ray, no checkpoints, no MLflow).
# ------------------------------------------------------------------------------------------------------------------
def ray_config_vs_bare(config: str, overrides: list[str], workdir: Path) -> dict:
    from mlflow import MlflowClient

    import equiray_pipelines.ensemble.stage as stage
    from equiray.config import load_config
    from equiray.data import read_split, resize
    from equiray.ensembles import MemberGroup, MemberSpec, member_seed
    from equiray.groups import get_group
    from equiray_pipelines._ray import init_ray
    from equiray_pipelines.ensemble import EnsembleConfig, run_train

    cfg = load_config(EnsembleConfig, config, overrides=overrides)
    meta = cfg.data.prepare()
    gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    size = cfg.data.resize or meta["shape"][0]
    x, y = read_split(Path(cfg.data.dir).resolve(), "train", limit=cfg.data.max_train)
    x, y = resize(x, size).to(device), y.to(device)
    groups, group, epochs = cfg.member_groups(), get_group(cfg.group), cfg.train.epochs
    per_member_epoch = (len(y) // cfg.train.batch_size) * cfg.train.batch_size
    work = per_member_epoch * epochs * sum(len(g.members) for g in groups)  # member-samples of the whole run
    out = {"config": config, "overrides": overrides, "device": str(device),
           "members": sum(len(g.members) for g in groups), "groups": len(groups),
           "workers": cfg.scaling.num_workers, "gpus_per_worker": cfg.scaling.gpus_per_worker,
           "images": len(y), "size": size, "epochs": epochs, "member_samples": work}
    if gpu:  # CUDA context and cuDNN handles once, before the bare loop is timed (each Ray worker pays its own)
        equiray_throughput(x[:256].cpu(), y[:256].cpu(), 4, augment=True, device="cuda")
    epoch_s = []  # (gid, epoch, seconds)
    t0 = time.perf_counter()
    for g in groups:
        setting = cfg.settings[g.setting]
        spec = MemberSpec(cfg.member.name, cfg.member_kwargs(setting), int(x.shape[1]), meta["num_classes"])
        grp = MemberGroup.new(spec, [member_seed(cfg.train.seed, m) for m in g.members], init=setting.init,
                              group=cfg.group, optimizer=cfg.train.optimizer, lr=cfg.train.lr, device=device)
        for e in range(epochs):
            _sync(str(device))
            t = time.perf_counter()
            grp.train_epoch(x, y, batch_size=cfg.train.batch_size, group=group if setting.augment else None,
                            device=device)
            _sync(str(device))
            epoch_s.append((g.gid, e + 1, time.perf_counter() - t))
    bare = time.perf_counter() - t0
    steady = sum(s for _, e, s in epoch_s if e > 1)
    out.update(bare_s=bare, bare_rate=work / bare, bare_epoch_s=epoch_s)
    if epochs > 1:
        out["bare_steady_rate"] = work * (epochs - 1) / epochs / steady
    print(f"bare loop: {bare:.1f} s, {work / bare:,.0f} member-samples/s", flush=True)
    del grp, x, y
    if gpu:
        torch.cuda.empty_cache()

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    init_ray(num_gpus=torch.cuda.device_count() if gpu else None)
    timing, fit = {}, stage.fit

    def timed_fit(*a, **k):  # Ray Train's part of the stage: the trainer's fit(), workers' start to last checkpoint
        t = time.perf_counter()
        try:
            return fit(*a, **k)
        finally:
            timing["fit_s"] = time.perf_counter() - t

    stage.fit = timed_fit
    try:
        t = time.perf_counter()
        result = run_train(cfg)
        pipeline = time.perf_counter() - t
    finally:
        stage.fit = fit
    out.update(pipeline_s=pipeline, pipeline_rate=work / pipeline, fit_s=timing.get("fit_s"), run_id=result.run_id,
               phase_seconds=result.phase_seconds,
               train_seconds=result.train_seconds, ratio_pipeline=pipeline / bare, restarts=result.restarts,
               accuracy=result.accuracy, nodes=sorted({n for ns in result.group_nodes.values() for n in ns}))
    if timing.get("fit_s"):
        out.update(fit_rate=work / timing["fit_s"], ratio_fit=timing["fit_s"] / bare)
    # steady state: rank 0 logs each of its epochs to MLflow as it ends; with every worker holding as many groups,
    # a round (one epoch of one group per worker, then a checkpoint of all) does 1/rounds of the run's work
    world = cfg.scaling.num_workers
    mine = [g for g in groups if g.gid % world == 0]
    if len(groups) % world == 0 and epochs > 1:
        stamps = []
        for g in mine:
            stamps += [m.timestamp / 1e3 for m in
                       MlflowClient().get_metric_history(result.run_id, f"train_loss/group{g.gid:05d}")]
        stamps.sort()
        rounds = len(mine) * epochs
        if len(stamps) == rounds:
            round_s = (stamps[-1] - stamps[0]) / (rounds - 1)
            out.update(ray_round_s=round_s, ray_steady_rate=work / rounds / round_s)
            if "bare_steady_rate" in out:
                out["ratio_steady"] = out["bare_steady_rate"] / out["ray_steady_rate"]
    print(f"through Ray: {pipeline:.1f} s for the whole stage ({pipeline / bare:.2f}x the bare loop), fit() "
          f"{timing.get('fit_s', float('nan')):.1f} s; steady state {out.get('ray_steady_rate', float('nan')):,.0f} "
          f"vs bare {out.get('bare_steady_rate', float('nan')):,.0f} member-samples/s "
          f"(ratio {out.get('ratio_steady', float('nan')):.2f})", flush=True)
    return out


def _artifacts(run_id: str, path: str) -> tuple[int, int]:
    """(files, bytes) an MLflow run holds under ``path``."""
    from mlflow import MlflowClient

    files = [f for f in MlflowClient().list_artifacts(run_id, path) if not f.is_dir]
    return len(files), sum(f.file_size or 0 for f in files)


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return my - b * mx, b


@contextlib.contextmanager
def simulated_cluster(workers: int):
    """With ``workers``: a simulated cluster on this machine (a head with one CPU, for Ray Data's reads, and
    ``workers`` one-CPU worker nodes, each a raylet of its own) that ``init_ray`` joins through RAY_ADDRESS;
    without, nothing (the pipeline starts its local Ray)."""
    if not workers:
        yield None
        return
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        old = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = cluster.address
        try:
            yield cluster
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = old
    finally:
        cluster.shutdown()


def scale_table(config: str, overrides: list[str], sizes: list[int], workdir: Path) -> tuple[str, list[dict]]:
    """6.: ``ray_config_vs_bare`` at every ensemble size, as one Markdown table plus its reading."""
    rows = []
    for n in sizes:
        print(f"--- {n} members", flush=True)
        out = ray_config_vs_bare(config, [*overrides, f"members={n}", f"storage_path={workdir / f'runs-{n}'}"],
                                 workdir)
        out["artifacts"], out["artifact_bytes"] = _artifacts(out["run_id"], "members")
        store = [f for f in (workdir / f"runs-{n}").rglob("*") if f.is_file()]
        out["storage_files"], out["storage_bytes"] = len(store), sum(f.stat().st_size for f in store)
        rows.append(out)
    phases = ["worker_train", "worker_group_io", "worker_checkpoint", "fit", "collect", "log_members",
              "evaluate", "log_model"]
    lines = ["| members | groups | bare loop s | pipeline s | overhead s | overhead per member, ms | "
             "fit() s: train / group files / checkpoints (rank 0) | collect s | log members s | evaluate s | "
             "log model s | other s | member artifacts (files, MB) | checkpoint storage at the end (files, MB) |",
             "|" + "---|" * 14]
    for r in rows:
        ph = r["phase_seconds"]
        other = r["pipeline_s"] - sum(ph.get(k, 0.0) for k in phases[3:])
        over = r["pipeline_s"] - r["bare_s"]
        lines.append(
            f"| {r['members']:,} | {r['groups']} | {r['bare_s']:.1f} | {r['pipeline_s']:.1f} | {over:.1f} "
            f"| {1e3 * over / r['members']:.1f} | {ph.get('fit', 0):.1f}: {ph.get('worker_train', 0):.1f} / "
            f"{ph.get('worker_group_io', 0):.1f} / {ph.get('worker_checkpoint', 0):.1f} | {ph.get('collect', 0):.1f} "
            f"| {ph.get('log_members', 0):.1f} | {ph.get('evaluate', 0):.1f} | {ph.get('log_model', 0):.1f} "
            f"| {other:.1f} | {r['artifacts']}, {r['artifact_bytes'] / 2**20:.1f} "
            f"| {r['storage_files']}, {r['storage_bytes'] / 2**20:.1f} |")
    ns = [r["members"] for r in rows]
    a_ray, b_ray = _fit_line(ns, [r["pipeline_s"] for r in rows])
    a_bare, b_bare = _fit_line(ns, [r["bare_s"] for r in rows])
    most = lambda a, b: int((600 - a) / b) if b > 0 and a < 600 else 0  # noqa: E731
    if b_ray <= 0 or b_bare <= 0:
        lines += ["", "The times do not rise with the members here (a cold start in the first size?): no line fitted."]
        return "\n".join(lines), rows
    lines += ["", f"Fitted over the sizes: through Ray {a_ray:.1f} s + {1e3 * b_ray:.1f} ms per member; the bare loop "
              f"{a_bare:.1f} s + {1e3 * b_bare:.1f} ms per member. The largest ensemble in 10 minutes at this "
              f"scale: ~{most(a_ray, b_ray):,} members through Ray, ~{most(a_bare, b_bare):,} without (extrapolated "
              f"from the line, not run)."]
    return "\n".join(lines), rows


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
    parser.add_argument("--variants", help="GPU: time these variants of the member's training step instead "
                        "(comma-separated NAME:MEMBERS, e.g. lib:256,fast-bf16-graph:1024; see the code's notes), "
                        "on --images training images at 28x28")
    parser.add_argument("--ray-config", metavar="FILE", help="instead: this ensemble config through Ray Train "
                        "(`equiray ensemble train --config FILE --set ...`) vs the bare loop over its member groups")
    parser.add_argument("--ray-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for --ray-config, as --set takes it (repeatable)")
    parser.add_argument("--scale", metavar="N1,N2,...", help="with --ray-config: run it at each of these "
                        "ensemble sizes (members=N) and tabulate the pipeline's overhead per member (6.)")
    parser.add_argument("--simulated-nodes", type=int, default=0, metavar="N",
                        help="with --scale: run the pipeline on a simulated cluster on this machine (a head with one "
                        "CPU and N one-CPU worker nodes, ray.cluster_utils.Cluster) instead of a local Ray")
    parser.add_argument("--json", help="with --variants / --ray-config: write the measurements to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    counts = [int(m) for m in args.members.split(",")]
    gpu = args.device.startswith("cuda")

    from equiray.data import SourceOptions, prepare, read_split

    if args.ray_config or args.variants:
        results = {}
        if args.ray_config and args.scale:
            sizes = [int(n) for n in args.scale.split(",")]
            with tempfile.TemporaryDirectory() as tmp, simulated_cluster(args.simulated_nodes):
                table, results["scale"] = scale_table(args.ray_config, args.ray_set, sizes, Path(tmp))
            sets = "".join(f" --ray-set {o}" for o in args.ray_set)
            nodes = f" --simulated-nodes {args.simulated_nodes}" if args.simulated_nodes else ""
            emit(f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_ensemble.py --ray-config "
                 f"{args.ray_config}{sets} --scale {args.scale}{nodes}`\n\n{table}", args.out)
        elif args.ray_config:
            with tempfile.TemporaryDirectory() as tmp:
                results["ray"] = ray_config_vs_bare(args.ray_config, args.ray_set, Path(tmp))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        if args.variants:
            prepare("fashion-mnist", args.data_dir, options=SourceOptions())
            x, y = read_split(Path(args.data_dir).resolve(), "train", limit=args.images)
            results["variants"] = run_variants(args.variants.split(","), x.cuda(), y.cuda(),
                                               args.json and args.json + ".partial")
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=str))
                Path(args.json + ".partial").unlink(missing_ok=True)
        return 0
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
