#!/usr/bin/env bash
# The GPU checks of issue 21 in one device run: tests/test_cuda.py, the ensemble pipeline through Ray Train on the
# GPU (jobs/configs/ensemble.yaml's fractional GPUs: 4 workers x 0.25 GPU) vs the bare loop over the same member
# groups, then variants of the member's training step (bf16, channels-last vs NCHW, CUDA graphs, torch.compile,
# larger member groups) toward 1M member-samples/s. Logs and JSON go to $OUT (7 files, flat); a summary is last.
#
# Here, once (builds what travels; both paths are ignored through .git/info/exclude):
#   benchmarks/gpu_check.sh prepare   # .device-site/site.tar.xz (Ray + MLflow, ~45 MB) and .gpu-data/ (a 5 MB
#                                     # Fashion-MNIST subset in the pipeline's Parquet format)
#   benchmarks/gpu_check.sh           # a dry run on this machine's CPU: the GPU parts are skipped
# On the device (the device tool's `run`; one H200, Python 3.12 + torch there, equiray from the tree):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".device-site", ".gpu-data"], timeout_s=400)
# Every step has its own timeout, so one hang does not eat the run; the whole script ends within BUDGET_S (380).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=.gpu-data/fashion-mnist
# Packages the image lacks beyond device-site's own list (found by importing the archive under Python 3.12):
# importlib-metadata 10 needs lazy-importer; alembic needs mako; mlflow-skinny needs python-dotenv, and its SQLite
# store cryptography; Ray's dashboard (ray.init fails without it) needs opentelemetry-exporter-prometheus and, through
# opencensus, google.rpc (googleapis-common-protos, which wants protobuf >= 6.33: carried, the version tested here).
EXTRA_PACKAGES="lazy-importer mako python-dotenv opentelemetry-exporter-prometheus cryptography cffi pycparser
  googleapis-common-protos protobuf"

if [ "${1:-}" = prepare ]; then
  EXTRA="$EXTRA_PACKAGES" ../shared/tools/device-site || exit 1
  grep -qx "/.gpu-data/" .git/info/exclude || echo "/.gpu-data/" >> .git/info/exclude
  PY=${PYTHON:-.venv/bin/python}
  "$PY" - "$DATA" <<'EOF' || exit 1
import sys
from pathlib import Path

from equiray.data import SourceOptions, load_source, write_parquet
from equiray.data.sources import ImageDataset

out = sys.argv[1]
keep = {"train": 8000, "val": 200, "test": 1000}
opts = SourceOptions(cache_dir=Path(".cache/equiray"))
ds = load_source("fashion-mnist", opts)
sub = ImageDataset(ds.source, ds.classes, {k: v[:keep[k]] for k, v in ds.images.items()},
                   {k: v[:keep[k]] for k, v in ds.labels.items()}, {k: v[:keep[k]] for k, v in ds.indices.items()})
# the options prepare() compares are SourceOptions' defaults, so the pipeline takes this folder as prepared
options = {"val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction, "seed": opts.seed,
           "size": opts.size, "channels": opts.channels, "max_per_split": opts.max_per_split}
meta = write_parquet(sub, out, overwrite=True,
                     extra_meta={"options": options, "subset": "the first rows of each split"})
print(out, meta["rows"])
EOF
  du -sh .device-site "$DATA"
  exit 0
fi

export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true \
  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false RAY_DEDUP_LOGS=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-380}
start=$SECONDS
if [ ! -x .venv/bin/python ] && [ -f .device-site/site.tar.xz ]; then  # the device: no virtualenv, no Ray there
  PY=python3
  mkdir -p /tmp/site && tar xJf .device-site/site.tar.xz -C /tmp/site || echo "unpacking the site failed"
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else  # here: the project's virtualenv
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD
fi
left() { echo $(( BUDGET_S - (SECONDS - start) )); }
# step NAME LIMIT_S CMD...: CMD under its own timeout (never past the budget), its output to $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 20 ]; then echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"; return; fi
  local t=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( SECONDS - t )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

