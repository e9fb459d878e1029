# q-splat: the two commands of the quick start, plus helpers.
QSPLAT_VENV ?= $(HOME)/.cache/qsplat/venv
export QSPLAT_VENV
PY := $(QSPLAT_VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv ext test test-all test-compat lock demo real-demo bench minkowski clean

venv:
	@bash scripts/setup_venv.sh

ext: venv
	@$(PY) -m qrender_ns.cli build-ext

# Exit code 5 ("no tests collected") is a failure like any other non-zero code.
test: ext
	$(PY) -m pytest -q --durations=15 -m "not slow" tests

test-all: ext minkowski
	$(PY) -m pytest -q tests

# q-splat installed (pip install .) into a nerfstudio environment at the oldest supported versions (Python 3.10,
# torch 2.1.2, numpy < 2, nerfstudio 1.1.5: requirements/compat-oldest.txt), not ours; a subset of the suite there.
test-compat:
	@bash scripts/test_compat.sh

# Rewrite requirements/lock.txt (our venv's exact versions) from the venv as it is now.
lock: venv
	@{ sed -n '1,3p' requirements/lock.txt; $(PY) -m pip freeze --exclude-editable | grep -v " @ "; } > requirements/lock.txt.tmp
	@mv requirements/lock.txt.tmp requirements/lock.txt

demo: ext
	$(PY) -m qrender_ns.cli demo-render --out demo_out/render
	$(PY) -m qrender_ns.cli demo --out demo_out

# A folder of real photos -> ns-process-data (COLMAP) -> ns-train q-splat -> ns-eval -> query (~10-15 min, CPU).
real-demo: ext
	@bash scripts/real_demo.sh

bench: ext
	$(PY) benchmarks/bench_rasterize.py

# Optional: the paper's sparse-conv library for GS-Net (a patched source build, ~6-26 min; docs/gsnet.md).
minkowski: venv
	@bash scripts/build_minkowski.sh

clean:
	rm -rf demo_out .pytest_cache
