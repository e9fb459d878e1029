#!/usr/bin/env bash
# Every GPU check of q-splat in one prepared run, for a machine with an NVIDIA GPU:
#   1. builds what is needed, in the background while the tests run: gsplat's CUDA extension
#      (MAX_JOBS = all cores; ~30-40 min on 2 cores, a few minutes on 16) and our hand CUDA kernel;
#   2. the Triton kernel tests compiled on the GPU (tests/test_rasterize_triton.py);
#   3. every test marked `gpu` (CUDA kernel vs reference and CPU, model pieces on CUDA);
#   4. a short `ns-train q-splat` on a generated scene on CUDA (gsplat RGB), if gsplat built in time;
#   5. benchmarks/bench_gpu.py: Triton and CUDA vs gsplat's rasterize_to_pixels, C = 512, dense and
#      quantile, 640x480, 1e5 and 1e6 Gaussians, peak memory of a training step.
# Writes benchmarks/results/gpu_<gpu>.json (benchmark) and benchmarks/results/gpu_check.json (what
# ran, exit codes, seconds). Budget: under 8 min on a 16-core H100/H200 box; gsplat's build gets
# GSPLAT_BUILD_S seconds (default 300) and is skipped with a note past that, never waited on longer.
#
#   bash scripts/gpu_check.sh                 # from the repository root
#   GSPLAT_BUILD_S=0 bash scripts/gpu_check.sh   # no gsplat: no ns-train, no gsplat baseline
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
VENV=${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}
if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; BIN="$VENV/bin"; else PY=$(command -v python3); BIN=$(dirname "$PY"); fi
LOGS=${GPU_CHECK_LOGS:-$ROOT/gpu_check_logs}
RESULTS=$ROOT/benchmarks/results
mkdir -p "$LOGS" "$RESULTS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET  # compiled kernels here
GSPLAT_BUILD_S=${GSPLAT_BUILD_S:-300}
declare -A RC SECS NOTE

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }
step() {  # step NAME CMD...: run, log, record exit code and seconds
  local name=$1; shift
  local t0=$(date +%s)
  say "$name: $*"
  "$@" > "$LOGS/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  say "$name: exit ${RC[$name]} in ${SECS[$name]} s (log: $LOGS/$name.log)"
  tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
}

# ---- 0. fail fast without a GPU (before building anything)
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check.sh needs an NVIDIA GPU: nvidia-smi is missing or sees no device." >&2
  exit 2
fi
if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> "$LOGS/probe.log"; then
  echo "gpu_check.sh: $PY has no CUDA-enabled torch + triton (torch.cuda.is_available() is False or an import" \
       "failed; see $LOGS/probe.log). Set QSPLAT_VENV to a venv made by 'make venv'." >&2
  exit 2
fi
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
say "$(nvidia-smi -L | head -1); python $PY; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# ---- 1. builds in the background: gsplat's CUDA extension, our CUDA kernel (each needs nvcc)
GSPLAT_PID=""
if [[ "$GSPLAT_BUILD_S" -gt 0 ]]; then
  say "building gsplat's CUDA extension in the background (limit ${GSPLAT_BUILD_S} s)"
  GSPLAT_T0=$(date +%s)
  # Own session, so that a timeout ends the whole build (ninja, nvcc), not just python.
  setsid "$PY" -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat build failed'" \
    > "$LOGS/build_gsplat.log" 2>&1 &
  GSPLAT_PID=$!
else
  NOTE[gsplat]="skipped: GSPLAT_BUILD_S=0"
fi
( t0=$(date +%s); "$PY" -m qrender_ns.cli build-ext --cuda; rc=$?
  echo "q-splat CUDA kernel build: exit $rc in $(( $(date +%s) - t0 )) s"; exit $rc ) > "$LOGS/build_qsplat_cuda.log" 2>&1 &
QSPLAT_CUDA_PID=$!

# ---- 2. Triton kernels, compiled, against the reference (needs no toolkit)
step test_triton "$PY" -m pytest -q -p no:cacheprovider tests/test_rasterize_triton.py

# ---- 3. every `gpu` test (our CUDA kernel once it is built)
wait "$QSPLAT_CUDA_PID"; RC[build_qsplat_cuda]=$?
say "q-splat CUDA kernel build: exit ${RC[build_qsplat_cuda]} ($(tail -n 1 "$LOGS/build_qsplat_cuda.log"))"
step test_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu tests

