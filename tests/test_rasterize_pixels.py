"""Sampled-pixel rendering (pixel_ids) and query-space scores against the whole-image render."""

import pytest
import torch

from qrender_ns.render import rasterize_query_scores, rasterize_to_pixels
from qrender_ns.render.reference import query_scores
from scenes import make_scene

MODES = [None, 1, 4, 32]
NAMES = ("means2d", "conics", "features", "opacities", "backgrounds")


def _pixel_ids(scene, num_cams, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_cams * scene.height * scene.width, (count,), generator=gen)
    return torch.cat([ids, ids[:5]])  # repeated pixels are allowed


def _rows(image, pixel_ids):
    return image.reshape(-1, image.shape[-1])[pixel_ids]


@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("channels", [3, 64])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sampled_pixels_equal_full_render(num_quantiles, channels, backend):
    scene = make_scene(num_cams=3, num_gs=80, width=37, height=29, channels=channels, seed=channels)
    bg = torch.rand(3, channels)
    pid = _pixel_ids(scene, 3, 400)
    full_f, full_a = rasterize_to_pixels(*scene.args(), backgrounds=bg, num_quantiles=num_quantiles,
                                         backend="torch")
    f, a = rasterize_to_pixels(*scene.args(), backgrounds=bg, num_quantiles=num_quantiles, backend=backend,
                               pixel_ids=pid)
    assert f.shape == (pid.numel(), channels) and a.shape == (pid.numel(), 1)
    torch.testing.assert_close(f, _rows(full_f, pid), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a, _rows(full_a, pid), atol=2e-6, rtol=1e-6)
    assert (a > 0).float().mean() > 0.5


@pytest.mark.parametrize("num_quantiles", [None, 8])
def test_sampled_pixels_per_camera_features(num_quantiles):
    scene = make_scene(num_cams=2, num_gs=40, channels=5, seed=11)
    feats = torch.randn(2, 40, 5)
    opac = scene.opacities[0].clone()
    pid = _pixel_ids(scene, 2, 200, seed=3)
    args = (scene.means2d, scene.conics, feats, opac, scene.width, scene.height, scene.tile_size,
            scene.isect_offsets, scene.flatten_ids)
    full_f, _ = rasterize_to_pixels(*args, num_quantiles=num_quantiles, backend="cpu")
    f, _ = rasterize_to_pixels(*args, num_quantiles=num_quantiles, backend="cpu", pixel_ids=pid)
    torch.testing.assert_close(f, _rows(full_f, pid), atol=0, rtol=0)  # the same code path


