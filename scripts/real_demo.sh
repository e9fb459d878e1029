#!/usr/bin/env bash
# `make real-demo`: the path of a user with a folder of photos, on the real 11-photo capture in
# ../shared/data/sceaux_castle (its images only; the COLMAP model is recomputed here):
#   photos -> ns-process-data images (COLMAP 3.8 from Debian, CPU) -> ns-train q-splat (one command, the teacher
#   cache filled by tiny random models) -> ns-eval -> qsplat query.
# Writes everything under $OUT (default real_demo_out/); about 10-15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}"
SRC="${QSPLAT_REAL_CAPTURE:-../shared/data/sceaux_castle}"
OUT="${OUT:-real_demo_out}"
STEPS="${STEPS:-500}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QT_QPA_PLATFORM=offscreen
[ -d "$SRC/images" ] || { echo "[real-demo] no photos at $SRC/images (set QSPLAT_REAL_CAPTURE)" >&2; exit 1; }
missing=()
command -v colmap >/dev/null || missing+=(colmap)   # ns-process-data runs COLMAP ...
command -v ffmpeg >/dev/null || missing+=(ffmpeg)   # ... and refuses to start without ffmpeg
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[real-demo] installing Debian's ${missing[*]} (ns-process-data needs them)"
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
export PATH="$VENV/bin:$PATH"
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
if [ ! -f "$OUT/scene/transforms.json" ]; then
  rm -rf "$OUT/photos" "$OUT/scene"; mkdir -p "$OUT/photos"; cp "$SRC"/images/* "$OUT/photos/"
  run ns-process-data images --data "$OUT/photos" --output-dir "$OUT/scene" --no-gpu --num-downscales 0 \
      --matching-method exhaustive --camera-type perspective
fi
run ns-train q-splat --data "$OUT/scene" --output-dir "$OUT/outputs" --experiment-name castle --timestamp demo \
    --machine.device-type cpu --vis tensorboard --max-num-iterations "$STEPS" --steps-per-save "$STEPS" \
    --pipeline.model.num-downscales 0 --pipeline.model.feature-warmup-steps 150 \
    --pipeline.datamanager.teacher-weights random-tiny --pipeline.datamanager.prompts "castle,tree,sky" \
    qsplat-data --downscale-factor 16
CONFIG="$OUT/outputs/castle/q-splat/demo/config.yml"
run ns-eval --load-config "$CONFIG" --output-path "$OUT/metrics.json"
run qsplat query --load-config "$CONFIG" --text castle --output "$OUT/castle.ply" --threshold 0.0
"$VENV/bin/python" - "$OUT/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["results"]
print(f"[real-demo] held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}; metrics in {sys.argv[1]}")
PY
