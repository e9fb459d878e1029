"""GS-Net input augmentation: a rigid (or mirrored, scaled) copy of the Gaussians, orientations included."""

import pytest
import torch

from qrender_ns.gsnet.augment import GSNetAugment, augment_inputs, predict_with_tta, transform_inputs, tta_transforms
from qrender_ns.gsnet.voxelize import quat_to_rotmat


def _gaussians(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"means": torch.randn(n, 3, generator=g, dtype=torch.float64) * 2 + 5,
            "colors": torch.rand(n, 3, generator=g, dtype=torch.float64),
            "opacities": torch.rand(n, generator=g, dtype=torch.float64),
            "scales": torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.1 + 0.01,
            "quats": torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)}


def _covariances(quats, scales):
    r = quat_to_rotmat(quats)
    return r @ torch.diag_embed(scales ** 2) @ r.transpose(1, 2)


@pytest.mark.parametrize("seed", range(6))
def test_augmented_gaussians_are_one_linear_map_of_positions_and_covariances(seed):
    inputs = _gaussians()
    out = augment_inputs(inputs, GSNetAugment(color_jitter=0.0), torch.Generator().manual_seed(seed))
    # The map A with out - c' = A (in - c), recovered from the positions, must also carry every covariance.
    centre = (inputs["means"].min(0).values + inputs["means"].max(0).values) / 2
    x = inputs["means"] - centre
    y = out["means"] - centre  # rotation/mirror/scale about the same centre
    a = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(x @ a.T, y, atol=1e-9)
    s = torch.linalg.svdvals(a)
    assert torch.allclose(s, s[0].expand(3), atol=1e-9) and 0.9 - 1e-9 <= float(s[0]) <= 1.1 + 1e-9
    assert torch.allclose(a[2], torch.tensor([0, 0, s[0]], dtype=a.dtype), atol=1e-9)  # z stays up
    expected = a @ _covariances(inputs["quats"], inputs["scales"]) @ a.T
    assert torch.allclose(_covariances(out["quats"], out["scales"]), expected, atol=1e-9)
    assert torch.equal(out["opacities"], inputs["opacities"]) and torch.equal(out["colors"], inputs["colors"])


def test_mirrors_occur_and_disabled_augmentation_is_the_identity():
    inputs = _gaussians()
    dets = set()
    for seed in range(16):
        out = augment_inputs(inputs, GSNetAugment(rotate_z=False, scale=(1, 1), color_jitter=0.0),
                             torch.Generator().manual_seed(seed))
        x = inputs["means"] - inputs["means"].mean(0)
        y = out["means"] - out["means"].mean(0)
        dets.add(round(float(torch.linalg.det(torch.linalg.lstsq(x, y).solution)), 6))
    assert dets == {1.0, -1.0}
    assert augment_inputs(inputs, GSNetAugment(enabled=False), torch.Generator()) is inputs


def test_colour_jitter_stays_in_range_and_changes_colours():
    inputs = _gaussians()
    out = augment_inputs(inputs, GSNetAugment(color_jitter=0.5), torch.Generator().manual_seed(3))
    assert out["colors"].min() >= 0 and out["colors"].max() <= 1
    assert not torch.allclose(out["colors"], inputs["colors"])


def test_bad_augmentation_options_are_refused():
    with pytest.raises(ValueError, match="scale"):
        GSNetAugment(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="color_jitter"):
        GSNetAugment(color_jitter=1.5)


def test_training_renders_the_untouched_scene_while_the_net_sees_the_augmented_one():
    """scene_loss hands the augmented inputs to the net and renders with the original Gaussians."""
    from types import SimpleNamespace

    from qrender_ns.workflows import train_gsnet as train_mod

    inputs = _gaussians(8)
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, means, **kw):
            seen["means"] = means
            raise StopIteration  # stop before rendering: only the hand-over is under test

    scene = SimpleNamespace(gaussians=SimpleNamespace(gsnet_inputs=lambda: inputs), units_per_metre=1.0)
    cfg = train_mod.TrainGSNet(scenes=("x",))
    for augment, same in ((False, True), (True, False)):
        with pytest.raises(StopIteration):
            train_mod.scene_loss(Net(), scene, cfg, torch.Generator().manual_seed(0), augment=augment)
        assert torch.equal(seen["means"], inputs["means"]) == same


# ----------------------------------------------------------------------------------- test-time views
def test_mirroring_both_axes_is_the_half_turn():
    inputs = _gaussians()
    mirrored = transform_inputs(inputs, mirror=(True, True))
    turned = transform_inputs(inputs, angle=torch.pi)
    assert torch.allclose(mirrored["means"], turned["means"], atol=1e-9)
    assert torch.allclose(_covariances(mirrored["quats"], mirrored["scales"]),
                          _covariances(turned["quats"], turned["scales"]), atol=1e-9)
    turned = transform_inputs(inputs, angle=0.7)  # rigid, about the up axis
    dist = lambda x: torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # noqa: E731
    assert torch.allclose(dist(turned["means"]), dist(inputs["means"]),
                          atol=1e-9)
    assert torch.allclose(turned["means"][:, 2], inputs["means"][:, 2], atol=1e-12)


def test_tta_transforms_are_turns_times_a_mirror():
    assert tta_transforms(1) == [((False, False), 0.0)]
    views = tta_transforms(8)
    assert len(views) == 8 and len(set(views)) == 8
    assert sorted({angle for _, angle in views}) == pytest.approx([0, torch.pi / 2, torch.pi, 3 * torch.pi / 2])
    for bad in (0, 3, -2):
        with pytest.raises(ValueError, match="1 or an even number"):
            tta_transforms(bad)


def test_predict_with_tta_averages_the_views_and_one_view_is_the_net():
    calls = []

    def net(means, colors, opacities, scales=None, quats=None, units_per_metre=1.0):
        calls.append(means.clone())
        return torch.nn.functional.normalize(torch.cat([means, colors], dim=1), dim=-1)

    inputs = _gaussians(n=16)
    assert torch.equal(predict_with_tta(net, inputs, views=1), net(**inputs))
    calls.clear()
    out = predict_with_tta(net, inputs, views=4)
    assert len(calls) == 4 and not torch.allclose(calls[0], calls[2])  # each view sees turned positions
    expected = sum(net(**transform_inputs(inputs, m, a)) for m, a in tta_transforms(4))
    assert torch.allclose(out, torch.nn.functional.normalize(expected, dim=-1), atol=1e-12)
    assert torch.allclose(out.norm(dim=-1), torch.ones(16, dtype=out.dtype))
