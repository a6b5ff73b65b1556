#!/usr/bin/env bash
# The README's screenshots of the MLflow UI, as a user sees them after `make demo`: the demo's run (its stages'
# minutes, the report and plots as artifacts) and the robust champion in the model registry. Headless Debian
# Chromium against `mlflow server` on this machine's mlflow.db (nothing leaves the machine).
#   docs/screenshots.sh            # after `make demo`; writes docs/mlflow_*.png
set -euo pipefail
cd "${REPO:-$(dirname "$0")/..}"  # REPO: another checkout whose mlflow.db to show
PORT=${PORT:-5055}
OUT=${OUT:-docs}
PY=.venv/bin/python
[ -f mlflow.db ] || { echo "error: no mlflow.db here: run \`make demo\` first" >&2; exit 2; }
if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium (headless screenshots)..." >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq chromium >/dev/null; else sudo apt-get install -y -qq chromium >/dev/null; fi
fi
.venv/bin/mlflow server --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port "$PORT" \
  >/tmp/equiray-mlflow-ui.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "error: mlflow server did not start (/tmp/equiray-mlflow-ui.log)" >&2; exit 1; }
read -r exp run <<<"$($PY - <<PYEOF
import mlflow
c = mlflow.MlflowClient("sqlite:///$PWD/mlflow.db")
e = c.get_experiment_by_name("equiray-demo")
r = c.search_runs([e.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
print(e.experiment_id, r.info.run_id)
PYEOF
)"
shot() {  # URL FILE
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$(mktemp -d)" \
    --window-size=1440,1000 --virtual-time-budget=20000 --screenshot="$2" "$1" 2>/dev/null
  echo "wrote $2"
}
base="http://127.0.0.1:$PORT/#"
shot "$base/experiments/$exp/runs/$run" "$OUT/mlflow_demo_run.png"

shot "$base/models/equiray-robust" "$OUT/mlflow_robust_model.png"
