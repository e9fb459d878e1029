"""Compiled CPU kernel == pure-torch reference, values and gradients, dense and quantile."""

import pytest
import torch

from qrender_ns.render import rasterize_to_pixels
from scenes import make_scene

MODES = [None, 1, 2, 8, 32]


def _render_both(scene, features, num_quantiles, backgrounds=None, opacities=None):
    out = {}
    for backend in ("cpu", "torch"):
        args = list(scene.args(features))
        if opacities is not None:
            args[3] = opacities
        out[backend] = rasterize_to_pixels(*args, backgrounds=backgrounds,
                                           num_quantiles=num_quantiles, backend=backend)
    return out["cpu"], out["torch"]


@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("channels", [1, 3, 20, 64, 100, 512])  # 20, 100: rows that end in a partial chunk
def test_forward_matches_reference(num_quantiles, channels):
    # 37x29 is not a multiple of the 16-pixel tile; 3 cameras.
    scene = make_scene(num_cams=3, num_gs=80, width=37, height=29, channels=channels, seed=channels)
    bg = torch.rand(3, channels)
    (f_cpu, a_cpu), (f_ref, a_ref) = _render_both(scene, scene.features, num_quantiles, bg)
    assert f_cpu.shape == (3, 29, 37, channels) and a_cpu.shape == (3, 29, 37, 1)
    torch.testing.assert_close(f_cpu, f_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a_cpu, a_ref, atol=2e-6, rtol=1e-6)
    assert (a_cpu > 0).float().mean() > 0.5  # the scene really covers the image


@pytest.mark.parametrize("num_quantiles", [None, 8])
@pytest.mark.parametrize("channels", [20, 100, 512])
def test_float64_forward_matches_reference_to_rounding(num_quantiles, channels):
    """Double rows run through the same register blend (chunks of 32 doubles, then the tail)."""
    scene = make_scene(num_cams=2, num_gs=60, width=23, height=19, channels=channels, seed=3 + channels)
    args = [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in scene.args(scene.features)]
    bg = torch.rand(2, channels, dtype=torch.float64)
    outs = [rasterize_to_pixels(*args, backgrounds=bg, num_quantiles=num_quantiles, backend=b) for b in ("cpu", "torch")]
    assert outs[0][0].dtype == torch.float64
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("channels", [1, 3, 64, 512])
def test_gradients_match_reference(num_quantiles, channels):
    scene = make_scene(num_cams=2, num_gs=50, width=21, height=18, channels=channels,
                       tile_size=8, seed=7 + channels)
    bg = torch.rand(2, channels)
    grads = {}
    weights = None
    for backend in ("cpu", "torch"):
        leaves = [t.clone().requires_grad_() for t in
                  (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]
        feats, alphas = rasterize_to_pixels(
            leaves[0], leaves[1], leaves[2], leaves[3], scene.width, scene.height,
            scene.tile_size, scene.isect_offsets, scene.flatten_ids, backgrounds=leaves[4],
            num_quantiles=num_quantiles, backend=backend)
        if weights is None:
            gen = torch.Generator().manual_seed(1)
            weights = (torch.randn(feats.shape, generator=gen), torch.randn(alphas.shape, generator=gen))
        loss = (feats * weights[0]).sum() + (alphas * weights[1]).sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
    for name, g_cpu, g_ref in zip(("means2d", "conics", "features", "opacities", "backgrounds"),
                                  grads["cpu"], grads["torch"]):
        scale = g_ref.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g_cpu / scale, g_ref / scale, atol=5e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_quantiles", MODES)
def test_gradcheck_float64(num_quantiles):
    scene = make_scene(num_cams=2, num_gs=12, width=9, height=7, tile_size=4, channels=2,
                       seed=3, dtype=torch.float64)
    bg = torch.rand(2, 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in
              (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]

    def render(means2d, conics, features, opacities, backgrounds):
        return rasterize_to_pixels(means2d, conics, features, opacities, scene.width,
                                   scene.height, scene.tile_size, scene.isect_offsets,
                                   scene.flatten_ids, backgrounds=backgrounds,
                                   num_quantiles=num_quantiles, backend="cpu")

    assert torch.autograd.gradcheck(render, tuple(leaves), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_per_camera_features_and_shared_opacities(num_quantiles):
    """features [V,N,C] and opacities [N] are accepted and agree with the reference."""
    scene = make_scene(num_cams=2, num_gs=40, channels=5, seed=11)
    feats = torch.randn(2, 40, 5)
    opac = scene.opacities[0].clone()
    (f_cpu, a_cpu), (f_ref, a_ref) = _render_both(scene, feats, num_quantiles, opacities=opac)
    torch.testing.assert_close(f_cpu, f_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a_cpu, a_ref, atol=2e-6, rtol=1e-6)


def test_absgrad_accumulates_abs_mean_gradient():
    scene = make_scene(num_cams=1, num_gs=30, channels=3, seed=5)
    means2d = scene.means2d.clone().requires_grad_()
    feats, _ = rasterize_to_pixels(means2d, scene.conics, scene.features, scene.opacities,
                                   scene.width, scene.height, scene.tile_size,
                                   scene.isect_offsets, scene.flatten_ids, absgrad=True,
                                   backend="cpu")
    feats.sum().backward()
    assert means2d.absgrad.shape == means2d.shape
    assert bool((means2d.absgrad >= means2d.grad.abs() - 1e-6).all())
    assert float(means2d.absgrad.sum()) > 0
