"""Triton kernels == pure-torch reference, values and gradients, dense and quantile.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`, set
here before the kernels are imported, so `make test` executes every kernel line); with a GPU
the same tests run compiled on CUDA tensors. The interpreter costs ~1 ms per op and Gaussian,
so the scenes are small (few Gaussians, few tiles); the K x C grid is the CPU kernel's.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated (first import)

import pytest  # noqa: E402

from qrender_ns.render import rasterize_features, rasterize_to_pixels  # noqa: E402
from qrender_ns.render.validate import _resolve_backend  # noqa: E402
from gradchecks import gradcheck  # noqa: E402
from scenes import make_scene  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = [None, 1, 2, 8, 32]


def _small_scene(channels, seed, dtype=torch.float32, **kw):
    args = dict(num_cams=2, num_gs=24, width=19, height=13, tile_size=8, scale_range=(1.0, 3.5))
    args.update(kw)
    scene = make_scene(channels=channels, seed=seed, dtype=dtype, **args)
    for name in ("means2d", "conics", "opacities", "features", "isect_offsets", "flatten_ids"):
        setattr(scene, name, getattr(scene, name).to(DEVICE))
    return scene


def _render(scene, leaves, num_quantiles, backend, **kw):
    means2d, conics, features, opacities, bg = leaves
    return rasterize_to_pixels(means2d, conics, features, opacities, scene.width, scene.height,
                               scene.tile_size, scene.isect_offsets, scene.flatten_ids, backgrounds=bg,
                               num_quantiles=num_quantiles, backend=backend, **kw)


def _compare_grads(got, want, names=("means2d", "conics", "features", "opacities", "backgrounds")):
    for name, g, r in zip(names, got, want):
        scale = r.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g / scale, r / scale, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("channels", [1, 3, 64, 512])
def test_values_and_gradients_match_reference(num_quantiles, channels):
    # 19x13 is not a multiple of the 8-pixel tile; 2 cameras; features shared by the cameras.
    scene = _small_scene(channels, seed=channels + (num_quantiles or 0))
    bg = torch.rand(2, channels, device=DEVICE)
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(2, scene.height, scene.width, channels, generator=gen).to(DEVICE),
               torch.randn(2, scene.height, scene.width, 1, generator=gen).to(DEVICE))
    out, grads = {}, {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in
                  (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]
        feats, alphas = _render(scene, leaves, num_quantiles, backend)
        loss = (feats * weights[0]).sum() + (alphas * weights[1]).sum()
        out[backend] = (feats.detach(), alphas.detach())
        grads[backend] = torch.autograd.grad(loss, leaves)
    (f_tri, a_tri), (f_ref, a_ref) = out["triton"], out["torch"]
    assert f_tri.shape == (2, 13, 19, channels) and a_tri.shape == (2, 13, 19, 1)
    torch.testing.assert_close(f_tri, f_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a_tri, a_ref, atol=2e-6, rtol=1e-6)
    assert (a_ref > 0).float().mean() > 0.4  # the scene really covers the image
    _compare_grads(grads["triton"], grads["torch"])


# Interpreter: fast_mode (one random direction per input: ~11 renders; full Jacobians would take
# hundreds) on one camera, and three of the five modes (~5 s each on 2 cores); compiled: all.
GRADCHECK_MODES = MODES if DEVICE.type == "cuda" else [None, 2, 8]


@pytest.mark.parametrize("num_quantiles", GRADCHECK_MODES)
def test_gradcheck_float64(num_quantiles):
    scene = _small_scene(2, seed=3, dtype=torch.float64, num_cams=1, num_gs=8, width=8, height=6, tile_size=4)
    bg = torch.rand(1, 2, dtype=torch.float64, device=DEVICE)
    leaves = tuple(t.clone().requires_grad_() for t in
                   (scene.means2d, scene.conics, scene.features, scene.opacities, bg))

    def render(*leaves):
        return _render(scene, leaves, num_quantiles, "triton")

    assert gradcheck(render, leaves, eps=1e-6, atol=1e-5, fast_mode=DEVICE.type == "cpu",
                     check_undefined_grad=False)


@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_per_camera_features_and_shared_opacities(num_quantiles):
    scene = _small_scene(5, seed=11)
    feats = torch.randn(2, scene.means2d.shape[1], 5, device=DEVICE)
    opac = scene.opacities[0].clone()
    leaves = [scene.means2d, scene.conics, feats, opac, None]
    f_tri, a_tri = _render(scene, leaves, num_quantiles, "triton")
    f_ref, a_ref = _render(scene, leaves, num_quantiles, "torch")
    torch.testing.assert_close(f_tri, f_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a_tri, a_ref, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("num_quantiles", [None, 4])
def test_absgrad_equals_cpu_kernel(num_quantiles):
    """|dL/dmeans2d| summed per pixel, as the CPU kernel (and gsplat's densification) has it."""
    scene = _small_scene(3, seed=5)
    absgrads = {}
    for backend, device in (("triton", DEVICE), ("cpu", torch.device("cpu"))):
        means2d = scene.means2d.to(device).clone().requires_grad_()
        feats, _ = rasterize_to_pixels(means2d, scene.conics.to(device), scene.features.to(device),
                                       scene.opacities.to(device), scene.width, scene.height,
                                       scene.tile_size, scene.isect_offsets.to(device),
                                       scene.flatten_ids.to(device), num_quantiles=num_quantiles,
                                       absgrad=True, backend=backend)
        feats.sum().backward()
        absgrads[backend] = means2d.absgrad.cpu()
        assert bool((means2d.absgrad >= means2d.grad.abs() - 1e-6).all())
    assert float(absgrads["cpu"].sum()) > 0
    torch.testing.assert_close(absgrads["triton"], absgrads["cpu"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_sampled_pixels_are_rows_of_the_full_render(num_quantiles):
    """pixel_ids variant (the training loss's sampled pixels): values and gradients equal the
    reference's full render gathered at those pixels, with repeats and any order."""
    from qrender_ns.render.triton.launch import rasterize_pixels_triton

    scene = _small_scene(6, seed=13, tile_size=4)  # several chunks per tile at 4x4 = 16 lanes
    total = 2 * scene.height * scene.width
    gen = torch.Generator().manual_seed(2)
    pixel_ids = torch.cat([torch.randperm(total, generator=gen)[:70], torch.tensor([0, total - 1, 5, 5])])
    pixel_ids = pixel_ids.to(DEVICE)
    weights = torch.randn(pixel_ids.numel(), 6, generator=gen).to(DEVICE)
    grads = {}
    for variant in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (scene.means2d, scene.conics, scene.features, scene.opacities)]
        if variant == "triton":
            feats, alphas = rasterize_pixels_triton(*leaves, scene.width, scene.height, scene.tile_size,
                                                    scene.isect_offsets, scene.flatten_ids, pixel_ids,
                                                    num_quantiles=num_quantiles or 0)
        else:
            full_f, full_a = _render(scene, leaves + [None], num_quantiles, "torch")
            feats, alphas = full_f.reshape(total, 6)[pixel_ids], full_a.reshape(total, 1)[pixel_ids]
        assert feats.shape == (pixel_ids.numel(), 6) and alphas.shape == (pixel_ids.numel(), 1)
        grads[variant] = torch.autograd.grad((feats * weights).sum() + alphas.sum(), leaves)
        if variant == "triton":
            tri = (feats.detach(), alphas.detach())
    torch.testing.assert_close(tri[0], feats.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tri[1], alphas.detach(), atol=2e-6, rtol=1e-6)
    _compare_grads(grads["triton"], grads["torch"])


@pytest.mark.parametrize("num_quantiles", [None, 8])
@pytest.mark.parametrize("sampled", [False, True])
def test_query_scores_equal_cosine_of_the_reference_render(num_quantiles, sampled):
    """Query space: [V,H,W,Q] (or [P,Q]) cosines against Q queries, F never written; C = 40 spans
    two 32-channel blocks on the GPU."""
    from qrender_ns.render.triton.launch import query_scores_triton

    scene = _small_scene(40, seed=17)
    bg = torch.rand(2, 40, device=DEVICE)
    queries = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    total = 2 * scene.height * scene.width
    pixel_ids = torch.tensor([3, total - 1, 77, 3, 200], device=DEVICE) if sampled else None
    scores = query_scores_triton(scene.means2d, scene.conics, scene.features, scene.opacities, scene.width,
                                 scene.height, scene.tile_size, scene.isect_offsets, scene.flatten_ids, queries,
                                 backgrounds=bg, num_quantiles=num_quantiles or 0, pixel_ids=pixel_ids)
    feats, _ = _render(scene, [scene.means2d, scene.conics, scene.features, scene.opacities, bg], num_quantiles,
                       "torch")
    want = feats @ torch.nn.functional.normalize(queries, dim=-1).T / feats.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if sampled:
        want = want.reshape(total, 5)[pixel_ids]
    assert scores.shape == want.shape
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_quantiles", [None, 2])
def test_early_exit_of_the_compiled_walk(monkeypatch, num_quantiles):
    """The interpreter skips the all-lanes-done exit of the walks (half its time); compiled runs take
    it. Forced on here, so its condition is checked on the CPU too. Opaque Gaussians: most lanes
    finish early."""
    import triton.language as tl

    from qrender_ns.render.triton import kernels as triton_kernels

    monkeypatch.setattr(triton_kernels, "EARLY_EXIT", tl.constexpr(True))
    scene = _small_scene(3, seed=23, num_gs=40, opacity_range=(0.7, 1.0), scale_range=(3.0, 6.0))
    leaves = [scene.means2d, scene.conics, scene.features, scene.opacities, None]
    for got, want in zip(_render(scene, leaves, num_quantiles, "triton"), _render(scene, leaves, num_quantiles, "torch")):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_sampled_pixels_reject_bad_ids():
    from qrender_ns.render.triton.launch import rasterize_pixels_triton

    scene = _small_scene(2, seed=1)
    for bad in (torch.tensor([2 * 13 * 19]), torch.tensor([-1]), torch.tensor([[0]])):
        with pytest.raises(ValueError, match="pixel_ids"):
            rasterize_pixels_triton(scene.means2d, scene.conics, scene.features, scene.opacities, 19, 13, 8,
                                    scene.isect_offsets, scene.flatten_ids, bad.to(DEVICE))


def test_gaussian_crossing_several_levels_is_selected_once():
    # K = 3 (boundaries 0.75, 0.5, 0.25); wide Gaussians centred on pixel (2, 2): alpha = opacity.
    # 0.6 takes T to 0.4 (crosses 0.75 and 0.5: selected once); 0.5 takes T to 0.2: stop.
    n = 3
    means2d = torch.full((1, n, 2), 2.5, dtype=torch.float64, device=DEVICE)
    conics = torch.tensor([[1e-8, 0.0, 1e-8]] * n, dtype=torch.float64, device=DEVICE)[None]
    opac = torch.tensor([[0.6, 0.5, 0.9]], dtype=torch.float64, device=DEVICE)
    feats = torch.eye(n, dtype=torch.float64, device=DEVICE)
    ids = torch.arange(n, dtype=torch.int32, device=DEVICE).repeat(4)  # every tile lists all three
    offsets = torch.arange(0, 4 * n, n, dtype=torch.int32, device=DEVICE).reshape(1, 2, 2)
    out, alpha = rasterize_to_pixels(means2d, conics, feats, opac, 6, 6, 4, offsets, ids, num_quantiles=3,
                                     backend="triton")
    expected = torch.tensor([0.6, 0.4 * 0.5, 0.0], dtype=torch.float64) / (1 - 0.4 * 0.5)
    torch.testing.assert_close(out[0, 2, 2].cpu(), expected)
    assert float(alpha[0, 2, 2, 0]) == pytest.approx(0.8)


@pytest.mark.parametrize("num_quantiles", [None, 4])
def test_nearly_transparent_and_empty_give_background(num_quantiles):
    scene = _small_scene(3, seed=2, opacity_range=(1e-4, 3e-3))
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]], device=DEVICE)
    feats, alphas = _render(scene, [scene.means2d, scene.conics, scene.features, scene.opacities, bg],
                            num_quantiles, "triton")
    torch.testing.assert_close(feats, bg[:, None, None, :].expand_as(feats))
    assert float(alphas.abs().max()) == 0.0
    # No Gaussian at all (all behind the camera): zeros, through the high-level API.
    viewmats = torch.eye(4, device=DEVICE)[None]
    Ks = torch.tensor([[20.0, 0, 12], [0, 20.0, 9], [0, 0, 1]], device=DEVICE)[None]
    means = torch.randn(6, 3, device=DEVICE) * 0.1 + torch.tensor([0, 0, -3.0], device=DEVICE)
    if DEVICE.type == "cpu":  # project on CPU, then blend with Triton
        feats, alphas, meta = rasterize_features(
            means, torch.randn(6, 4), torch.full((6, 3), 0.1), torch.full((6,), 0.9), torch.randn(6, 4),
            viewmats, Ks, 25, 17, num_quantiles=num_quantiles, backend="triton")
        assert meta["backend"] == "triton" and meta["flatten_ids"].numel() == 0
        assert feats.shape == (1, 17, 25, 4) and float(feats.abs().max()) == 0 and float(alphas.abs().max()) == 0


