#!/usr/bin/env bash
# fetch_gpu_wheels.sh [DIR]: download, where PyPI is reachable, the Python 3.12 wheels that scripts/gpu_check.sh
# installs offline on a bare GPU machine (Python 3.12, torch 2.11 + triton 3.6, no gsplat/pytest), into DIR
# (default gpu_wheels/, git-ignored; carried with the working tree). ~24 MB, 15.7 MB of it numpy (installed
# only where the machine has none). Nothing is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" \
  gsplat==1.4.0 jaxtyping wadler-lindig rich markdown-it-py mdurl pygments ninja tqdm \
  pytest pluggy iniconfig numpy typing_extensions
du -sh "$DIR"
