"""The supported version range (qrender_ns/utils/compat.py): one sentence outside it, the Triton fallback."""

import subprocess
import sys

import pytest
import torch

from qrender_ns.utils import compat
from qrender_ns.render import kernels
from qrender_ns.render import validate as rz


def test_version_tuple_reads_release_local_and_dev_versions():
    assert compat.version_tuple("2.1.2+cu121") == (2, 1, 2)
    assert compat.version_tuple("2.6.0.dev20241112") == (2, 6, 0)
    assert compat.version_tuple("3.4") == (3, 4, 0)
    assert compat.version_tuple("2.10.0") > compat.version_tuple("2.9.1")


def test_too_old_torch_or_python_is_one_sentence_naming_both_versions():
    assert compat.torch_problem("2.1.2") is None and compat.torch_problem("2.15.0+cu130") is None
    problem = compat.torch_problem("2.0.1+cu118")
    assert "torch 2.0.1+cu118" in problem and compat.MIN_TORCH in problem and "\n" not in problem
    problem = compat.torch_problem("2.14.1", python=(3, 9))
    assert "Python 3.9" in problem and "3.10" in problem
    assert compat.torch_problem() is None  # this venv is inside the range


def test_newer_torch_than_tested_is_a_note_not_an_error():
    assert compat.newer_than_tested(compat.NEWEST_TESTED_TORCH) is None
    assert compat.newer_than_tested("2.15.3") is None
    assert "2.16.0" in compat.newer_than_tested("2.16.0") and compat.torch_problem("2.16.0") is None


def test_old_triton_is_named():
    assert compat.triton_problem(compat.MIN_TRITON) is None
    problem = compat.triton_problem("2.1.0")
    assert "triton 2.1.0" in problem and compat.MIN_TRITON in problem and "backend='cuda'" in problem


def test_auto_takes_the_hand_cuda_kernel_on_an_old_triton(monkeypatch):
    old_triton = lambda: "the Triton kernels need triton >= 3.4.0, ... has 2.1.0"  # noqa: E731
    monkeypatch.setattr(rz, "triton_problem", old_triton)
    monkeypatch.setattr(kernels, "triton_problem", old_triton)
    monkeypatch.setattr(kernels._backend, "cuda_home", lambda: "/usr/local/cuda")
    assert rz._resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert rz._resolve_backend("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(RuntimeError, match=r"backend='triton': the Triton kernels need triton >= 3\.4\.0"):
        rz._resolve_backend("triton", torch.device("cuda"))
    monkeypatch.setattr(kernels._backend, "cuda_home", lambda: None)
    with pytest.raises(RuntimeError, match="needs the CUDA toolkit"):
        rz._resolve_backend("auto", torch.device("cuda"))


def test_qsplat_on_a_too_old_torch_says_so_without_a_traceback(tmp_path):
    # A real process whose torch reports 2.0.1: the kernel build (first use) stops with the sentence.
    code = ("import sys, torch; torch.__version__ = '2.0.1'; sys.argv = ['qsplat', 'build-ext'];"
            "from qrender_ns.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "needs torch >= 2.1.2" in proc.stderr and "torch 2.0.1" in proc.stderr
    assert "Traceback" not in proc.stderr
