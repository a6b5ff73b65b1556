#!/usr/bin/env bash
# The README's screenshot of equiray's progress on a terminal: a short demo (pretraining for one epoch, then the
# C8 canonicalization sweep) recorded with `script`, on an MLflow store and report folder of its own (the
# checkout's registry and reports are left alone); pyte replays the recording and the frame with the most bars
# running is photographed by headless Debian Chromium. About 3 minutes on 2 cores.
#   docs/progress_screenshot.sh      # writes docs/progress_bars.png
set -euo pipefail
cd "${REPO:-$(dirname "$0")/..}"
OUT=${OUT:-docs}
PY=.venv/bin/python
[ -x .venv/bin/equiray ] || { echo "error: no .venv here: run \`make setup\` first" >&2; exit 2; }
$PY -c "import pyte" 2>/dev/null || .venv/bin/pip install -q pyte
if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium (headless screenshots)..." >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq chromium >/dev/null; else sudo apt-get install -y -qq chromium >/dev/null; fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cols=110 rows=32
MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" EQUIRAY_PROGRESS=bars script -q -f --log-timing "$work/timing" \
  -c "stty cols $cols rows $rows; .venv/bin/equiray demo --fresh --report-dir $work/reports \
      --set 'stages=[pretrain,canon]' --set pretrain.train.epochs=1 --set pretrain.storage_path=$work/runs \
      --set canon.storage_path=$work/runs" "$work/typescript" >/dev/null
$PY docs/terminal_frame.py "$work/typescript" "$work/timing" --cols $cols --rows $rows --out "$work/frame.html" \
  --showing "[canon] trials"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/chromium" \
  --window-size=1050,$((rows * 19 + 30)) --screenshot="$OUT/progress_bars.png" "file://$work/frame.html" 2>/dev/null
echo "wrote $OUT/progress_bars.png"
