#!/usr/bin/env bash
# q-splat's GPU checks in one run, for a bare, offline GPU machine (docs/api.md, "GPU backends"; docs/development.md):
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# Steps, each with its own time limit (the whole run stays under GPU_CHECK_BUDGET_S, default 530 s):
#   probe     which python, torch / CUDA / triton, nvidia-smi; what is missing. No GPU: stop here (exit 2).
#   env       if gsplat, jaxtyping, rich, ninja or pytest do not import: a venv in OUT_DIR over the machine's
#             python (--system-site-packages: its torch and triton) with the wheels of gpu_wheels/ installed
#             offline (scripts/fetch_gpu_wheels.sh downloads them on a machine with the registry).
#   builds    in the background: gsplat's CUDA ops (gsplat 1.4.0 ships none: its first call JIT-builds ~24 .cu
#             files; limit GSPLAT_BUILD_S, default 300) and our hand CUDA kernel (limit 240 s).
#   (a) test_triton, test_cuda: Triton and hand-CUDA kernels vs the pure-torch reference on the GPU, values and
#             gradients (tests/test_rasterize_triton.py compiled; the `gpu` tests of test_rasterize_cuda.py).
#   (b) bench: benchmarks/bench_gpu.py, ours vs gsplat's rasterizer at C = 512 (channel chunks of 32), dense and
#             K = 8 / 10, forward and forward+backward, 640x480, 1e5 and 1e6 Gaussians, peak GPU memory.
#   (c) ns_train, ns_eval, query: `ns-train q-splat` on CUDA for 200 steps on a generated scene, then ns-eval
#             (loads the checkpoint) and `qsplat query`; only where nerfstudio and tyro import (their wheels
#             and dependencies are ~140 MB, over what travels with the tree: see docs/development.md).
# Always writes OUT_DIR/gpu_check.json (every step's exit code, seconds, note; what the probe found), also
# when a step fails or the run stops early; logs in OUT_DIR/logs, benchmark JSON in OUT_DIR.
set -uo pipefail
if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR  (writes OUT_DIR/gpu_check.json and logs)" >&2
  exit 2
fi
mkdir -p "$1/logs" || { echo "gpu_check.sh: cannot create $1/logs" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
LOGS=$OUT/logs
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-530}
WHEELS=${QSPLAT_WHEELS:-$ROOT/gpu_wheels}
GSPLAT_BUILD_S=${GSPLAT_BUILD_S:-300}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export QSPLAT_EXT_DIR=${QSPLAT_EXT_DIR:-$OUT/ext}
unset TRITON_INTERPRET  # compiled kernels here

