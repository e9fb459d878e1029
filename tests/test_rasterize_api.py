"""High-level API (projection + binning), tile binning vs gsplat's oracle, input validation."""

import math

import pytest
import torch

from qrender_ns.render import rasterize_features, rasterize_to_pixels
from qrender_ns.render.binning import isect_offset_encode, isect_tiles
from scenes import make_scene


def _random_gaussians(n, channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=gen) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 2.0])
    quats = torch.randn(n, 4, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.08 + 0.02
    opac = torch.rand(n, generator=gen) * 0.9 + 0.05
    feats = torch.randn(n, channels, generator=gen)
    return means, quats, scales, opac, feats


def _cameras(num_cams, width, height):
    viewmats = torch.eye(4)[None].repeat(num_cams, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(-0.2, 0.2, num_cams)  # small sideways shifts
    f = 0.8 * width
    Ks = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])[None].repeat(num_cams, 1, 1)
    return viewmats, Ks


def test_binning_matches_gsplat_torch_oracle():
    from gsplat.cuda._torch_impl import _isect_offset_encode, _isect_tiles

    scene = make_scene(num_cams=2, num_gs=25, width=40, height=30, tile_size=8, seed=4)
    tw, th = math.ceil(40 / 8), math.ceil(30 / 8)
    _, isect_ids, ref_ids = _isect_tiles(scene.means2d, scene.radii, scene.depths, 8, tw, th)
    ref_offsets = _isect_offset_encode(isect_ids, 2, tw, th)
    keys, ids = isect_tiles(scene.means2d, scene.radii, scene.depths, 8, tw, th)
    assert torch.equal(ids.long(), ref_ids.long())
    assert torch.equal(isect_offset_encode(keys, 2, tw, th), ref_offsets)


@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_rasterize_features_cpu_matches_torch(num_quantiles):
    means, quats, scales, opac, feats = _random_gaussians(300, 32)
    viewmats, Ks = _cameras(2, 50, 38)
    leaves = {}
    outputs = {}
    for backend in ("cpu", "torch"):
        leaves[backend] = [t.clone().requires_grad_() for t in (means, scales, opac, feats)]
        m, s, o, f = leaves[backend]
        out, alpha, meta = rasterize_features(m, quats, s, o, f, viewmats, Ks, 50, 38,
                                              num_quantiles=num_quantiles, backend=backend)
        assert meta["backend"] == backend
        (out.square().sum() + alpha.sum()).backward()
        outputs[backend] = (out, alpha)
    torch.testing.assert_close(outputs["cpu"][0], outputs["torch"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs["cpu"][1], outputs["torch"][1], atol=1e-5, rtol=1e-5)
    assert float(outputs["cpu"][1].mean()) > 0.3
    for a, b in zip(leaves["cpu"], leaves["torch"]):
        scale = b.grad.abs().max().clamp(min=1.0)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, atol=1e-4, rtol=1e-3)


def test_rasterize_features_auto_backend_and_meta():
    means, quats, scales, opac, feats = _random_gaussians(50, 3)
    viewmats, Ks = _cameras(1, 33, 20)
    out, alpha, meta = rasterize_features(means, quats, scales, opac, feats, viewmats, Ks, 33, 20)
    assert meta["backend"] == "cpu"
    assert out.shape == (1, 20, 33, 3) and alpha.shape == (1, 20, 33, 1)
    assert meta["means2d"].shape == (1, 50, 2) and meta["radii"].shape == (1, 50)


def test_culled_rows_left_unwritten_by_the_projection_are_not_scanned(monkeypatch):
    """gsplat's CUDA projection leaves culled Gaussians' rows of means2d/conics unwritten (torch::empty); the
    stand-in projection fills them with NaN. Only the rows the tiles list may be read or checked."""
    from gsplat_standins import nan_fill_culled

    from qrender_ns.render import projection as module  # project_and_bin looks project_gaussians up there

    means, quats, scales, opac, feats = _random_gaussians(60, 8)
    means[:10, 2] = -1.0  # behind the camera: culled
    viewmats, Ks = _cameras(1, 40, 30)
    expected, expected_alpha, _ = rasterize_features(means, quats, scales, opac, feats, viewmats, Ks, 40, 30,
                                                     num_quantiles=4)

    def projection_leaving_culled_rows_unwritten(*args, **kwargs):
        radii, means2d, depths, conics, _ = module.project_gaussians_torch(*args, **kwargs)
        return (radii, *nan_fill_culled(radii, means2d, depths, conics))

    monkeypatch.setattr(module, "project_gaussians", projection_leaving_culled_rows_unwritten)
    out, alpha, meta = rasterize_features(means, quats, scales, opac, feats, viewmats, Ks, 40, 30, num_quantiles=4)
    assert torch.isnan(meta["means2d"][0, :10]).all() and (meta["radii"][0, :10] == 0).all()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(alpha, expected_alpha)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def scene():
    return make_scene(num_cams=1, num_gs=10, channels=3, seed=0)


@pytest.mark.parametrize("k", [0, -1, 129, 2.5, True])
def test_bad_num_quantiles_rejected(scene, k):
    with pytest.raises(ValueError, match="num_quantiles"):
        rasterize_to_pixels(*scene.args(), num_quantiles=k)