def test_auto_picks_triton_on_cuda_and_triton_needs_cuda_or_interpreter(monkeypatch):
    assert _resolve_backend("auto", torch.device("cuda")) == "triton"
    assert _resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert _resolve_backend("cuda", torch.device("cuda")) == "cuda"  # the hand kernel stays available
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _resolve_backend("triton", torch.device("cpu"))


def _gsplat_built() -> bool:
    """gsplat's CUDA extension is already compiled (importing it otherwise starts a long build)."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.exists(os.path.join(_get_build_directory("gsplat_cuda", False), "gsplat_cuda.so"))


@pytest.mark.gpu
@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_rasterize_features_with_gsplat_projection(num_quantiles):
    """The model's path on CUDA: gsplat's fused projection, our binning, Triton == reference."""
    if not _gsplat_built():
        pytest.skip("gsplat's CUDA extension is not built (scripts/gpu_check.sh builds it, then runs this)")
    gen = torch.Generator().manual_seed(0)
    n = 300
    means = (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([2.0, 1.5, 1.0]) + torch.tensor([0, 0, 4.0])
    args = [t.cuda() for t in (means, torch.randn(n, 4, generator=gen), 0.05 + 0.1 * torch.rand(n, 3, generator=gen),
                               0.1 + 0.8 * torch.rand(n, generator=gen), torch.randn(n, 16, generator=gen),
                               torch.eye(4)[None], torch.tensor([[[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]]]))]
    out = {}
    for backend in ("triton", "torch"):
        leaves = [a.clone().requires_grad_() if i == 4 else a for i, a in enumerate(args)]
        feats, alphas, meta = rasterize_features(*leaves, 64, 48, num_quantiles=num_quantiles, backend=backend)
        assert meta["backend"] == backend
        out[backend] = (feats, alphas, torch.autograd.grad(feats.square().sum(), leaves[4])[0])
    for got, want in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["frontend", pytest.param("full", marks=pytest.mark.slow)])
def test_kernels_compile_for_a_gpu_without_one(mode):
    """The interpreter never runs Triton's compiler: compile every kernel variant for sm_90 in a
    subprocess without TRITON_INTERPRET (frontend: Python -> Triton IR, ~0.2 s per kernel, what
    rejected the first version's globals; full: down to a cubin with Triton's own ptxas, minutes: ~8 on 2 loaded cores)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile_check.py")), mode],
                          capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 20, proc.stdout
