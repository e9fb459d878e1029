#!/usr/bin/env bash
# install_gpu_wheels.sh PYTHON WHEELS_DIR VENV: a venv over PYTHON (--system-site-packages: the machine's torch
# and triton) with the wheels of WHEELS_DIR that PYTHON lacks, offline (--no-index --no-deps). Called by
# scripts/gpu_check.sh; never replaces a distribution the machine already has (torch, triton, numpy, ...).
set -euo pipefail
PY=$1 WHEELS=$2 VENV=$3
"$PY" -m venv --system-site-packages "$VENV"
mapfile -t TO_INSTALL < <("$VENV/bin/python" - "$WHEELS" <<'PYEOF'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
PYEOF
)
echo "installing ${#TO_INSTALL[@]} wheels: ${TO_INSTALL[*]##*/}"
if (( ${#TO_INSTALL[@]} )); then
  "$VENV/bin/python" -m pip install --no-index --no-deps --quiet "${TO_INSTALL[@]}"
fi
