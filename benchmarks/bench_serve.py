"""Online serving under load: the ensemble vs its distilled student, dynamic batching on vs off, on loopback.

    .venv/bin/python benchmarks/bench_serve.py                      # the full run: 10,000 requests per cell
    .venv/bin/python benchmarks/bench_serve.py --requests 500 --concurrency 1,32   # a quick check
    .venv/bin/python benchmarks/bench_serve.py --requests 10000 --concurrency 32 --noop   # + the HTTP path alone
    python benchmarks/bench_serve.py --model-only --fresh --device cuda   # the replica's work on a GPU node

For each model (``models:/equiray-ensemble@champion``, ``models:/equiray-student@champion`` from the registry in
``MLFLOW_TRACKING_URI`` / ``./mlflow.db``; ``equiray demo`` registers both) and batching on / off, the app is
deployed with ``pipelines.serve.deploy`` (one replica, the settings of ``configs/serve.yaml``) and a closed-loop
load generator (asyncio + aiohttp, in this process) keeps ``C`` clients busy, each sending its next request as
soon as the previous one is answered, until ``--requests`` requests are answered. Every request is one real
Fashion-MNIST test image as a raw ``image/png`` body (cycling through 64 of them). Reported per cell:
throughput (answered requests per second), p50 and p99 latency, errors (any non-200 answer or failed
connection). Then the ratios the serving design is judged by: batching on vs off at each concurrency, student vs
ensemble (batching on) at each concurrency; and, to read them, the replica's own work without HTTP (decode,
resize, forward) at batch 1 and at the maximum batch size: batching can only save what a forward pass of one
image costs beyond its share of a full batch, and no model is served faster than the HTTP path allows.

The load generator, Serve's HTTP proxy and the replica share this machine's cores: on a 2-core machine the
client takes a real share of the CPU, so absolute numbers are lower bounds for a replica on its own node.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import emit, machine  # noqa: E402


def test_pngs(data_dir: str, n: int = 64) -> list[bytes]:
    """``n`` test images as PNG bytes (Fashion-MNIST from the prepared dataset, or seeded noise without it)."""
    from PIL import Image

    try:
        from equiray.data import read_split

        x, _ = read_split(data_dir, "test", limit=n)
        arrays = [(img.squeeze(0).numpy() * 255).round().astype(np.uint8) for img in x]
    except Exception:  # noqa: BLE001 - no prepared dataset: noise images of the same size
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(n)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, bodies: list[bytes], *, requests: int, concurrency: int, warmup: int) -> dict:
    """A closed loop of ``concurrency`` clients until ``requests`` answers; latency per request in ms."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "image/png"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int, record: bool) -> None:
            t = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as res:
                    await res.read()
                    if res.status != 200:
                        errors.append(f"HTTP {res.status}")
            except Exception as exc:  # noqa: BLE001 - any failure is an error of the endpoint under load
                errors.append(type(exc).__name__)
            if record:
                latencies.append(1000 * (time.perf_counter() - t))

        async def client(total: int, record: bool) -> None:
            nonlocal issued
            while issued < total:
                i = issued
                issued += 1
                await one(i, record)

        await asyncio.gather(*(client(warmup, False) for _ in range(concurrency)))
        warm_errors = len(errors)
        issued = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(requests, True) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = np.array(latencies)
    return {"requests": len(lat), "seconds": seconds, "throughput": len(lat) / seconds,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": len(errors) - warm_errors, "warmup_errors": warm_errors,
            "error_kinds": sorted(set(errors))}


