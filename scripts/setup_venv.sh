#!/usr/bin/env bash
# Create or refresh the q-splat virtualenv at $QSPLAT_VENV (default ~/.cache/qsplat/venv).
# Exact versions come from requirements/lock.txt (pip constraints), not from pyproject.toml, whose ranges
# are for users installing into their own nerfstudio environment. Dependencies are (re)installed only when
# the lock, pyproject.toml or this script changed (a hash stamp); the package itself is re-linked every
# time (cheap), so clones at other paths work too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# open3d (imported by nerfstudio's data parsers) needs the system libusb.
if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if command -v apt-get >/dev/null; then
    echo "[setup] installing libusb-1.0-0 (needed by open3d) with apt-get"
    $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 ||
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null; }
  else
    echo "[setup] WARNING: libusb-1.0 is missing and apt-get is not available; nerfstudio's parsers will fail to import open3d" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# pip install "$@", hiding only pip's after-the-fact notes about the timm pins (see below); fails loudly.
pip_install() {
  local log; log=$(mktemp)
  if ! "${PIP[@]}" install -q "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v -E "dependency resolver does not currently|requires timm(==|>=)" "$log" || true
  rm -f "$log"
}

# QSPLAT_TEACHERS=1 (default) also installs the real 2D teachers (open_clip, transformers, sam2: the
# `teachers` extra of pyproject.toml); QSPLAT_TEACHERS=0 gives the lean venv (synthetic teacher only).
TEACHERS="${QSPLAT_TEACHERS:-1}"
LOCK=requirements/lock.txt
want=$( (cat pyproject.toml scripts/setup_venv.sh "$LOCK"; echo "teachers=$TEACHERS") | sha256sum | cut -c1-16)
have=$(cat "$VENV/.qsplat-deps" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "[setup] installing pinned dependencies into $VENV (first run: a few minutes)"
  "${PIP[@]}" install -q --upgrade pip setuptools wheel
  mapfile -t teacher_reqs < <("$VENV/bin/python" -c 'import sys
try: import tomllib
except ImportError: from pip._vendor import tomli as tomllib  # Python 3.10
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["teachers"]))')
  # The lock less timm: nerfstudio 1.1.5 pins timm==0.6.7 (it never imports timm), the teachers need timm>=1.0.17.
  base_lock=$(mktemp); trap 'rm -f "$base_lock"' EXIT
  grep -v -i -E "^timm==" "$LOCK" > "$base_lock"
  # torch first, at the locked version, so nothing below resolves a second torch.
  "${PIP[@]}" install -q -c "$base_lock" torch torchvision
  # (With the teachers already installed this moves timm back to 0.6.7 for a moment; they re-raise it below.)
  pip_install -c "$base_lock" -e ".[test]"
  if [ "$TEACHERS" = "1" ]; then
    # The `teachers` extra cannot join the resolve above (timm, see above). So it goes on top, with every
    # package held at its locked version, timm included: a teacher that wanted to move anything else fails
    # here instead of silently changing the venv everyone tests with.
    plain=(); sdists=()
    for r in "${teacher_reqs[@]}"; do
      case "$r" in sam2*) sdists+=("$r") ;; *) plain+=("$r") ;; esac
    done
    pip_install -c "$LOCK" "${plain[@]}"
    # sam2 is an sdist: build it against the installed torch, without its optional CUDA op.
    SAM2_BUILD_CUDA=0 pip_install --no-build-isolation -c "$LOCK" "${sdists[@]}"
  else  # a lean venv: drop teachers a previous run installed (timm is nerfstudio's 0.6.7 again)
    for r in "${teacher_reqs[@]}"; do
      name=$(echo "$r" | sed -E 's/[<>=!~;[ ].*//')
      if [ "$name" != timm ] && "${PIP[@]}" show -q "$name" >/dev/null 2>&1; then "${PIP[@]}" uninstall -y -q "$name"; fi
    done
  fi
  # Only nerfstudio's unused timm pin may be unmet; anything else is a real conflict.
  problems=$("${PIP[@]}" check 2>&1 | grep -v -E "^nerfstudio [^ ]+ has requirement timm==|^No broken requirements found" || true)
  if [ -n "$problems" ]; then
    echo "[setup] ERROR: pip check found conflicting requirements:" >&2
    echo "$problems" >&2
    exit 1
  fi
  echo "$want" > "$VENV/.qsplat-deps"
else  # dependencies current: only re-link this clone (setuptools' editable-mode notes shown only on failure)
  log=$(mktemp)
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; exit 1; }
  rm -f "$log"
fi
echo "[setup] venv ready: $VENV"
