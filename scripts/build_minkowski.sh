#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 (the paper's sparse-conv library) as a wheel into a local wheelhouse, so that
# `pip install --find-links "$QSPLAT_WHEELHOUSE" -e ".[minkowski]"` can install it.
#
# Why a script: the PyPI sdist does not build with `pip install` on current toolchains (its setup.py imports
# torch at metadata time, so build isolation fails, and its BLAS detection uses numpy.distutils, gone from
# numpy 2 / Python 3.12). Building it with `setup.py bdist_wheel --blas=openblas` skips numpy.distutils; the
# Python sources need `from collections import Sequence` -> `collections.abc` for Python >= 3.10.
#
# CPU build by default (6 min on 2 idle cores here, 26 min under load). QSPLAT_MINKOWSKI_CUDA=1 tries a CUDA build (untested here: the
# CUDA 12/13 toolchains need further source patches known from MinkowskiEngine's issue tracker).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${QSPLAT_VENV:-$HOME/.cache/qsplat/venv}"
WHEELHOUSE="${QSPLAT_WHEELHOUSE:-$HOME/.cache/qsplat/wheels}"
PY="$VENV/bin/python"
VERSION=0.5.4
[ -x "$PY" ] || { echo "[minkowski] no venv at $VENV: run 'make venv' first" >&2; exit 1; }
mkdir -p "$WHEELHOUSE"

# (setuptools >= 75 writes the normalised, lower-case name: minkowskiengine-0.5.4-*.whl)
wheel_glob() { ls "$1"/[Mm]inkowski[Ee]ngine-$VERSION-*.whl 2>/dev/null; }
if wheel_glob "$WHEELHOUSE" >/dev/null; then
  echo "[minkowski] wheel already built: $(wheel_glob "$WHEELHOUSE")"
else
  # The BLAS it links against (header cblas.h + libopenblas).
  if [ ! -e /usr/include/x86_64-linux-gnu/cblas.h ] && [ ! -e /usr/include/cblas.h ] &&
     [ ! -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    command -v apt-get >/dev/null ||
      { echo "[minkowski] needs OpenBLAS headers (cblas.h); install libopenblas-dev with your package manager" >&2; exit 1; }
    echo "[minkowski] installing libopenblas-dev with apt-get"
    $SUDO apt-get install -y -qq libopenblas-dev >/dev/null 2>&1 ||
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libopenblas-dev >/dev/null; }
  fi
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  echo "[minkowski] downloading the MinkowskiEngine $VERSION sdist"
  # Not `pip download`: it runs the sdist's setup.py for metadata, which is exactly what fails.
  "$PY" - "$work" "$VERSION" <<'PYEOF'
import hashlib, os, re, sys, urllib.parse, urllib.request
work, version = sys.argv[1], sys.argv[2]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page = urllib.request.urlopen(f"{index}/minkowskiengine/", timeout=60).read().decode()
hit = re.search(r'href="([^"]*MinkowskiEngine-%s\.tar\.gz)#sha256=([0-9a-f]+)"' % re.escape(version), page)
if not hit:
    sys.exit(f"[minkowski] MinkowskiEngine-{version}.tar.gz is not listed on {index}/minkowskiengine/")
url, sha = hit.groups()
url = urllib.parse.urljoin(f"{index}/minkowskiengine/", url)
data = urllib.request.urlopen(url, timeout=300).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"[minkowski] sha256 mismatch for {url}")
open(os.path.join(work, f"MinkowskiEngine-{version}.tar.gz"), "wb").write(data)
PYEOF
  sdist="$work/MinkowskiEngine-$VERSION.tar.gz"
  tar xzf "$sdist" -C "$work"
  src="$work/MinkowskiEngine-$VERSION"
  # `from collections import Sequence` was removed in Python 3.10.
  sed -i -E 's/^from collections import Sequence$/from collections.abc import Sequence/; s/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
    "$src"/MinkowskiEngine/*.py "$src"/MinkowskiEngine/utils/*.py
  flags=(--blas=openblas)
  include=$(ls -d /usr/include/x86_64-linux-gnu/openblas-pthread 2>/dev/null || true)
  [ -n "$include" ] && flags+=(--blas_include_dirs="$include")
  [ "${QSPLAT_MINKOWSKI_CUDA:-0}" = "1" ] || flags+=(--cpu_only)
  echo "[minkowski] building the wheel (${flags[*]}); this took 6 min on 2 idle cores here (26 min under load)"
  (cd "$src" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q bdist_wheel "${flags[@]}" > "$work/build.log" 2>&1) ||
    { tail -40 "$work/build.log" >&2; echo "[minkowski] build failed (log above)" >&2; exit 1; }
  wheel=$(wheel_glob "$src/dist") || { ls -l "$src/dist" >&2; echo "[minkowski] no wheel in $src/dist" >&2; exit 1; }
  cp $wheel "$WHEELHOUSE/"
  echo "[minkowski] wheel: $(wheel_glob "$WHEELHOUSE")"
fi

# --no-deps: the wheel's metadata asks only for torch and numpy, both pinned already.
"$PY" -m pip install -q --disable-pip-version-check --no-deps --find-links "$WHEELHOUSE" "MinkowskiEngine==$VERSION"
"$PY" -c "import MinkowskiEngine as ME; from qrender_ns.gsnet import get_backend; get_backend('minkowski'); print('[minkowski] MinkowskiEngine', ME.__version__, 'imports; GS-Net backend minkowski available')"