@pytest.mark.parametrize("field", ["means2d", "conics", "features", "opacities"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_rejected(scene, field, bad):
    args = list(scene.args())
    index = {"means2d": 0, "conics": 1, "features": 2, "opacities": 3}[field]
    args[index] = args[index].clone()
    args[index].view(-1)[0] = bad
    with pytest.raises(ValueError, match=f"`{field}` contains NaN or Inf"):
        rasterize_to_pixels(*args)


def test_wrong_shapes_rejected(scene):
    args = list(scene.args())
    bad_conics = list(args)
    bad_conics[1] = args[1][..., :2]
    with pytest.raises(ValueError, match="`conics` must have shape"):
        rasterize_to_pixels(*bad_conics)
    bad_features = list(args)
    bad_features[2] = args[2][:-1]
    with pytest.raises(ValueError, match="`features` must have shape"):
        rasterize_to_pixels(*bad_features)
    bad_offsets = list(args)
    bad_offsets[7] = args[7][:, :1]
    with pytest.raises(ValueError, match="`isect_offsets` must have shape"):
        rasterize_to_pixels(*bad_offsets)
    with pytest.raises(ValueError, match="`backgrounds` must have shape"):
        rasterize_to_pixels(*args, backgrounds=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="`image_width`"):
        rasterize_to_pixels(args[0], args[1], args[2], args[3], 0, *args[5:])
    bad_ids = list(args)
    bad_ids[8] = args[8].clone()
    bad_ids[8][0] = 10_000
    with pytest.raises(ValueError, match="`flatten_ids`"):
        rasterize_to_pixels(*bad_ids)
    with pytest.raises(ValueError, match="backend"):
        rasterize_to_pixels(*args, backend="metal")
    bad_offsets = list(args)
    bad_offsets[7] = args[7].clone()
    bad_offsets[7].view(-1)[-1] = args[8].numel() + 5  # would read past flatten_ids in C++
    with pytest.raises(ValueError, match="`isect_offsets` must be non-decreasing"):
        rasterize_to_pixels(*bad_offsets)
    float_ids = list(args)
    float_ids[8] = args[8].float()
    with pytest.raises(ValueError, match="`flatten_ids` must be an integer tensor"):
        rasterize_to_pixels(*float_ids)


def test_high_level_validation():
    means, quats, scales, opac, feats = _random_gaussians(5, 3)
    viewmats, Ks = _cameras(1, 10, 10)
    with pytest.raises(ValueError, match="`opacities` must lie in"):
        rasterize_features(means, quats, scales, opac * 3, feats, viewmats, Ks, 10, 10)
    with pytest.raises(ValueError, match="`scales`"):
        rasterize_features(means, quats, -scales, opac, feats, viewmats, Ks, 10, 10)
    with pytest.raises(ValueError, match="`Ks` must have shape"):
        rasterize_features(means, quats, scales, opac, feats, viewmats, Ks[:, :2], 10, 10)
    with pytest.raises(ValueError, match="`quats`"):
        rasterize_features(means, quats[:3], scales, opac, feats, viewmats, Ks, 10, 10)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        rasterize_features(means, quats, scales, opac, feats, viewmats, Ks, 10, 10, backend="cuda")


def test_projection_matches_gsplat_and_culls_the_camera_plane_without_nans():
    """Our CPU projection equals gsplat's torch projection for ordinary Gaussians; a Gaussian exactly on the
    camera plane (depth 0.0), one behind the camera and one past the far plane get radius 0 and finite
    means2d / conics, and gradients through a render stay finite (gsplat's version divides by the depth:
    inf means2d, NaN conics, NaN gradients — which made CPU training fail ~1 run in 4)."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    from qrender_ns.render.projection import _quat_scale_to_covar, project_gaussians

    torch.manual_seed(0)
    n = 200
    means = torch.randn(n, 3) * 0.6 + torch.tensor([0.0, 0.0, 3.0])
    means[0] = torch.tensor([0.3, -0.2, 0.0])  # on the camera plane: depth exactly 0
    means[1] = torch.tensor([0.1, 0.1, -1.0])  # behind
    means[2] = torch.tensor([0.0, 0.0, 1e4])  # past far
    quats, scales = torch.randn(n, 4), torch.rand(n, 3) * 0.1 + 0.01
    viewmats, Ks = torch.eye(4)[None], torch.tensor([[[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]]])
    radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmats, Ks, 64, 48, far_plane=100.0)
    assert depths[0, 0] == 0.0 and radii[0, :3].tolist() == [0, 0, 0]
    assert torch.isfinite(means2d).all() and torch.isfinite(conics).all()
    ref = _fully_fused_projection(means, _quat_scale_to_covar(quats, scales), viewmats, Ks, 64, 48, far_plane=100.0)
    assert not torch.isfinite(ref[1][0, 0]).all()  # gsplat's own torch version: inf at depth 0
    assert torch.equal(radii[0, 3:], ref[0][0, 3:].int())
    for ours, theirs in ((means2d, ref[1]), (depths, ref[2]), (conics, ref[3])):
        torch.testing.assert_close(ours[0, 3:], theirs[0, 3:])

    means.requires_grad_(True)
    opacities, colors = torch.full((n,), 0.8), torch.rand(n, 3)
    rgb, _, _ = rasterize_features(means, quats, scales, opacities, colors, viewmats, Ks, 64, 48, far_plane=100.0)
    rgb.sum().backward()
    assert torch.isfinite(means.grad).all() and means.grad[0].abs().sum() == 0


def test_viewmat_from_c2w_matches_splatfacto():
    from nerfstudio.models.splatfacto import get_viewmat

    from qrender_ns.render.projection import viewmat_from_c2w

    q = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(5, 3, 3)
    c2w = torch.cat([R, torch.randn(5, 3, 1)], dim=-1)
    expected = get_viewmat(c2w)
    assert torch.allclose(viewmat_from_c2w(c2w), expected, atol=1e-6)
    assert torch.allclose(viewmat_from_c2w(c2w)[:, :3, :3] @ viewmat_from_c2w(c2w)[:, :3, :3].transpose(1, 2),
                          torch.eye(3).expand(5, 3, 3), atol=1e-5)