def noop_app():
    """A Serve deployment that reads the request body and answers fixed JSON: what the HTTP path alone costs."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=64)
    class NoOp:
        async def __call__(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse({"predictions": []})

    return NoOp.bind()


def demo_shaped(label: str):
    """Untrained models of the demo's shapes (24 ``small_cnn`` members / one student, 14x14 inputs): timing does
    not depend on the weights, so ``--model-only --fresh`` runs where no registry is (a GPU node)."""
    from equiray.ensembles import MemberSpec, build_members
    from equiray.models import create_model

    model = build_members(MemberSpec("small_cnn", {"width": 16, "support": "symmetric"}), range(24)) \
        if label == "ensemble" else create_model("small_cnn", support="symmetric")
    return model.eval(), {"in_chans": 1, "input_shape": [1, 14, 14]}


def model_alone(model, spec: dict, bodies: list[bytes], batch: int, *, device: str = "cpu",
                seconds: float = 3.0) -> dict:
    """The replica's own work without HTTP: images per second of decode + resize + forward at batch 1 and at
    ``batch`` on one torch thread (a replica's default), in this process; on a GPU the forward runs there and
    the answer comes back to the host, as in a GPU replica."""
    import torch

    from equiray.inference import decode_image, predict_detailed, to_model_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = model.to(device)
    out = {}
    for b in (1, batch):
        def step(n: int) -> None:
            imgs = [decode_image(bodies[(n + i) % len(bodies)], in_chans=spec["in_chans"]) for i in range(b)]
            predict_detailed(model, to_model_input(imgs, spec["input_shape"]).to(device)).logits.cpu()

        for _ in range(3):
            step(0)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            step(n)
            n += b
        out[b] = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", default="models:/equiray-ensemble@champion")
    parser.add_argument("--student", default="models:/equiray-student@champion")
    parser.add_argument("--requests", type=int, default=10_000, help="answered requests per cell (default 10,000)")
    parser.add_argument("--concurrency", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--warmup", type=int, default=100, help="unrecorded requests before each cell")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--data-dir", default="data/fashion-mnist")
    parser.add_argument("--noop", action="store_true",
                        help="also load a no-op deployment on the same proxy (the HTTP path's own ceiling)")
    parser.add_argument("--model-only", action="store_true",
                        help="only the replica's own work (decode + forward), no Ray Serve, no HTTP")
    parser.add_argument("--device", default="cpu", help="where --model-only runs the forward pass: cpu or cuda")
    parser.add_argument("--fresh", action="store_true",
                        help="with --model-only: untrained models of the demo's shapes instead of the registry's")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.fresh and not args.model_only:
        parser.error("--fresh needs --model-only (the HTTP benchmark serves registered models)")

    bodies = test_pngs(args.data_dir)
    uris = (("ensemble", args.ensemble), ("student", args.student))
    if args.fresh:
        models = {label: demo_shaped(label) for label, _ in uris}
    else:
        from pipelines import tracking

        models = {label: tracking.load_model(uri) for label, uri in uris}
    t0 = time.perf_counter()
    alone = {label: model_alone(*models[label], bodies, args.max_batch_size, device=args.device)
             for label, _ in uris}
    if args.model_only:
        where = machine() if args.device.startswith("cuda") else f"{machine()}, forward on the CPU"
        emit(alone_table(alone, args.max_batch_size, f"The replica's own work on {where} (decode + resize on the "
                         f"host, one torch thread; forward on {args.device}), images/s; models: "
                         f"{'untrained, the demo shapes' if args.fresh else 'the registry champions'}."), args.out)
        return 0

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve

    from equiray.config import load_config
    from pipelines.serve import ServeConfig, deploy

    results = {}
    try:
        for label, uri in (("ensemble", args.ensemble), ("student", args.student)):
            for batching in (True, False):
                cfg = load_config(ServeConfig, {"model": uri, "port": 0, "app_name": "bench", "batch": {
                    "enabled": batching, "max_batch_size": args.max_batch_size, "wait_timeout_s": args.wait_timeout_s}})
                ep = deploy(cfg)
                for c in levels:
                    r = asyncio.run(load(ep["url"] + "/v1/predict", bodies, requests=args.requests, concurrency=c,
                                         warmup=args.warmup))
                    r["version"] = ep["version"]
                    results[(label, batching, c)] = r
                    print(f"{label:8s} batching {'on ' if batching else 'off'} {c:3d} clients: "
                          f"{r['throughput']:7.1f} req/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:7.1f} ms  "
                          f"errors {r['errors']} {r['error_kinds'] or ''}", flush=True)
        if args.noop:  # the ceiling: Serve's own HTTP path, same proxy and load, no decoding, no model
            serve.run(noop_app(), name="noop", route_prefix="/noop", blocking=False)
            for c in levels:
                r = asyncio.run(load(f"http://{ep['host'] if ep['host'] not in ('0.0.0.0', '::') else '127.0.0.1'}:"
                                     f"{ep['port']}/noop", bodies, requests=args.requests, concurrency=c,
                                     warmup=args.warmup))
                r["version"] = "-"
                results[("no-op", True, c)] = r
                print(f"no-op {c:3d} clients: {r['throughput']:7.1f} req/s  errors {r['errors']}", flush=True)
    finally:
        serve.shutdown()
    emit(table(results, alone, levels, args, machine(), time.perf_counter() - t0), args.out)
    return 0


def alone_table(alone: dict, b: int, title: str) -> str:
    lines = [title, "", f"| model | batch 1 | batch {b} | batch {b} / batch 1 |", "|---|---|---|---|"]
    for label, r in alone.items():
        lines.append(f"| {label} | {r[1]:.0f} | {r[b]:.0f} | {r[b] / r[1]:.2f}x |")
    lines.append(f"| student / ensemble | {alone['student'][1] / alone['ensemble'][1]:.1f}x | "
                 f"{alone['student'][b] / alone['ensemble'][b]:.1f}x | |")
    return "\n".join(lines)


def table(results: dict, alone: dict, levels: list[int], args, where: str, seconds: float) -> str:
    lines = [f"Online serving on {where}: one replica, {args.requests} answered requests per cell (raw PNG "
             f"bodies, closed loop on loopback), max_batch_size {args.max_batch_size}, wait "
             f"{args.wait_timeout_s * 1000:g} ms; {seconds / 60:.1f} min in all.", "",
             "| model | batching | clients | throughput (req/s) | p50 (ms) | p99 (ms) | errors |",
             "|---|---|---|---|---|---|---|"]
    for (label, batching, c), r in results.items():
        name = label if r["version"] == "-" else f"{label} (v{r['version']})"
        lines.append(f"| {name} | {'on' if batching else 'off'} | {c} | {r['throughput']:.1f} | "
                     f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    lines += ["", "| ratio | " + " | ".join(f"{c} clients" for c in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for label in ("ensemble", "student"):
        lines.append(f"| {label}: batching on / off | " + " | ".join(
            f"{results[(label, True, c)]['throughput'] / results[(label, False, c)]['throughput']:.2f}x"
            for c in levels) + " |")
    for batching in (True, False):
        lines.append(f"| student / ensemble, batching {'on' if batching else 'off'} | " + " | ".join(
            f"{results[('student', batching, c)]['throughput'] / results[('ensemble', batching, c)]['throughput']:.2f}x"
            for c in levels) + " |")
    lines += ["", alone_table(alone, args.max_batch_size,
                              "The replica's own work without HTTP (decode + resize + forward, one torch thread), "
                              "images/s:")]
    top = max(levels)
    total = sum(r["requests"] for r in results.values())
    errors = sum(r["errors"] for r in results.values())
    batch_gain = results[("ensemble", True, top)]["throughput"] / results[("ensemble", False, top)]["throughput"]
    student_gain = results[("student", True, top)]["throughput"] / results[("ensemble", True, top)]["throughput"]
    lines += ["", "Goals:",
              f"- batching >= 3x unbatched throughput at {top} clients (ensemble): {batch_gain:.2f}x "
              f"({'met' if batch_gain >= 3 else 'not met'})",
              f"- zero errors: {errors} errors in {total} requests ({'met' if errors == 0 else 'not met'})",
              f"- student >= 5x the ensemble's throughput (batching on, {top} clients): {student_gain:.2f}x "
              f"({'met' if student_gain >= 5 else 'not met'})"]
    if ("no-op", True, top) in results:
        ceiling = results[("no-op", True, top)]["throughput"]
        student = results[("student", True, top)]["throughput"]
        lines += [f"- the HTTP path alone (a no-op Serve deployment on the same proxy, {top} clients): {ceiling:.1f} "
                  f"req/s, the student {student:.1f} req/s: Serve's per-request path, not the model, sets the "
                  f"student's throughput, so over HTTP no model gets past ~"
                  f"{max(ceiling, student) / results[('ensemble', True, top)]['throughput']:.1f}x the ensemble here"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
