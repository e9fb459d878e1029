"""examples/ still run against the current API and still fit (a newcomer's first read must work)."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    # examples/ is not a package: load the file itself, so the test sees exactly what users run
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_features_reduces_loss(tmp_path):
    fit = _load("fit_features")
    out = tmp_path / "fit.png"
    result = fit.main(["--width", "32", "--height", "24", "--num-gaussians", "150", "--channels", "8",
                       "--num-quantiles", "4", "--steps", "60", "--log-every", "20", "--out", str(out)])
    losses = result["losses"]
    assert len(losses) == 60
    # measured 0.133 -> 0.0093 (x14) on the CPU; x5 leaves room for other seeds/backends yet fails on a broken fit
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert result["cosine"] > 0.9
    assert out.stat().st_size > 0