{
  echo "== $(date -u +%FT%TZ) $(uname -m)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'cudnn', torch.backends.cudnn.version())"
  $PY -c "import ray, mlflow, ray.dashboard.optional_deps; print('ray', ray.__version__, 'mlflow', mlflow.__version__)"
  df -h /dev/shm /tmp 2>&1 | tail -2; nproc
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 1. the library's GPU paths (on CPU here: the same tests against the CPU, EQUIRAY_TEST_DEVICE=cpu)
if [ "$GPU" = 1 ]; then
  step test_cuda 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
else
  step test_cuda 100 env EQUIRAY_TEST_DEVICE=cpu $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
tail -3 "$OUT/test_cuda.log"

# 2. jobs/configs/ensemble.yaml through Ray Train (4 workers x 0.25 GPU, groups of 64, C4, SGD lr 0.01, batch 32)
# at a small scale (4 settings x 64 members = 4 groups of 64, 6,000 images at 28x28, 3 epochs), vs the bare loop
RAY_SET=(--ray-set data.dir=$DATA --ray-set data.download=false --ray-set storage_path=/tmp/equiray-runs
         --ray-set eval.max_eval=500)
if [ "$GPU" = 1 ]; then
  RAY_SET+=(--ray-set data.max_train=6000 --ray-set members=64 --ray-set train.epochs=3
            --ray-set scaling.num_workers=4)
else  # the same plumbing on 2 CPU cores, tiny
  RAY_SET+=(--ray-set data.max_train=256 --ray-set data.resize=14 --ray-set members=2 --ray-set members_per_group=2
            --ray-set train.epochs=2 --ray-set scaling.use_gpu=false --ray-set scaling.num_workers=2
            --ray-set scaling.cpus_per_worker=0.5)
fi
step ray 170 $PY benchmarks/bench_ensemble.py --ray-config jobs/configs/ensemble.yaml "${RAY_SET[@]}" \
  --json "$OUT/ray.json"
grep -E "^(bare loop|through Ray)|Error|error:" "$OUT/ray.log" | tail -5

# 3. the member's training step on the GPU: the library's epoch, then the variants (most telling first)
if [ "$GPU" = 1 ]; then
  # eager ones first (a failed graph capture could leave the CUDA context unusable), compilation last (slowest)
  VARIANTS=lib:256,fast:1024,fast-bf16:1024,fast-autocast:1024,fast-bf16-nchw:1024,fast-bf16-graph:1024
  VARIANTS+=,fast-bf16-graph:256,fast-bf16-compile:1024,fast-bf16-compile-graph:1024,fast-bf16-compile-graph:2048
  step variants 200 $PY benchmarks/bench_ensemble.py --variants "$VARIANTS" --images 2000 \
    --data-dir "$DATA" --json "$OUT/variants.json"
  grep -E "^(forward check|variant )" "$OUT/variants.log"
else
  echo "variants: skipped (no GPU)" | tee -a "$OUT/summary.txt"
fi

# the summary last (the device tool returns the end of the output)
$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("== summary")
for line in (out / "test_cuda.log").read_text().splitlines()[-1:] if (out / "test_cuda.log").exists() else []:
    print("test_cuda:", line)
try:
    r = json.loads((out / "ray.json").read_text())["ray"]
    print(f"ray: {r['members']} members, {r['groups']} groups, {r['workers']} workers x {r['gpus_per_worker']} GPU, "
          f"{r['images']} images {r['size']}px, {r['epochs']} epochs, {r['member_samples']:,} member-samples on "
          f"{r['device']}")
    print(f"  bare {r['bare_s']:.1f} s = {r['bare_rate']:,.0f}/s (steady {r.get('bare_steady_rate', 0):,.0f}/s); "
          f"stage {r['pipeline_s']:.1f} s = {r['pipeline_rate']:,.0f}/s ({r['ratio_pipeline']:.2f}x); fit() "
          f"{r.get('fit_s') or 0:.1f} s ({r.get('ratio_fit', 0):.2f}x); "
          f"Ray steady {r.get('ray_steady_rate', 0):,.0f}/s (round {r.get('ray_round_s', 0):.2f} s; "
          f"bare/Ray {r.get('ratio_steady', 0):.2f}x)")
except Exception as exc:
    print("ray: no result", exc)
for name in ("variants.json", "variants.json.partial"):
    if (out / name).exists():
        data = json.loads((out / name).read_text())
        for v in data["variants"] if isinstance(data, dict) else data:
            if "check" in v:
                print("forward check:", {k: f"{e:.1e}" for k, e in v["check"].items()})
            elif "member_samples_per_s" in v:
                print(f"  {v['variant']:<26} N={v['members']:<5} {v['member_samples_per_s']:>12,.0f}/s "
                      f"{v['tflops']:5.1f} TFLOP/s  step {v.get('step_ms', float('nan')):7.2f} ms  "
                      f"setup {v.get('setup_s', 0):5.1f} s  loss {v.get('epoch_losses')}")
            else:
                print(f"  {v.get('variant')}: {v.get('error', '?')[:300]}")
        break
EOF
echo "total $(( SECONDS - start )) s"