declare -A RC SECS NOTE
ORDER=()
FOUND=()   # "key=value" lines of what the probe found
STOPPED=""

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }
json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; s=${s//$'\t'/ }; printf '"%s"' "$s"; }

write_summary() {
  local tmp=$OUT/gpu_check.json.tmp first=1 k
  {
    printf '{\n  "total_seconds": %s,\n  "budget_seconds": %s,\n  "stopped": %s,\n' "$(elapsed)" "$BUDGET" \
      "$(json_str "$STOPPED")"
    printf '  "found": {'
    for k in "${FOUND[@]}"; do
      [[ $first -eq 1 ]] || printf ','; first=0
      printf '\n    %s: %s' "$(json_str "${k%%=*}")" "$(json_str "${k#*=}")"
    done
    printf '\n  },\n  "steps": ['
    first=1
    for k in "${ORDER[@]}"; do
      [[ $first -eq 1 ]] || printf ','; first=0
      printf '\n    {"name": %s, "exit_code": %s, "seconds": %s, "note": %s}' "$(json_str "$k")" \
        "${RC[$k]:-null}" "${SECS[$k]:-null}" "$(json_str "${NOTE[$k]:-}")"
    done
    printf '\n  ]\n}\n'
  } > "$tmp" && mv "$tmp" "$OUT/gpu_check.json"
}
trap write_summary EXIT

record() {  # record NAME RC SECONDS NOTE
  [[ -n "${RC[$1]+x}" ]] || ORDER+=("$1")
  RC[$1]=$2; SECS[$1]=$3; NOTE[$1]=$4
}
skip() { record "$1" null 0 "skipped: $2"; say "$1: skipped: $2"; }
step() {  # step NAME LIMIT_S CMD...: run with a time limit (never past the budget), log, record
  local name=$1 limit=$2; shift 2
  local budget_left; budget_left=$(left)
  (( limit > budget_left )) && limit=$budget_left
  if (( limit < 15 )); then skip "$name" "no time left in the ${BUDGET} s budget"; return 1; fi
  local t0; t0=$(date +%s)
  say "$name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$? note=""
  (( rc == 124 || rc == 137 )) && note="stopped at its ${limit} s limit"
  record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note"
  say "$name: exit $rc in ${SECS[$name]} s ${note:+($note) }(log: $LOGS/$name.log)"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/    /'
  return $rc
}

# ---- probe: which python, and what it has. Never a silent fallback: say which and why.
if [[ -n "${QSPLAT_PYTHON:-}" ]]; then PY=$QSPLAT_PYTHON; WHY="QSPLAT_PYTHON"
elif [[ -x "${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}/bin/python" ]]; then
  PY=${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}/bin/python; WHY="q-splat's venv (make venv)"
else PY=$(command -v python3 || true); WHY="python3 on PATH (no q-splat venv here)"; fi
FOUND+=("python=${PY:-none} ($WHY)")
GPU_LINE=$(nvidia-smi -L 2> /dev/null | head -1)
FOUND+=("nvidia_smi=${GPU_LINE:-no GPU listed (nvidia-smi missing or sees no device)}")
PROBE_PY='
import importlib, sys
print("python_version=" + sys.version.split()[0])
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch=%s (CUDA build %s)" % (torch.__version__, torch.version.cuda))
    print("torch_cuda_available=%s" % cuda)
    if cuda:
        print("gpu=%s, capability %d.%d" % ((torch.cuda.get_device_name(0),) + torch.cuda.get_device_capability(0)))
except Exception as e:
    print("torch=missing (%s)" % e)
missing = [] if "torch" in sys.modules else ["torch"]
for name in ("triton", "numpy", "gsplat", "jaxtyping", "rich", "ninja", "pytest", "tyro", "nerfstudio"):
    try:
        module = importlib.import_module(name)
        print("%s=%s" % (name, getattr(module, "__version__", "present")))
    except Exception as e:
        missing.append(name)
print("missing=" + (" ".join(missing) or "none"))
'
probe() { "$PY" -c "$PROBE_PY" 2>&1; }
if [[ -z "$PY" ]]; then
  STOPPED="no python3 on PATH"; say "$STOPPED"; exit 2
fi
while IFS= read -r line; do [[ "$line" == *=* ]] && FOUND+=("$line"); done < <(probe)
say "python: $PY ($WHY)"
for line in "${FOUND[@]}"; do echo "    $line"; done
HAS_CUDA=$(printf '%s\n' "${FOUND[@]}" | grep -c '^torch_cuda_available=True')
if [[ -z "$GPU_LINE" || "$HAS_CUDA" -eq 0 ]]; then
  STOPPED="no usable GPU: nvidia-smi lists ${GPU_LINE:-nothing}; torch.cuda.is_available() is not True for $PY"
  record probe 2 "$(elapsed)" "$STOPPED"
  echo "gpu_check.sh: $STOPPED. Found: $(printf '%s; ' "${FOUND[@]}")" >&2
  echo "gpu_check.sh: summary in $OUT/gpu_check.json" >&2
  exit 2
fi
record probe 0 "$(elapsed)" ""
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}

# ---- env: the missing pure-python pieces from gpu_wheels/ (offline), in a venv over the machine's python
MISSING=$(printf '%s\n' "${FOUND[@]}" | sed -n 's/^missing=//p')
NEEDED=$(printf '%s\n' $MISSING | grep -Ex 'gsplat|jaxtyping|rich|ninja|pytest|numpy' | tr '\n' ' ')
if [[ -n "${NEEDED// /}" ]]; then
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    if step env 120 bash "$ROOT/scripts/install_gpu_wheels.sh" "$PY" "$WHEELS" "$OUT/pyenv"; then
      PY=$OUT/pyenv/bin/python
      FOUND+=("python_after_env=$PY")
      while IFS= read -r line; do [[ "$line" == missing=* ]] && FOUND+=("after_env_$line"); done < <(probe)
    fi
  else
    skip env "$NEEDED missing and no wheels in $WHEELS (run scripts/fetch_gpu_wheels.sh where PyPI is reachable)"
  fi
fi
BIN=$(dirname "$PY")
has() { "$PY" -c "import $1" > /dev/null 2>&1; }

# ---- builds in the background (own sessions, so a limit ends ninja and nvcc too)
background() {  # background NAME LIMIT CMD...: start now, `finish NAME` collects it
  local name=$1 limit=$2; shift 2
  say "$name: started in the background (limit ${limit} s)"
  eval "T0_$name=$(date +%s)"
  setsid timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
  eval "PID_$name=$!"
}
finish() {
  local name=$1 pid t0; eval "pid=\$PID_$name; t0=\$T0_$name"
  wait "$pid"; local rc=$? note=""
  (( rc == 124 || rc == 137 )) && note="stopped at its limit (gsplat's JIT build of ~24 CUDA files; GSPLAT_BUILD_S)"
  record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note"
  say "$name: exit $rc after ${SECS[$name]} s ${note:+($note) }(log: $LOGS/$name.log)"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    /'
  return $rc
}
if has gsplat && has ninja; then
  background build_gsplat "$GSPLAT_BUILD_S" "$PY" -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat build failed'"
else
  skip build_gsplat "gsplat or ninja does not import"
fi
background build_qsplat_cuda 240 "$PY" -c "from qrender_ns.render import _backend; _backend.load_extension(with_cuda=True)"

# ---- (a) kernels vs the reference on the GPU, values and gradients
if has pytest; then
  step test_triton 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_rasterize_triton.py
  finish build_qsplat_cuda
  step test_cuda 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_rasterize_cuda.py tests/test_gradchecks.py
else
  skip test_triton "pytest does not import"; finish build_qsplat_cuda; skip test_cuda "pytest does not import"
fi

# ---- (b) ours vs gsplat at C = 512
GSPLAT_OK=0
if [[ -n "${PID_build_gsplat:-}" ]] && finish build_gsplat; then GSPLAT_OK=1; fi
BENCH_ARGS=(--num-gaussians 1e5 1e6 --channels 512 --quantiles 8 10 --out "$OUT/bench_gpu.json")
[[ $GSPLAT_OK -eq 1 ]] || BENCH_ARGS+=(--no-gsplat)
[[ ${RC[build_qsplat_cuda]:-1} -eq 0 ]] || BENCH_ARGS+=(--backends triton)
step bench 200 "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}"

# ---- (c) the model on CUDA: train, load the checkpoint (ns-eval), query
if [[ $GSPLAT_OK -eq 1 ]] && has nerfstudio && has tyro; then
  SCENE=$OUT/scene
  step make_scene 60 "$BIN/qsplat" make-scene --out "$SCENE" --layout scannet --seed 2 --num-images 16 --overwrite &&
  step extract_features 60 "$BIN/qsplat" extract-features --data "$SCENE" --teacher synthetic &&
  step ns_train 180 "$BIN/ns-train" q-splat --data "$SCENE" --vis tensorboard --max-num-iterations 200 \
    --pipeline.model.feature-warmup-steps 50 --output-dir "$OUT/outputs" --timestamp gpu_check --steps-per-save 200 &&
  step ns_eval 90 "$BIN/ns-eval" --load-config "$OUT/outputs/scene/q-splat/gpu_check/config.yml" \
    --output-path "$OUT/ns_eval.json" &&
  step query 60 "$BIN/qsplat" query --load-config "$OUT/outputs/scene/q-splat/gpu_check/config.yml" --text chair \
    --output "$OUT/chair.ply"
else
  WHY_NOT=()
  [[ $GSPLAT_OK -eq 1 ]] || WHY_NOT+=("gsplat's CUDA ops did not build")
  has nerfstudio || WHY_NOT+=("nerfstudio does not import")
  has tyro || WHY_NOT+=("tyro does not import")
  skip ns_train "$(IFS=';'; echo "${WHY_NOT[*]}")"
fi

say "done in $(elapsed) s; summary: $OUT/gpu_check.json"
FAILED=0
for k in "${ORDER[@]}"; do [[ "${RC[$k]}" == null || "${RC[$k]}" -eq 0 ]] || FAILED=1; done
exit $FAILED
