"""Start-up: the compiled kernel is never rebuilt silently, and `qsplat --help` imports only what it uses."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qrender_ns.render import _backend


def test_an_existing_build_is_imported_without_running_ninja(monkeypatch):
    _backend.load_extension()  # built by `make ext` (or now)
    monkeypatch.setattr(_backend, "_MODULES", {})
    monkeypatch.setattr(_backend, "_build", lambda *a, **k: pytest.fail("rebuilt although the build exists"))
    monkeypatch.setenv("PATH", "/nonexistent")  # no ninja, no compiler: nothing may be needed
    module = _backend.load_extension()
    assert hasattr(module, "rasterize_forward_cpu")


def test_a_build_is_announced_and_uses_one_ninja(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("QSPLAT_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(_backend, "_MODULES", {})
    fake, seen = types.ModuleType("fake_kernel"), {}

    def fake_load(**kwargs):
        seen["path"] = os.environ["PATH"].split(os.pathsep)[0]
        Path(kwargs["build_directory"], kwargs["name"] + ".so").write_bytes(b"")
        return fake

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _backend.load_extension() is fake
    err = capsys.readouterr().err
    assert "compiling the CPU rasterizer kernel" in err and "kernel built in" in err
    assert seen["path"] == str(Path(sys.executable).parent)  # the venv's ninja first, whatever PATH says
    assert _backend._build_name(False) in str(list(tmp_path.iterdir())[0])


def test_qsplat_help_imports_no_nerfstudio_and_bad_arguments_fail():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "qrender_ns.cli", "--help"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "extract-features" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    heavy = {m for m in imported if m.split(".")[0] in ("nerfstudio", "open_clip", "transformers", "sam2", "gsplat")}
    assert not heavy, sorted(heavy)[:10]
    bad = subprocess.run([sys.executable, "-m", "qrender_ns.cli", "extract-features", "--no-such-option"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0
