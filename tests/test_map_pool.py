"""The CPU kernel's recycled output pages (cpu/map_pool.cpp): reuse, no stale values, budget, release."""

import os
import subprocess
import sys
import textwrap

import torch

from qrender_ns.render import rasterize_to_pixels, release_cpu_maps
from qrender_ns.render import _backend
from scenes import make_scene

# 128 x 128 x 512 float32 = 32 MiB: the smallest map the pool takes
SIDE, CHANNELS = 128, 512


def _scene(seed):
    return make_scene(num_cams=1, num_gs=30, width=SIDE, height=SIDE, channels=CHANNELS, seed=seed)


def _render(scene, features, k=8, backend="cpu"):
    return rasterize_to_pixels(*scene.args(features), num_quantiles=k, backend=backend)[0]


def test_freed_map_pages_are_reused_and_fully_overwritten():
    release_cpu_maps()
    scene = _scene(0)
    first, alpha = rasterize_to_pixels(*scene.args(torch.full_like(scene.features, 7.0)), backend="cpu")
    # pixels no Gaussian reaches must come out as zeros even in recycled pages that held 7s
    assert (alpha == 0).any() and (first > 6.9).any()
    ptr = first.data_ptr()
    del first
    ext = _backend.load_extension()
    assert ext.recycled_idle_bytes() >= SIDE * SIDE * CHANNELS * 4
    for k in (8, None):
        again = _render(scene, scene.features, k)
        assert again.data_ptr() == ptr  # the same pages
        torch.testing.assert_close(again, _render(scene, scene.features, k, backend="torch"), atol=2e-5, rtol=1e-5)
        assert (again == 7.0).sum() == 0
        del again


def test_a_live_map_is_never_handed_out_again():
    scene = _scene(1)
    a = _render(scene, scene.features)
    b = _render(scene, scene.features * 2)
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(b, 2 * a, atol=1e-5, rtol=1e-5)


def test_release_returns_the_idle_maps():
    scene = _scene(2)
    _render(scene, scene.features)  # freed at once: idle
    ext = _backend.load_extension()
    assert ext.recycled_idle_bytes() > 0
    assert release_cpu_maps() >= SIDE * SIDE * CHANNELS * 4
    assert ext.recycled_idle_bytes() == 0


def test_small_maps_are_not_pooled():
    release_cpu_maps()
    scene = make_scene(num_cams=1, num_gs=30, width=64, height=64, channels=CHANNELS, seed=3)  # 8 MiB
    _render(scene, scene.features)
    assert _backend.load_extension().recycled_idle_bytes() == 0


def _child(env_value, body):
    env = {**os.environ, "QSPLAT_MAP_CACHE_MB": env_value}
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from scenes import make_scene
        from qrender_ns.render import rasterize_to_pixels, _backend
        scene = make_scene(num_cams=1, num_gs=30, width=128, height=128, channels=512, seed=0)
        def render():
            return rasterize_to_pixels(*scene.args(scene.features), num_quantiles=8, backend="cpu")[0]
    """).format(tests=os.path.dirname(__file__)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_budget_zero_turns_recycling_off():
    r = _child("0", """
        a = render(); ptr = a.data_ptr(); del a
        assert _backend.load_extension().recycled_idle_bytes() == 0
        print("budget", _backend.load_extension().recycled_budget_bytes())
    """)
    assert r.returncode == 0, r.stderr
    assert "budget 0" in r.stdout


def test_a_bad_budget_is_a_clear_error():
    r = _child("lots", "render()")
    assert r.returncode != 0
    assert "QSPLAT_MAP_CACHE_MB must be a whole number of MiB" in r.stderr