# ---- 4. gsplat: wait for its build (bounded by its timeout), then the model on CUDA
GSPLAT_OK=0
if [[ -n "$GSPLAT_PID" ]]; then
  while kill -0 "$GSPLAT_PID" 2> /dev/null && (( $(date +%s) - GSPLAT_T0 < GSPLAT_BUILD_S )); do sleep 2; done
  if kill -0 "$GSPLAT_PID" 2> /dev/null; then
    kill -TERM -- "-$GSPLAT_PID" 2> /dev/null; sleep 3; kill -KILL -- "-$GSPLAT_PID" 2> /dev/null
    wait "$GSPLAT_PID" 2> /dev/null; RC[build_gsplat]=124
  else
    wait "$GSPLAT_PID"; RC[build_gsplat]=$?
  fi
  SECS[build_gsplat]=$(( $(date +%s) - GSPLAT_T0 ))
  say "gsplat build: exit ${RC[build_gsplat]} after ${SECS[build_gsplat]} s (124: stopped at the limit; log: $LOGS/build_gsplat.log)"
  if [[ ${RC[build_gsplat]} -eq 0 ]]; then GSPLAT_OK=1
  elif [[ ${RC[build_gsplat]} -eq 124 ]]; then NOTE[gsplat]="build did not finish within ${GSPLAT_BUILD_S} s: no ns-train, no gsplat baseline"
  else NOTE[gsplat]="build failed (exit ${RC[build_gsplat]}; $LOGS/build_gsplat.log)"; fi
fi
if [[ $GSPLAT_OK -eq 1 ]]; then
  step test_gsplat_projection "$PY" -m pytest -q -p no:cacheprovider tests/test_rasterize_triton.py -k gsplat_projection
  SCENE=$LOGS/scene
  step make_scene "$BIN/qsplat" make-scene --out "$SCENE" --layout scannet --seed 2 --num-images 16 --overwrite
  step extract_features "$BIN/qsplat" extract-features --data "$SCENE" --teacher synthetic
  step ns_train "$BIN/ns-train" q-splat --data "$SCENE" --vis tensorboard --max-num-iterations 200 \
    --pipeline.model.feature-warmup-steps 50 --pipeline.model.num-quantiles 8 \
    --output-dir "$LOGS/outputs" --timestamp gpu_check --steps-per-save 200
else
  say "skipping ns-train on CUDA: ${NOTE[gsplat]:-gsplat unavailable}"
fi

# ---- 5. benchmarks (gsplat baseline only when it built)
BENCH_ARGS=()
[[ $GSPLAT_OK -eq 1 ]] || BENCH_ARGS+=(--no-gsplat)
[[ ${RC[build_qsplat_cuda]} -eq 0 ]] || BENCH_ARGS+=(--backends triton)
step bench_gpu "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}"

# ---- summary
TOTAL=$(elapsed)
export TOTAL
{
  for k in "${!RC[@]}"; do echo "rc $k ${RC[$k]}"; done
  for k in "${!SECS[@]}"; do echo "secs $k ${SECS[$k]}"; done
  for k in "${!NOTE[@]}"; do echo "note $k ${NOTE[$k]}"; done
} > "$LOGS/summary.txt"
"$PY" - "$LOGS/summary.txt" "$RESULTS/gpu_check.json" <<'EOF'
import json, os, subprocess, sys, time
rc, secs, notes = {}, {}, {}
for line in open(sys.argv[1]):
    kind, key, value = line.rstrip("\n").split(" ", 2)
    {"rc": rc, "secs": secs, "note": notes}[kind][key] = int(value) if kind != "note" else value
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
out = dict(gpu=gpu, cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"), total_seconds=int(os.environ["TOTAL"]),
           exit_codes=rc, step_seconds=secs, notes=notes)
tmp = sys.argv[2] + ".tmp"
open(tmp, "w").write(json.dumps(out, indent=2))
os.replace(tmp, sys.argv[2])
print(json.dumps(out, indent=2))
EOF
say "done in ${TOTAL} s; results: $RESULTS/gpu_check.json and $RESULTS/gpu_*.json"
FAILED=0
for k in test_triton test_gpu test_gsplat_projection bench_gpu ns_train make_scene extract_features; do
  [[ -z "${RC[$k]+x}" || ${RC[$k]} -eq 0 ]] || FAILED=1
done
exit $FAILED
