#!/usr/bin/env bash
# Create or refresh the q-splat virtualenv at $QSPLAT_VENV (default ~/.cache/qsplat/venv).
# Dependencies are (re)installed only when the pinned requirements changed (a hash stamp);
# the package itself is re-linked every time (cheap), so clones at other paths work too.
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

want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
have=$(cat "$VENV/.qsplat-deps" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "[setup] installing pinned dependencies into $VENV (first run: a few minutes)"
  "${PIP[@]}" install -q --upgrade pip setuptools wheel
  # torch first, from the pins, so nothing below resolves a second torch.
  "${PIP[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
  "${PIP[@]}" install -q -e ".[test]"
  echo "$want" > "$VENV/.qsplat-deps"
else
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
fi
echo "[setup] venv ready: $VENV"