@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("channels", [3, 512])
def test_sampled_gradients_equal_full_render_gradients(num_quantiles, channels):
    """d(loss at the samples): CPU sampled == torch sampled == full render with the loss at those pixels."""
    scene = make_scene(num_cams=2, num_gs=50, width=21, height=18, channels=channels, tile_size=8,
                       seed=7 + channels)
    bg = torch.rand(2, channels)
    pid = _pixel_ids(scene, 2, 120, seed=1)
    gen = torch.Generator().manual_seed(1)
    w_feat, w_alpha = torch.randn(pid.numel(), channels, generator=gen), torch.randn(pid.numel(), 1, generator=gen)
    grads = {}
    for name, backend, sampled in (("cpu", "cpu", True), ("torch", "torch", True), ("full", "cpu", False)):
        leaves = [t.clone().requires_grad_() for t in
                  (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]
        out = rasterize_to_pixels(leaves[0], leaves[1], leaves[2], leaves[3], scene.width, scene.height,
                                  scene.tile_size, scene.isect_offsets, scene.flatten_ids, backgrounds=leaves[4],
                                  num_quantiles=num_quantiles, backend=backend,
                                  pixel_ids=pid if sampled else None)
        feats, alphas = out if sampled else (_rows(out[0], pid), _rows(out[1], pid))
        loss = (feats * w_feat).sum() + (alphas * w_alpha).sum()
        grads[name] = torch.autograd.grad(loss, leaves)
    for other in ("torch", "full"):
        for name, got, want in zip(NAMES, grads["cpu"], grads[other]):
            scale = want.abs().max().clamp(min=1.0)
            torch.testing.assert_close(got / scale, want / scale, atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} vs {other}: {m}")
    assert grads["cpu"][0].abs().sum() > 0  # the geometry really gets gradients


@pytest.mark.parametrize("num_quantiles", [None, 2])
def test_sampled_gradcheck_float64(num_quantiles):
    scene = make_scene(num_cams=2, num_gs=12, width=9, height=7, tile_size=4, channels=2, seed=3,
                       dtype=torch.float64)
    bg = torch.rand(2, 2, dtype=torch.float64)
    pid = torch.tensor([0, 5, 17, 40, 40, 63, 70, 100, 125])
    leaves = [t.clone().requires_grad_() for t in
              (scene.means2d, scene.conics, scene.features, scene.opacities, bg)]

    def render(means2d, conics, features, opacities, backgrounds):
        return rasterize_to_pixels(means2d, conics, features, opacities, scene.width, scene.height,
                                   scene.tile_size, scene.isect_offsets, scene.flatten_ids,
                                   backgrounds=backgrounds, num_quantiles=num_quantiles, backend="cpu",
                                   pixel_ids=pid)

    assert torch.autograd.gradcheck(render, tuple(leaves), eps=1e-6, atol=1e-5)


def test_sampled_absgrad_matches_full_render_at_those_pixels():
    scene = make_scene(num_cams=1, num_gs=30, width=24, height=20, channels=4, tile_size=8, seed=2)
    pid = _pixel_ids(scene, 1, 60, seed=4)
    absgrads = []
    for sampled in (True, False):
        means2d = scene.means2d.clone().requires_grad_()
        out = rasterize_to_pixels(means2d, scene.conics, scene.features, scene.opacities, scene.width,
                                  scene.height, scene.tile_size, scene.isect_offsets, scene.flatten_ids,
                                  num_quantiles=4, backend="cpu", absgrad=True,
                                  pixel_ids=pid if sampled else None)
        feats = out[0] if sampled else _rows(out[0], pid)
        feats.sum().backward()
        absgrads.append(means2d.absgrad)
    torch.testing.assert_close(absgrads[0], absgrads[1], atol=1e-5, rtol=1e-4)


def test_pixel_ids_bad_input():
    scene = make_scene(num_cams=1, num_gs=10, width=8, height=8, channels=2, tile_size=4)
    for bad, match in ((torch.tensor([64]), r"\[0, V\*H\*W\)"), (torch.tensor([-1]), r"\[0, V\*H\*W\)"),
                       (torch.tensor([[0]]), "1-D integer tensor"), (torch.tensor([0.0]), "integer tensor"),
                       ([0, 1], "1-D integer tensor")):
        with pytest.raises(ValueError, match=match):
            rasterize_to_pixels(*scene.args(), backend="cpu", pixel_ids=bad)


def test_empty_pixel_ids():
    scene = make_scene(num_cams=1, num_gs=10, width=8, height=8, channels=2, tile_size=4)
    for backend in ("cpu", "torch"):
        f, a = rasterize_to_pixels(*scene.args(), num_quantiles=2, backend=backend,
                                   pixel_ids=torch.zeros(0, dtype=torch.long))
        assert f.shape == (0, 2) and a.shape == (0, 1)


# ---------------------------------------------------------------------------- query space
@pytest.mark.parametrize("num_quantiles", MODES)
@pytest.mark.parametrize("num_queries", [1, 5, 20])
@pytest.mark.parametrize("with_bg", [False, True])
def test_query_scores_equal_full_map_normalise_matmul(num_quantiles, num_queries, with_bg):
    scene = make_scene(num_cams=2, num_gs=80, width=37, height=29, channels=64, seed=num_queries)
    bg = torch.rand(2, 64) if with_bg else None
    queries = torch.randn(num_queries, 64) * 3
    for backend in ("cpu", "torch"):  # each against its own full map (float32 ties may flip a pick)
        feat, alpha = rasterize_to_pixels(*scene.args(), backgrounds=bg, num_quantiles=num_quantiles,
                                          backend=backend)
        want = query_scores(feat, queries)
        scores, q_alpha = rasterize_query_scores(*scene.args(), queries, backgrounds=bg,
                                                 num_quantiles=num_quantiles, backend=backend)
        assert scores.shape == (2, 29, 37, num_queries)
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(q_alpha, alpha, atol=1e-6, rtol=0)
    if not with_bg:
        assert bool(((alpha[..., 0] == 0) <= (scores.abs().amax(-1) == 0)).all())  # nothing rendered: 0


def test_query_scores_per_camera_features_float64():
    scene = make_scene(num_cams=2, num_gs=40, channels=16, seed=5, dtype=torch.float64)
    feats = torch.randn(2, 40, 16, dtype=torch.float64)
    queries = torch.randn(3, 16, dtype=torch.float64)
    args = (scene.means2d, scene.conics, feats, scene.opacities, scene.width, scene.height, scene.tile_size,
            scene.isect_offsets, scene.flatten_ids)
    for k in (None, 8):
        feat, _ = rasterize_to_pixels(*args, num_quantiles=k, backend="cpu")
        scores, _ = rasterize_query_scores(*args, queries, num_quantiles=k, backend="cpu")
        torch.testing.assert_close(scores, query_scores(feat, queries), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_query_projection_equals_matmul_and_norm(dtype):
    """The CPU kernel's one-pass [rows . T^T, |rows|]: Q in blocks of 4 and the 1-3 left over, odd row
    counts (rows go in pairs), C not a multiple of the vector width, per-camera [V, N, C] rows."""
    from qrender_ns.render import _backend

    ext = _backend.load_extension(with_cuda=False)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(0)
    for channels in (1, 7, 16, 37, 512):
        for num_queries in (1, 3, 4, 6, 20):
            for shape in ((1, channels), (101, channels), (2, 33, channels)):
                rows = torch.randn(*shape, generator=gen, dtype=dtype)
                units = torch.nn.functional.normalize(torch.randn(num_queries, channels, generator=gen,
                                                                  dtype=dtype), dim=-1)
                want = torch.cat([rows @ units.T, rows.norm(dim=-1, keepdim=True)], dim=-1)
                got = ext.project_rows_cpu(rows, units)
                assert got.shape == want.shape and got.dtype == dtype
                torch.testing.assert_close(got, want, atol=tol * channels ** 0.5, rtol=tol)


def test_query_scores_bad_input():
    scene = make_scene(num_cams=1, num_gs=10, width=8, height=8, channels=4, tile_size=4)
    with pytest.raises(ValueError, match=r"`queries` must have shape \[\*, 4\]"):
        rasterize_query_scores(*scene.args(), torch.randn(2, 3), backend="cpu")
    with pytest.raises(ValueError, match="at least one embedding"):
        rasterize_query_scores(*scene.args(), torch.randn(0, 4), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_quantiles", [1, 3, 8, 32])
def test_whole_image_lanes_pick_exactly_what_one_pixel_picks(dtype, num_quantiles):
    # Whole images walk 8 adjacent pixels at once (SIMD lanes over the tile cache); sampled pixels
    # walk as lanes of up to 8 samples of one tile, packing the list from the geometry as they go:
    # the same Gaussians must be picked with bit-identical weights (tiles of 16 and of 4 pixels,
    # rows that end in a partial group of lanes, many Gaussians per pixel).
    for tile_size, width in ((16, 45), (4, 23)):
        scene = make_scene(num_cams=2, num_gs=400, width=width, height=19, channels=16, tile_size=tile_size,
                           dtype=dtype, seed=num_quantiles, opacity_range=(0.02, 0.9))
        pid = torch.arange(2 * scene.height * scene.width)
        full_f, full_a = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="cpu")
        f, a = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="cpu", pixel_ids=pid)
        assert torch.equal(f, _rows(full_f, pid)) and torch.equal(a, _rows(full_a, pid))
        ref_f, _ = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="torch")
        torch.testing.assert_close(full_f, ref_f, atol=2e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_quantiles", [1, 5, 16])
def test_sampled_lanes_in_any_order_pick_what_the_whole_image_picks(dtype, num_quantiles):
    # Samples in random order, repeated, 1 to ~20 per tile (groups of 8 lanes, partial groups, lanes
    # on different rows of a tile), opacities of exactly 0 and 1 (the opacity-free early reject):
    # bit-identical to the whole-image render at those pixels, and to the reference within rounding.
    scene = make_scene(num_cams=2, num_gs=300, width=23, height=19, channels=8, tile_size=4, dtype=dtype,
                       seed=40 + num_quantiles, opacity_range=(0.0, 1.0))
    scene.opacities[:, ::7] = 0.0
    scene.opacities[:, 3::11] = 1.0
    gen = torch.Generator().manual_seed(num_quantiles)
    pid = torch.randint(0, 2 * scene.height * scene.width, (500,), generator=gen)
    pid = torch.cat([pid, pid[:40], torch.arange(0, 2 * scene.height * scene.width, 37)])
    pid = pid[torch.randperm(pid.numel(), generator=gen)]
    full_f, full_a = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="cpu")
    f, a = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="cpu", pixel_ids=pid)
    assert torch.equal(f, _rows(full_f, pid)) and torch.equal(a, _rows(full_a, pid))
    ref_f, ref_a = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="torch", pixel_ids=pid)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(f, ref_f, **tol)
    torch.testing.assert_close(a, ref_a, **tol)
    assert (a > 0).float().mean() > 0.5
