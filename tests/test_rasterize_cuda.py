"""CUDA kernel: compiles wherever nvcc exists; on a GPU it must equal the reference and CPU."""


import pytest
import torch

from qrender_ns.render import _backend, rasterize_query_scores, rasterize_to_pixels
from gradchecks import gradcheck
from scenes import make_scene


@pytest.mark.skipif(_backend.cuda_home() is None,
                    reason="nvcc / CUDA toolkit not found")
def test_cuda_sources_compile_and_link():
    """Builds the CUDA extension (sm per $TORCH_CUDA_ARCH_LIST, default 9.0); no GPU needed."""
    import os

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    module = _backend.load_extension(with_cuda=True)
    for name in ("forward", "backward", "pixels_forward", "pixels_backward", "query"):
        assert hasattr(module, f"rasterize_{name}_cuda"), name
    assert module.MAX_QUANTILES == 128


def _to_cuda(scene):
    for name in ("means2d", "conics", "opacities", "features", "isect_offsets", "flatten_ids"):
        setattr(scene, name, getattr(scene, name).cuda())
    return scene


@pytest.mark.gpu
@pytest.mark.parametrize("num_quantiles", [None, 1, 2, 8, 32])
@pytest.mark.parametrize("channels", [1, 3, 64, 512])
def test_cuda_matches_reference_and_cpu(num_quantiles, channels):
    scene = make_scene(num_cams=3, num_gs=80, width=37, height=29, channels=channels, seed=channels)
    bg = torch.rand(3, channels)
    cpu = rasterize_to_pixels(*scene.args(), backgrounds=bg, num_quantiles=num_quantiles, backend="cpu")
    gpu_scene = _to_cuda(scene)
    ref = rasterize_to_pixels(*gpu_scene.args(), backgrounds=bg.cuda(), num_quantiles=num_quantiles, backend="torch")
    gpu = rasterize_to_pixels(*gpu_scene.args(), backgrounds=bg.cuda(), num_quantiles=num_quantiles, backend="cuda")
    for got, want in ((gpu, ref), (gpu, cpu)):
        torch.testing.assert_close(got[0].cpu(), want[0].cpu(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=2e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("num_quantiles", [None, 1, 8, 32])
def test_cuda_gradients_match_reference(num_quantiles):
    scene = _to_cuda(make_scene(num_cams=2, num_gs=50, width=21, height=18, channels=64, tile_size=8, seed=9))
    bg = torch.rand(2, 64, device="cuda")
    grads = {}
    gen = torch.Generator().manual_seed(1)
    weights = None
    for backend in ("cuda", "torch"):
        leaves = [t.clone().requires_grad_() for t in
                  (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]
        feats, alphas = rasterize_to_pixels(leaves[0], leaves[1], leaves[2], leaves[3], scene.width,
                                            scene.height, scene.tile_size, scene.isect_offsets,
                                            scene.flatten_ids, backgrounds=leaves[4],
                                            num_quantiles=num_quantiles, backend=backend)
        if weights is None:
            weights = (torch.randn(feats.shape, generator=gen).cuda(), torch.randn(alphas.shape, generator=gen).cuda())
        grads[backend] = torch.autograd.grad((feats * weights[0]).sum() + (alphas * weights[1]).sum(), leaves)
    for g_cuda, g_ref in zip(grads["cuda"], grads["torch"]):
        scale = g_ref.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g_cuda / scale, g_ref / scale, atol=5e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("num_quantiles", [None, 3])
def test_cuda_gradcheck_float64(num_quantiles):
    scene = _to_cuda(make_scene(num_cams=2, num_gs=12, width=9, height=7, tile_size=4, channels=2,
                                seed=3, dtype=torch.float64))
    leaves = [t.clone().requires_grad_() for t in (scene.means2d, scene.conics, scene.features, scene.opacities)]

    def render(means2d, conics, features, opacities):
        return rasterize_to_pixels(means2d, conics, features, opacities, scene.width, scene.height,
                                   scene.tile_size, scene.isect_offsets, scene.flatten_ids,
                                   num_quantiles=num_quantiles, backend="cuda")

    assert gradcheck(render, tuple(leaves), eps=1e-6, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_cuda_sampled_pixels_and_query_scores_match_cpu(num_quantiles):
    scene = make_scene(num_cams=2, num_gs=60, width=37, height=29, channels=64, seed=4)
    bg = torch.rand(2, 64)
    pid = torch.randint(0, 2 * 37 * 29, (300,), generator=torch.Generator().manual_seed(0))
    queries = torch.randn(5, 64)
    leaves_cpu = [t.clone().requires_grad_() for t in (scene.means2d, scene.conics, scene.features, scene.opacities)]
    cpu = rasterize_to_pixels(*leaves_cpu[:3], leaves_cpu[3], scene.width, scene.height, scene.tile_size,
                              scene.isect_offsets, scene.flatten_ids, backgrounds=bg, num_quantiles=num_quantiles,
                              backend="cpu", pixel_ids=pid)
    cpu_scores = rasterize_query_scores(*scene.args(), queries, backgrounds=bg, num_quantiles=num_quantiles,
                                        backend="cpu")
    gpu_scene = _to_cuda(scene)
    leaves_gpu = [t.detach().cuda().requires_grad_() for t in leaves_cpu]
    gpu = rasterize_to_pixels(*leaves_gpu[:3], leaves_gpu[3], scene.width, scene.height, scene.tile_size,
                              gpu_scene.isect_offsets, gpu_scene.flatten_ids, backgrounds=bg.cuda(),
                              num_quantiles=num_quantiles, backend="cuda", pixel_ids=pid.cuda())
    gpu_scores = rasterize_query_scores(*gpu_scene.args(), queries.cuda(), backgrounds=bg.cuda(),
                                        num_quantiles=num_quantiles, backend="cuda")
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gpu_scores[0].cpu(), cpu_scores[0], atol=1e-5, rtol=0)
    weights = torch.randn(cpu[0].shape, generator=torch.Generator().manual_seed(1))
    for got, want in zip(torch.autograd.grad((gpu[0] * weights.cuda()).sum(), leaves_gpu),
                         torch.autograd.grad((cpu[0] * weights).sum(), leaves_cpu)):
        scale = want.abs().max().clamp(min=1.0)
        torch.testing.assert_close(got.cpu() / scale, want / scale, atol=5e-5, rtol=1e-4)
