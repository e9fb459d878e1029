import os
import sys
from pathlib import Path

# Offline by construction: a missing weight must fail at once, not after hub retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ns-train q-splat subprocesses would otherwise restart themselves once to set it (qrender_ns/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when it is first
# imported, and nerfstudio imports it: set here, before any test module imports anything, or a module that
# imports nerfstudio at the top (collected first) leaves the kernels compiled for a GPU that is not there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
