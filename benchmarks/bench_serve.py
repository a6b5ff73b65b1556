"""Online serving under load: equiray's endpoint against the server a user would write instead, on loopback.

    make bench-setup                                     # installs `hey`, the load generator (a C-speed Go binary)
    .venv/bin/python benchmarks/bench_serve.py            # equiray (direct ingress, proxy) vs FastAPI, 3 repeats
    .venv/bin/python benchmarks/bench_serve.py --requests 1000 --repeats 1        # a quick look
    .venv/bin/python benchmarks/bench_serve.py --ensemble-vs-student --noop       # the issue-7 study (below)
    python benchmarks/bench_serve.py --model-only --fresh --device cuda   # the replica's work on a GPU node

The default run (issue 19) serves one registered model (``--model``, default ``models:/equiray-robust@champion``
from the registry in ``MLFLOW_TRACKING_URI`` / ``./mlflow.db``; ``equiray demo`` registers it) three ways and loads
each with ``hey`` at ``--clients`` concurrent clients: equiray's endpoint as ``equiray serve run`` starts it (the
replica's own port, direct ingress), the same deployment through Serve's proxy, and ``benchmarks/fastapi_peer.py``
(FastAPI + uvicorn, one process, no batching, the model loaded with ``mlflow.pyfunc.load_model``). Two request
shapes: one raw PNG per request, and 16 PNGs per multipart request. The three servers take turns, ``--repeats``
times, so drift on the machine falls on all of them; ratios are taken per repeat and reported as a mean with a
95% interval. Beside them, the ceiling: the replica's own work without HTTP (decode, resize, forward) at batch 1
and 16. Server, load generator and Ray share the machine's cores: on 2 cores, absolute numbers are lower bounds.

``--ensemble-vs-student`` runs the earlier study instead: for each of ``models:/equiray-ensemble@champion`` and
``models:/equiray-student@champion``, batching on and off, a closed-loop asyncio client at each concurrency
(answered requests per second, p50, p99, errors), and the ratios batching on / off and student / ensemble;
``--noop`` adds a no-op deployment on the same proxy (the HTTP path's own ceiling).
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


# ------------------------------------------------------------------------------------ equiray vs a peer server
def multipart(bodies: list[bytes]) -> tuple[bytes, str]:
    """``bodies`` as one multipart/form-data body of PNG files, and its Content-Type."""
    boundary = "equiraybench7f3a"
    parts = [b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" +
             f"{i}.png".encode() + b"\"\r\nContent-Type: image/png\r\n\r\n" + body + b"\r\n"
             for i, body in enumerate(bodies)]
    return b"".join(parts) + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def hey(url: str, body: bytes, ctype: str, *, requests: int, clients: int) -> dict:
    """``requests`` POSTs of ``body`` at ``clients`` concurrent connections with ``hey``: req/s, p50, p99 (ms),
    errors (non-200 answers and failed connections)."""
    import re
    import shutil
    import subprocess
    import tempfile

    if shutil.which("hey") is None:
        raise SystemExit("error: the load generator `hey` is not installed: `make bench-setup` (or apt-get install "
                         "hey) installs it")
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        out = subprocess.run(["hey", "-n", str(requests), "-c", str(clients), "-m", "POST", "-T", ctype, "-D",
                              f.name, "-t", "60", url], capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    ok = sum(int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out) if code == "200")
    sent = requests // clients * clients  # hey splits -n evenly over its -c workers, rounding down
    return {"rps": number(r"Requests/sec:\s+([\d.]+)"), "p50": 1000 * number(r"50%+ in ([\d.]+) secs"),
            "p99": 1000 * number(r"99%+ in ([\d.]+) secs"), "errors": sent - ok}


def start_peer(uri: str, port: int, probe: bytes):
    """``benchmarks/fastapi_peer.py`` serving ``uri`` on ``port``, once it answers a PNG."""
    import subprocess

    import requests as http

    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "fastapi_peer.py"), "--model", uri, "--port",
                             str(port)], cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the FastAPI peer exited with status {proc.returncode} before answering")
        try:
            if http.post(f"http://127.0.0.1:{port}/v1/predict", data=probe, headers={"Content-Type": "image/png"},
                         timeout=5).status_code == 200:
                return proc
        except http.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the FastAPI peer did not answer within 180 s")


def vs_peer(args) -> str:
    """equiray (direct ingress, proxy) against the FastAPI peer on the same model and load; the table."""
    import socket

    from ray import serve

    from equiray.config import load_config
    from equiray.stats import mean_interval
    from equiray_pipelines import tracking
    from equiray_pipelines.serve import ServeConfig, deploy

    bodies = test_pngs(args.data_dir)
    model, spec = tracking.load_model(args.model)
    alone = model_alone(model, spec, bodies, 16)
    shapes = {1: (bodies[0], "image/png"), 16: multipart(bodies[:16])}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        peer_port = sock.getsockname()[1]
    cfg = load_config(ServeConfig, {"model": args.model, "port": 0, "app_name": "bench", "ingress": "direct"})
    t0 = time.perf_counter()
    ep = deploy(cfg)
    if ep["ingress"] != "direct":
        raise SystemExit("error: direct ingress did not come up (is RAY_ADDRESS set to a cluster without it?)")
    peer = start_peer(args.model, peer_port, bodies[0])
    servers = {"equiray (direct ingress)": ep["url"], "equiray (Serve proxy)": ep["proxy_url"],
               "FastAPI + uvicorn": f"http://127.0.0.1:{peer_port}"}
    runs: dict = {(name, n): [] for name in servers for n in shapes}
    try:
        for n, (body, ctype) in shapes.items():  # warm every server up on both shapes first
            for url in servers.values():
                hey(url + "/v1/predict", body, ctype, requests=200, clients=args.clients)
        for r in range(args.repeats):
            for n, (body, ctype) in shapes.items():
                for name, url in servers.items():
                    res = hey(url + "/v1/predict", body, ctype, requests=args.requests // (4 if n > 1 else 1),
                              clients=args.clients)
                    res["ips"] = res["rps"] * n
                    runs[(name, n)].append(res)
                    print(f"repeat {r + 1}/{args.repeats}  {n:2d} image(s)/request  {name:26s} {res['rps']:7.1f} "
                          f"req/s  p99 {res['p99']:6.1f} ms  errors {res['errors']}", flush=True)
    finally:
        peer.terminate()
        peer.wait(30)
        serve.shutdown()
    after = model_alone(model, spec, bodies, 16)  # the ceiling again, on the same idle machine: the mean of both
    alone = {b: (alone[b] + after[b]) / 2 for b in alone}
    minutes = (time.perf_counter() - t0) / 60
    peer_name = "FastAPI + uvicorn"
    lines = [f"Serving `{args.model}` (version {ep['version']}) on {machine()}: `hey`, {args.clients} clients, "
             f"{args.requests} requests of one PNG / {args.requests // 4} of 16 PNGs per cell, {args.repeats} "
             f"repeats taking turns, mean and 95% interval over repeats; {minutes:.1f} min in all. equiray: "
             f"one replica, one torch thread, batching max 32 / 5 ms; the peer: one process, no batching, one torch "
             f"thread.", "",
             "| server | images / request | req/s | images/s | p50 (ms) | p99 (ms) | errors |",
             "|---|---|---|---|---|---|---|"]
    for (name, n), rs in runs.items():
        rps, p50, p99 = (mean_interval([r[k] for r in rs]) for k in ("rps", "p50", "p99"))
        lines.append(f"| {name} | {n} | {rps.format(0)} | {rps.mean * n:.0f} | {p50.format(1)} | {p99.format(1)} | "
                     f"{sum(r['errors'] for r in rs)} |")
    lines += ["", f"| ratio to the FastAPI peer (per repeat) | throughput, 1 image | p99, 1 image | images/s, 16 "
              "images |", "|---|---|---|---|"]
    verdicts = {}
    for name in servers:
        if name == peer_name:
            continue
        cells = []
        for n, key, goal, better in ((1, "rps", 0.8, "high"), (1, "p99", 1.5, "low"), (16, "ips", 0.8, "high")):
            ratio = mean_interval([a[key] / b[key] for a, b in zip(runs[(name, n)], runs[(peer_name, n)])])
            met = ratio.low >= goal if better == "high" else ratio.high <= goal
            if ratio.n < 2:
                met_word = "one run"
            else:
                met_word = "met" if met else ("not met" if (ratio.high < goal if better == "high" else
                                                            ratio.low > goal) else "level with the goal")
            shown = f"{ratio.mean:.2f}x" + (f" [{ratio.low:.2f}, {ratio.high:.2f}]" if ratio.n > 1 else "")
            cells.append(f"{shown} ({'>=' if better == 'high' else '<='} {goal}x: {met_word})")
            verdicts[(name, key)] = met_word
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"The ceiling, the replica's own work without HTTP (decode + resize + forward, one torch thread; "
              f"measured before and after the load, the mean): "
              f"{alone[1]:.0f} images/s at batch 1, {alone[16]:.0f} at batch 16. Over HTTP, single-image requests "
              f"reach {mean_interval([r['rps'] for r in runs[('equiray (direct ingress)', 1)]]).mean / alone[1]:.0%} "
              f"of the batch-1 ceiling with equiray's endpoint and "
              f"{mean_interval([r['rps'] for r in runs[(peer_name, 1)]]).mean / alone[1]:.0%} with the peer."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/equiray-robust@champion",
                        help="the model served by equiray and by the FastAPI peer (default run)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default run; default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="turns each server takes (default run; default 3)")
    parser.add_argument("--ensemble-vs-student", action="store_true",
                        help="the issue-7 study: ensemble vs student, batching on vs off, asyncio client")
    parser.add_argument("--ensemble", default="models:/equiray-ensemble@champion")
    parser.add_argument("--student", default="models:/equiray-student@champion")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per cell (default 3,000 in the default run, 10,000 in the study)")
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
    if not (args.model_only or args.ensemble_vs_student):
        args.requests = args.requests or 3000
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        emit(vs_peer(args), args.out)
        return 0
    args.requests = args.requests or 10_000
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.fresh and not args.model_only:
        parser.error("--fresh needs --model-only (the HTTP benchmark serves registered models)")

    bodies = test_pngs(args.data_dir)
    uris = (("ensemble", args.ensemble), ("student", args.student))
    if args.fresh:
        models = {label: demo_shaped(label) for label, _ in uris}
    else:
        from equiray_pipelines import tracking

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
    from equiray_pipelines.serve import ServeConfig, deploy

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
