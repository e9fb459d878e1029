#!/usr/bin/env bash
# make test-compat: q-splat in a nerfstudio environment that is not ours, at the oldest supported versions.
#   1. builds that environment as nerfstudio's install guide does (requirements/compat-oldest.txt), once;
#   2. `pip install --dry-run .` there must leave torch, torchvision and numpy alone (checked, log kept);
#   3. `pip install ".[test]"` (a real, non-editable install, as a user's), then `qsplat build-ext`;
#   4. a subset of the suite against the *installed* package: CPU kernel vs the reference (values and
#      gradients), the version checks, and the user workflow (make-scene, ns-train 30 steps, ns-eval, query).
# Settings: COMPAT_REQUIREMENTS (default requirements/compat-oldest.txt), COMPAT_PYTHON (default python3.10),
# QSPLAT_COMPAT_VENV (default ~/.cache/qsplat/venv-compat-<requirements name>), COMPAT_TESTS (test files).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
REQS=${COMPAT_REQUIREMENTS:-requirements/compat-oldest.txt}
NAME=$(basename "$REQS" .txt)
VENV=${QSPLAT_COMPAT_VENV:-$HOME/.cache/qsplat/venv-$NAME}
PY_WANTED=${COMPAT_PYTHON:-python3.10}
TESTS=${COMPAT_TESTS:-test_rasterize_cpu.py test_compat.py test_user_workflow.py}
LOGS=${COMPAT_LOGS:-$ROOT/compat_logs}
mkdir -p "$LOGS"
say() { echo "[test-compat +$(( $(date +%s) - START ))s] $*"; }

[ -f "$REQS" ] || { echo "test-compat: no requirements file $REQS (expected one of requirements/compat-*.txt)" >&2; exit 2; }

# The interpreter: on PATH, else pyenv's (this machine image has pyenv versions that are not on PATH).
find_python() {
  local want=$1 candidate
  if command -v "$want" >/dev/null && "$want" -c "pass" 2>/dev/null; then command -v "$want"; return; fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${want#python}"*/bin/"$want"; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  return 1
}
PY=$(find_python "$PY_WANTED") || {
  echo "test-compat: $PY_WANTED is not installed (needed for the oldest supported environment); install it" \
       "(e.g. pyenv install 3.10) or set COMPAT_PYTHON" >&2; exit 2; }

# 1. the user's environment, built once per requirements file (a hash stamp), one pip call per line
want=$( (cat "$REQS"; "$PY" --version) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.qsplat-compat" 2>/dev/null || true)" != "$want" ]; then
  say "building $VENV ($($PY --version), $REQS) as nerfstudio's install guide does"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel > "$LOGS/env-install.log" 2>&1
  while read -r line; do
    line=${line%%#*}; [ -n "${line// }" ] || continue
    # shellcheck disable=SC2086  # one line = the words of one pip call
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check $line > "$LOGS/env-install.log" 2>&1 ||
      { tail -20 "$LOGS/env-install.log" >&2; echo "test-compat: could not install '$line' into $VENV" >&2; exit 1; }
  done < "$REQS"
  echo "$want" > "$VENV/.qsplat-compat"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" uninstall -y -q qrender_ns >/dev/null 2>&1 || true  # a previous run's install
"${PIP[@]}" freeze > "$LOGS/freeze-before.txt"

# 2. what `pip install` would do to that environment
"${PIP[@]}" install --dry-run . 2>&1 | grep -v "^WARNING: Location" > "$LOGS/dry-run.log"
would=$(grep "^Would install" "$LOGS/dry-run.log" || true)
say "pip install --dry-run .: ${would:-nothing to install?}"
if echo "$would" | grep -q -i -E "(^| )(torch|torchvision|numpy|nvidia-[a-z0-9-]*|triton)-[0-9]"; then
  echo "test-compat: 'pip install .' would replace the environment's torch/torchvision/numpy/triton: $would" >&2
  exit 1
fi

# 3. the real install, then the same check on what it did
"${PIP[@]}" install -q ".[test]" > "$LOGS/install.log" 2>&1 || { tail -30 "$LOGS/install.log" >&2; exit 1; }
"${PIP[@]}" freeze > "$LOGS/freeze-after.txt"
for pkg in torch torchvision numpy triton; do
  before=$(grep -i "^$pkg==" "$LOGS/freeze-before.txt" || true); after=$(grep -i "^$pkg==" "$LOGS/freeze-after.txt" || true)
  [ "$before" = "$after" ] || { echo "test-compat: installing q-splat changed $pkg: '$before' -> '$after'" >&2; exit 1; }
done
say "installed: $(grep -i -E "^(torch|torchvision|numpy|triton|nerfstudio|gsplat)==" "$LOGS/freeze-after.txt" | tr '\n' ' ')"
cd "$ROOT/tests"  # not the clone's root: the tests must import the installed package, not ./qrender_ns
"$VENV/bin/python" -c "import qrender_ns, sys; sys.exit(0 if 'site-packages' in qrender_ns.__file__ else
  'test-compat: qrender_ns imports from ' + qrender_ns.__file__ + ', not from the installed package')"
"$VENV/bin/qsplat" build-ext

# 4. the subset (pytest's exit code 5, no test collected, fails like any other)
say "pytest $TESTS"
# shellcheck disable=SC2086
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider $TESTS
say "done in $(( $(date +%s) - START )) s"
