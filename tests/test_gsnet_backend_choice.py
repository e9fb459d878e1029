"""GS-Net's `auto` sparse-conv backend on CUDA takes a library only if it runs there (issue 26, defect 3):
`make minkowski` builds MinkowskiEngine --cpu_only and the `spconv` extra is the CPU wheel; both import on a
GPU machine and failed at the first CUDA convolution. No GPU here: a stand-in library that imports and runs on
the CPU only, asked for the `cuda` device (which this machine cannot run either)."""

import pytest
import torch

from qrender_ns.gsnet import backbone


class CpuOnlyBuild(backbone.TorchBackend):
    name = "spconv"

    def init(self, coords, features):
        if coords.device.type != "cpu":
            raise RuntimeError("spconv was built without CUDA")
        return super().init(coords, features)


@pytest.fixture
def cpu_only_spconv(monkeypatch):
    def not_installed():
        raise ImportError("No module named 'MinkowskiEngine'")

    monkeypatch.setattr(backbone, "_BACKENDS", {"spconv": CpuOnlyBuild()})
    monkeypatch.setattr(backbone, "_CLASSES", {**backbone._CLASSES, "minkowski": not_installed})
    monkeypatch.setattr(backbone, "_RUNS_ON", {}, raising=False)


def test_auto_skips_a_cpu_only_build_on_cuda(cpu_only_spconv, capsys):
    assert backbone.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert backbone.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert "spconv imports but cannot run on cuda" in capsys.readouterr().err


def test_auto_takes_a_library_that_runs_on_cuda(cpu_only_spconv, monkeypatch):
    monkeypatch.setattr(backbone, "_RUNS_ON", {("spconv", "cuda"): None}, raising=False)  # as the probe finds a CUDA build
    assert backbone.resolve_backend("auto", torch.device("cuda")) == "spconv"


def test_naming_a_cpu_only_build_on_cuda_is_a_clear_error(cpu_only_spconv):
    with pytest.raises(ValueError, match="sparse-conv backend 'spconv' cannot run on cuda .*CPU-only"):
        backbone.resolve_backend("spconv", torch.device("cuda"))
    assert backbone.resolve_backend("spconv", torch.device("cpu")) == "spconv"
