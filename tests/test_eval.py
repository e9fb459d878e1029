"""Evaluation protocols: ScanNet 3D (eval-scannet), LeRF-OVS 2D (eval-lerf-ovs), report; unit tests of the
label transfer, the metrics and LangSplat's mask post-processing on hand-made inputs."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from qrender_ns.eval.lerf_ovs import (MIN_SELECTED_TO_RENDER, EvalLerfOvs, LabelError, accuracy_at, knn_outlier_keep,
                                      localize, majority_smooth, mask_iou, opengaussian_render_filter, polygon_mask,
                                      prediction_mask, read_frame_labels, read_jpg_masks, read_label_dir,
                                      run_eval_lerf_ovs, silhouette_iou)
from qrender_ns.eval.report import QUOTED, make_report
from qrender_ns.eval.scannet3d import (SUBSET_IDS, EvalScannet, load_labels, low_opacity_mask, remap,
                                       run_eval_scannet, segmentation_metrics, selection_metrics, selection_report,
                                       subset_classes, transfer_labels)
from selection_by_hand import wins_by_hand

# 128x96 and 240 steps (~1.5 min on 2 cores): at 64x48 LangSplat's post-processing of the small objects caps
# the LeRF-OVS mIoU at ~0.7 (measured; 0.83 here).
STEPS = 240


# ------------------------------------------------------------------------------ unit tests (no model)
def test_class_subsets_are_opengaussians():
    ids19, names19 = subset_classes("19")
    assert len(ids19) == 19 and 39 not in ids19 and names19[:3] == ["wall", "floor", "cabinet"]
    assert "showercurtain" in names19  # OpenGaussian queries NYU40's spelling
    assert len(SUBSET_IDS["15"]) == 15 and set(SUBSET_IDS["15"]) < set(ids19)
    assert SUBSET_IDS["10"] == (1, 2, 4, 5, 6, 7, 8, 9, 10, 33)
    np.testing.assert_array_equal(remap(np.array([0, 1, 39, 33, 5, 99]), SUBSET_IDS["10"]), [0, 1, 0, 10, 4, 0])


def test_knn_label_transfer_majority_and_thresholds():
    points = np.array([[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0],  # class 1 cluster
                       [1, 0, 0], [1.01, 0, 0], [1.02, 0, 0],  # class 2 cluster
                       [2, 0, 0], [2.01, 0, 0], [2.02, 0, 0]], dtype=float)  # unlabelled (0)
    labels = np.array([1, 1, 2, 2, 2, 2, 0, 0, 1])
    gaussians = np.array([[0.005, 0, 0],  # votes 1,1,2 -> 1
                          [1.01, 0.02, 0],  # 2
                          [2.01, 0, 0],  # majority 0 -> not evaluated
                          [5.0, 0, 0],  # nothing within 0.1 -> 0
                          [0.5, 0, 0]])  # nearest 0.48 away -> 0
    out = transfer_labels(gaussians, points, labels, k=3, max_distance=0.1)
    np.testing.assert_array_equal(out.labels, [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(out.has_neighbour, [True, True, True, False, False])
    # only neighbours within the threshold vote: at 0.015 from the first point, 1 and 1 win; at k=1 nearest wins
    out = transfer_labels(np.array([[0.021, 0, 0]]), points, labels, k=3, max_distance=0.0105)
    assert out.labels[0] == 2  # only the point at 0.02 (label 2) is within 0.0105
    out = transfer_labels(np.array([[0.0, 0, 0]]), points, labels, k=2, max_distance=1.0)
    assert out.labels[0] == 1
    # tie (1 vs 2 with k=2): the nearer neighbour's label wins
    out = transfer_labels(np.array([[0.016, 0, 0]]), points[1:3], labels[1:3], k=2, max_distance=1.0)
    assert out.labels[0] == 2
    # a tie with k=4 (2 votes each): the label of the nearest neighbour, not the smaller class id
    tie_points = np.array([[0.01, 0, 0], [0.02, 0, 0], [0.03, 0, 0], [0.04, 0, 0]])
    out = transfer_labels(np.zeros((1, 3)), tie_points, np.array([2, 1, 1, 2]), k=4, max_distance=1.0)
    assert out.labels[0] == 2
    out = transfer_labels(np.zeros((1, 3)), tie_points, np.array([1, 2, 2, 1]), k=4, max_distance=1.0)
    assert out.labels[0] == 1
    # Mahalanobis: a flat Gaussian (std 1 cm along x) reaches the point 0.01 away in x, not one 0.01 away in y
    rot, std = np.eye(3)[None], np.array([[0.01, 0.001, 0.001]])
    out = transfer_labels(np.array([[0.0, 0, 0]]), np.array([[0.01, 0, 0], [0, 0.009, 0]]), np.array([1, 2]),
                          k=2, max_distance=1.5, distance="mahalanobis", rotations=rot, stds=std)
    assert out.labels[0] == 1


def test_opacity_cut_is_float32_as_opengaussian():
    import torch

    # splatfacto's initial opacity: torch.logit(0.1) in float32; OpenGaussian: sigmoid(opacity) < 0.1 in float32
    initial = torch.logit(torch.full((3,), 0.1))
    assert float(torch.sigmoid(initial.double())[0]) < 0.1  # in float64 these would be dropped ...
    np.testing.assert_array_equal(low_opacity_mask(initial, 0.1), [False, False, False])  # ... float32 keeps them
    logits = torch.tensor([-3.0, -2.1, 0.0])
    np.testing.assert_array_equal(low_opacity_mask(logits, 0.1), [True, False, False])
    np.testing.assert_array_equal(low_opacity_mask(logits.double(), 0.1), [True, False, False])


def _opengaussian_evaluate(pairs):
    """OpenGaussian scripts/compute_lerf_iou.py evalute(), verbatim semantics: pairs of (gt, pred or None for
    a missing prediction file) -> (mean IoU, Acc@0.25, Acc@0.5)."""
    def calculate_iou(mask1, mask2):
        intersection = np.logical_and(mask1, mask2).sum()
        union = np.logical_or(mask1, mask2).sum()
        if union == 0:
            return 0
        return intersection / union

    ious = []
    for gt, pred in pairs:
        if pred is None:
            ious.append(0.0)
            continue
        ious.append(calculate_iou(gt, pred))
    total_count = len(ious)
    return np.mean(ious), (np.array(ious) > 0.25).sum() / total_count, (np.array(ious) > 0.5).sum() / total_count


def test_opengaussian_3d_metrics_match_their_script():
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(12):
        gt = rng.random((20, 30)) > 0.6
        pred = None if i == 3 else (gt if i == 5 else rng.random((20, 30)) > 0.5 + 0.04 * i)
        pairs.append((gt, pred))
    pairs.append((np.zeros((20, 30), bool), np.zeros((20, 30), bool)))  # empty union: 0, not NaN
    ours = [silhouette_iou(np.zeros_like(gt) if pred is None else pred, gt) for gt, pred in pairs]
    miou, acc25, acc05 = _opengaussian_evaluate(pairs)
    assert np.mean(ours) == pytest.approx(miou)
    assert accuracy_at(ours, 0.25) == pytest.approx(acc25) and accuracy_at(ours, 0.5) == pytest.approx(acc05)
    assert accuracy_at([0.25, 0.2500001], 0.25) == 0.5  # strictly above


def test_label_dir_reads_frame_json_only(tmp_path):
    label = {"info": {"name": "frame_00001.jpg", "width": 8, "height": 6},
             "objects": [{"category": "cup", "segmentation": [[1, 1], [5, 1], [5, 4]], "bbox": [1, 1, 5, 4]}]}
    (tmp_path / "frame_00001.json").write_text(json.dumps(label))
    (tmp_path / "meta.json").write_text(json.dumps({"not": "a label"}))  # LangSplat ignores it: so do we
    assert [f.image_name for f in read_label_dir(tmp_path)] == ["frame_00001.jpg"]
    (tmp_path / "frame_00001.json").unlink()
    with pytest.raises(LabelError, match="no frame_\\*.json label files .*--label-glob"):
        read_label_dir(tmp_path)


def test_zero_features_predict_no_class():
    """A Gaussian no training pixel reached has a zero feature: it predicts nothing (0, a miss), not class 1."""
    import torch

    from qrender_ns.eval.scannet3d import predict_classes

    text = torch.eye(3, 4)
    features = torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0], [2.0, 0.1, 0, 0], [0, 0, 0, 1e-30]])
    assert predict_classes(features, text).tolist() == [3, 0, 1, 1]


def test_segmentation_metrics_by_hand():
    gt = np.array([1, 1, 1, 2, 2, 0, 0, 3])
    pred = np.array([1, 1, 2, 2, 1, 3, 3, 3])
    m = segmentation_metrics(gt, pred, num_classes=4)
    # class 1: inter 2, |gt| 3, |pred among evaluated| 3 -> IoU 2/4, acc 2/3; class 2: inter 1, union 2+2-1
    # class 3: inter 1, gt 1, pred 1 (gt-0 items are not evaluated) -> IoU 1, acc 1; class 4 absent
    assert m["iou"][:3] == pytest.approx([0.5, 1 / 3, 1.0])
    assert m["acc"][:3] == pytest.approx([2 / 3, 0.5, 1.0])
    assert m["present"] == [1, 2, 3] and np.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert m["macc"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["overall_acc"] == pytest.approx(4 / 6) and m["num_evaluated"] == 6
    with pytest.raises(ValueError, match="differ"):
        segmentation_metrics(gt, pred[:3], 4)


def _langsplat_smooth(mask):  # LangSplat eval/utils.py `smooth`, verbatim semantics (the oracle)
    h, w = mask.shape[:2]
    out = mask.copy()
    for i in range(h):
        for j in range(w):
            square = mask[max(0, i - 3): min(i + 4, h - 1), max(0, j - 3): min(j + 4, w - 1)]
            out[i, j] = np.argmax(np.bincount(square.reshape(-1)))
    return out


def test_langsplat_postprocessing():
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 31)) > 0.55).astype(np.uint8)
    mask[5:15, 8:20] = 1
    np.testing.assert_array_equal(majority_smooth(mask, 3), _langsplat_smooth(mask))
    # a bright square: thresholding after the [-1, 1] rescale keeps the square, IoU with it is high
    rel = np.full((40, 50), 0.3, np.float32)
    rel[10:25, 20:35] = 0.9
    pred, _ = prediction_mask(rel, kernel=3, threshold=0.4, radius=3)
    gt = np.zeros_like(pred)
    gt[10:25, 20:35] = 1
    assert mask_iou(pred, gt) > 0.8
    hit, coords = localize(rel, np.array([[20, 10, 34, 24]]), kernel=3)
    assert hit and (20 <= coords[0][0] <= 34)
    assert not localize(rel, np.array([[0, 0, 5, 5]]), kernel=3)[0]


def test_label_files_clip_skip_and_fail(tmp_path):
    label = {"info": {"name": "frame_00001.jpg", "width": 20, "height": 10}, "objects": [
        {"category": "mug", "segmentation": [[-5, -5], [5, -5], [5, 5], [-5, 5]], "bbox": [0, 0, 5, 5]},  # clipped
        {"category": "mug", "segmentation": [[15, 2], [18, 2], [18, 6]], "bbox": [15, 2, 18, 6]},  # 2nd instance
        {"category": "ghost", "segmentation": [[30, 30], [40, 30], [40, 40]], "bbox": [30, 30, 40, 40]},  # outside
        {"category": "bad", "segmentation": [[1, 1], [2, 2]]},  # < 3 vertices
    ]}
    path = tmp_path / "frame_00001.json"
    path.write_text(json.dumps(label))
    frame = read_frame_labels(path)
    assert list(frame.queries) == ["mug"]
    assert frame.queries["mug"].mask.sum() == 36 + polygon_mask(10, 20, [[15, 2], [18, 2], [18, 6]])[0].sum()
    assert frame.queries["mug"].bboxes.shape == (2, 4)
    assert frame.counts == dict(objects=4, polygons_clipped=2, empty_masks=1, invalid_polygons=1, bboxes_from_mask=0)
    path.write_text("{not json")
    with pytest.raises(LabelError, match="not a LeRF-OVS label file"):
        read_frame_labels(path)


def _opengaussian_knn_keep(points):
    """OpenGaussian's post_process (gaussian_renderer/__init__.py @ b70dcc6), transcribed: pytorch3d's knn_points
    of the set against itself (squared distances, the point itself first), K = int(sqrt(n)); keep mean < mean + std
    with torch's (unbiased) std over all n*K distances."""
    import torch

    pts = torch.as_tensor(points, dtype=torch.float64)
    k = int(len(pts) ** 0.5)
    squared = torch.cdist(pts, pts) ** 2
    dists = squared.sort(dim=1).values[:, :k]
    return (dists.mean(dim=-1) < dists.mean() + dists.std()).numpy()


def test_knn_outlier_filter_is_opengaussians():
    rng = np.random.default_rng(1)
    cluster = rng.normal(0.0, 0.05, size=(150, 3))
    strays = np.array([[1.0, 0, 0], [0, 1.5, 0], [0, 0, -2.0]])  # floor / wall Gaussians far from the object
    points = np.concatenate([cluster, strays])
    keep = knn_outlier_keep(points)
    np.testing.assert_array_equal(keep, _opengaussian_knn_keep(points))
    assert not keep[-3:].any() and keep[:150].mean() > 0.8
    # the rule is on squared distances (what knn_points returns): on plain distances this set keeps its stray
    line = np.concatenate([np.arange(9)[:, None] * [0.1, 0, 0], [[0.95, 0, 0]]])
    np.testing.assert_array_equal(knn_outlier_keep(line), [True] * 9 + [False])
    np.testing.assert_array_equal(knn_outlier_keep(line), _opengaussian_knn_keep(line))
    # and torch's std is the unbiased one: with a population std this set would drop its first point
    near = np.concatenate([np.arange(9)[:, None] * [0.1, 0, 0], [[0.872, 0, 0]]])
    assert knn_outlier_keep(near)[0]
    np.testing.assert_array_equal(knn_outlier_keep(near), _opengaussian_knn_keep(near))


def test_render_filter_rules():
    n = 300
    rng = np.random.default_rng(2)
    means = rng.normal(0.0, 0.05, size=(n, 3))
    selected = np.zeros(n, bool)
    selected[:150] = True
    visible = np.ones(n, bool)
    visible[140:150] = False  # not projected into this view (OpenGaussian's viewed_pts)
    scales = np.full(n, 0.01)
    scales[:20] = 0.1  # "any scale >= 0.1" is dropped: 0.1 itself too
    out = opengaussian_render_filter(selected, visible, scales, means, max_scale=0.1)
    assert (out.visible_selected, out.after_scale) == (140, 120) and out.rendered
    assert not out.keep[:20].any() and not out.keep[140:].any() and out.after_knn == int(out.keep.sum()) <= 120
    # fewer than 100 after the scale filter: nothing is rendered
    scales[:41] = 0.5
    out = opengaussian_render_filter(selected, visible, scales, means, max_scale=0.1)
    assert out.after_scale == MIN_SELECTED_TO_RENDER - 1 and not out.rendered and not out.keep.any()
    # a larger scale limit lets them through again
    assert opengaussian_render_filter(selected, visible, scales, means, max_scale=1.0).rendered


def test_jpg_masks_read_above_10(tmp_path):
    import cv2

    grey = np.zeros((32, 48), np.uint8)
    grey[0:16, 0:16] = 200  # the object
    grey[16:32, 16:32] = 8  # JPEG-level noise: not the object (> 10 only)
    grey[0:16, 32:48] = 11
    cv2.imwrite(str(tmp_path / "red cup.jpg"), grey)
    cv2.imwrite(str(tmp_path / "ignored.png"), grey)
    queries = read_jpg_masks(tmp_path)
    assert list(queries) == ["red cup"]
    expected = np.zeros_like(grey)
    expected[0:16, 0:16] = expected[0:16, 32:48] = 1
    np.testing.assert_array_equal(queries["red cup"].mask, expected)


def test_selection_metrics_by_hand():
    gt = np.array([0, 1, 1, 1, 2, 2, 2, 2, 0])  # 0: not evaluated (no GT class), never counted
    selected = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1], bool)
    m = selection_metrics(gt, selected, 1)
    assert (m["true_positives"], m["selected"], m["gt"]) == (2, 3, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(2 / 4)
    none = selection_metrics(gt, np.zeros(9, bool), 2)
    assert np.isnan(none["precision"]) and none["recall"] == 0.0 and none["iou"] == 0.0
    scores = {"chair": np.array([0.9, 0.8, 0.95, 0.6, 0.75, 0.1, 0.1, 0.1, 0.99]),
              "table": np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.5, 0.5, 0.1])}
    rule = {"chair": np.array([0, 1, 1, 1, 0, 0, 0, 0, 1], bool), "table": np.array([0, 0, 0, 0, 1, 1, 1, 0, 0], bool)}
    report = selection_report(gt, rule, "wins", "wins", None, scores, (0.55, 0.7, 0.9))
    assert report["per_class"]["chair"]["precision"] == 1.0 and report["per_class"]["table"]["recall"] == 0.75
    assert report["recall"] == pytest.approx(0.875) and report["threshold"] is None and report["mode"] == "wins"
    at055 = report["sweep"][0]  # the old rule beside it
    assert at055["per_class"]["chair"]["precision"] == pytest.approx(3 / 4)  # picks 1, 1, 1 and a table Gaussian
    assert at055["per_class"]["chair"]["recall"] == 1.0 and at055["per_class"]["table"]["recall"] == 0.5
    assert at055["recall"] == pytest.approx(0.75) and at055["precision"] == pytest.approx((0.75 + 1.0) / 2)
    at09 = report["sweep"][2]
    assert at09["threshold"] == 0.9 and at09["per_class"]["chair"]["recall"] == pytest.approx(1 / 3)
    assert at09["per_class"]["table"]["selected"] == 0 and at055["per_class"]["table"]["selected"] == 2
    assert at09["classes_selecting_nothing"] == ["table"] and report["classes_selecting_nothing"] == []


# ------------------------------------------------------------------------------ trained model
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_method import make_config, train

    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher

    start = time.perf_counter()
    root = tmp_path_factory.mktemp("eval_scene") / "room"
    generate_scene(root, layout="nerfstudio", seed=2, num_images=12, width=128, height=96, num_eval=2)
    SyntheticTeacher(root).run(progress=False)
    config = make_config(root, tmp_path_factory.mktemp("eval_runs"), steps=STEPS)
    trainer, _ = train(config, STEPS)
    pipeline = trainer.pipeline
    pipeline.eval()
    seconds = time.perf_counter() - start
    print(f"\n[test_eval] fixture: scene + teacher + {STEPS} steps in {seconds:.1f} s")
    yield dict(root=root, pipeline=pipeline, config_path=config.get_base_dir() / "config.yml", seconds=seconds)
    pipeline.train()


def test_eval_scannet_scene_classes(run, tmp_path):
    # the CLI path: eval_setup loads the checkpoint from config.yml
    cfg = EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path)
    result = run_eval_scannet(cfg)
    sup = result["supervised_diagnostic"]
    print(f"\n[test_eval] eval-scannet scene classes: mIoU {result['miou']:.3f} mAcc {result['macc']:.3f} "
          f"overall {result['overall_acc']:.3f} counts {result['counts']} timing {result['timing']}\n"
          f"[test_eval] supervised Gaussians (diagnostic): {sup}")
    # All 11 generated classes, every Gaussian with opacity >= 0.1 (~0.7 here): the ceiling, which the
    # cameras barely see (IoU < 0.1), and the thin lamp (~0.5) pull it down; no ScanNet subset has either
    # (the paper's 19/15/10-class protocol is checked >= 0.8 in the next test). Over the Gaussians the
    # feature loss reached, the exact teacher gives > 0.8.
    assert sup["miou"] >= 0.8, sup
    assert result["miou"] >= 0.55, result["per_class"]
    assert sup["evaluated_never_rendered"] > 0
    assert result["num_present_classes"] >= 5 and result["counts"]["evaluated"] > 0
    assert result["timing"]["feature_ms_dense"] > 0 and result["timing"]["feature_ms_quantile"] > 0
    saved = json.loads((tmp_path / "scannet3d_scene.json").read_text())
    assert saved["miou"] == pytest.approx(result["miou"])
    assert "| q-splat (ours) |" in (tmp_path / "scannet3d_scene.md").read_text()


def test_eval_scannet_subset_skips_absent_classes(run, tmp_path):
    cfg = EvalScannet(load_config=run["config_path"], classes="19", output=tmp_path, timing=False)
    result = run_eval_scannet(cfg, pipeline=run["pipeline"])
    scene_classes = {"wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "bookshelf"}
    assert set(result["class_names"]) - scene_classes <= set(result["skipped_classes"])
    assert {"door", "window", "toilet"} <= set(result["skipped_classes"])
    assert result["num_present_classes"] + result["num_skipped_classes"] == 19
    assert result["num_present_classes"] >= 3 and np.isfinite(result["miou"])
    # the paper's protocol (OpenGaussian's 19 classes, argmax over all 19 prompts) on the generated scene
    print(f"\n[test_eval] eval-scannet 19 classes: mIoU {result['miou']:.3f} mAcc {result['macc']:.3f} "
          f"per class {({k: v['iou'] for k, v in result['per_class'].items() if v['present']})}")
    assert result["miou"] >= 0.8 and result["macc"] >= 0.8, result["per_class"]
    ten = run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="10", output=tmp_path, timing=False,
                                       supervision_diagnostic=False), pipeline=run["pipeline"])
    print(f"[test_eval] eval-scannet 10 classes: mIoU {ten['miou']:.3f} mAcc {ten['macc']:.3f}")
    assert ten["miou"] >= 0.8 and ten["num_present_classes"] >= 3, ten["per_class"]
    # the template must stay the bare name for the exact-string synthetic text encoder
    with pytest.raises(ValueError, match="bare class name"):
        run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path,
                                     prompt_template="a photo of a {}"), pipeline=run["pipeline"])
    with pytest.raises(ValueError, match="choose --classes 19, 15 or 10"):
        load_labels(run["root"] / "gt" / "points.ply", "scene", run["root"], label_space="nyu40")


def test_scannet_metrics_of_features_equal_eval_scannet(run, tmp_path):
    """The in-memory version (GS-Net benchmark) gives eval-scannet's numbers on the same Gaussians and features."""
    from qrender_ns.eval import dataparser_frame, to_world
    from qrender_ns.eval.scannet3d import scannet_metrics_of_features

    model = run["pipeline"].model
    expected = run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="19", output=tmp_path, timing=False,
                                            supervision_diagnostic=False), pipeline=run["pipeline"])
    transform, scale = dataparser_frame(run["pipeline"])
    got = scannet_metrics_of_features(run["root"], to_world(model.means.detach().numpy(), transform, scale),
                                      model.opacities.detach().sigmoid(), model.gaussian_features.detach(),
                                      model.text_encoder, classes="19")
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert got["macc"] == pytest.approx(expected["macc"], abs=1e-9)
    assert got["evaluated"] == expected["counts"]["evaluated"]


def test_eval_lerf_ovs(run, tmp_path):
    cfg = EvalLerfOvs(load_config=run["config_path"], output=tmp_path, smooth_kernel=3)
    result = run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])
    print(f"\n[test_eval] eval-lerf-ovs: mIoU {result['miou']:.3f} loc. acc {result['localization_accuracy']:.3f} "
          f"queries {result['num_queries']} per category {result['per_category']}")
    assert result["num_queries"] >= 3 and result["counts"]["frames_evaluated"] == 2
    assert all(0 <= r["iou"] <= 1 for r in result["per_query"])
    assert result["miou"] >= 0.8 and result["localization_accuracy"] >= 0.8, result["per_category"]
    assert result["pngs"] == result["num_queries"] and all(Path(r["png"]).is_file() for r in result["per_query"])
    assert (tmp_path / "lerf_ovs_2d.json").is_file() and "localization" in (tmp_path / "lerf_ovs_2d.md").read_text()


def test_eval_lerf_ovs_opengaussian_3d(run, tmp_path):
    cfg = EvalLerfOvs(load_config=run["config_path"], output=tmp_path, protocol="opengaussian-3d")
    result = run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])
    print(f"\n[test_eval] eval-lerf-ovs opengaussian-3d: mIoU {result['miou']:.3f} mAcc(Acc@0.25) "
          f"{result['macc']:.3f} Acc@0.5 {result['acc_05']:.3f} queries {result['num_queries']} "
          f"per category {result['per_category']}")
    assert result["protocol"] == "lerf_ovs_3d" and result["counts"]["frames_evaluated"] == 2
    assert result["params"]["selection"] == "wins" and "wins" in (tmp_path / "lerf_ovs_3d.md").read_text()
    model = run["pipeline"].model
    for r in result["per_query"]:  # the protocol selects by qsplat query's rule (no opacity cut: OpenGaussian's)
        assert r["selected_gaussians"] == int(_wins_by_hand(model, r["category"]).sum()), r["category"]
    assert result["num_queries"] >= 3 and all(r["selected_gaussians"] > 0 for r in result["per_query"])
    assert result["macc"] == pytest.approx(np.mean([r["iou"] > 0.25 for r in result["per_query"]]))
    # measured 0.45 / 0.667 on this scene with OpenGaussian's render filters (0.43-0.44 without): lower than the
    # 2D protocol's ~0.85 because the relevancy cut also selects wall / floor Gaussians (3D precision of the
    # objects' selections 0.2-0.9: test_eval_scannet_selection_3d) and parts hidden in this view
    assert result["miou"] >= 0.25 and result["macc"] >= 0.5, result["per_category"]
    assert (tmp_path / "lerf_ovs_3d.json").is_file() and "Acc@0.25" in (tmp_path / "lerf_ovs_3d.md").read_text()
    assert all(Path(r["png"]).is_file() for r in result["per_query"])
    # a query selecting nothing has IoU 0 (OpenGaussian: a missing prediction counts 0)
    none = run_eval_lerf_ovs(EvalLerfOvs(load_config=run["config_path"], output=tmp_path / "none", save_png=False,
                                         protocol="opengaussian-3d", selection="absolute", select_threshold=1.0),
                             pipeline=run["pipeline"])
    assert none["miou"] == 0.0 and none["macc"] == 0.0 and none["params"]["selection"] == "absolute"


def test_opengaussian_3d_filters_jpg_masks_unknown(run, tmp_path):
    """The protocol as OpenGaussian runs it: render filters per view (and off for diagnosis), per-category .jpg
    masks when the label folder has <gt>/<frame>/, a category without a prediction counted IoU 0."""
    import cv2

    base = dict(load_config=run["config_path"], protocol="opengaussian-3d", save_png=False)
    start = time.perf_counter()
    on = run_eval_lerf_ovs(EvalLerfOvs(output=tmp_path / "on", **base), pipeline=run["pipeline"])
    off = run_eval_lerf_ovs(EvalLerfOvs(output=tmp_path / "off", render_filters=False, **base), pipeline=run["pipeline"])
    print(f"\n[test_eval] opengaussian-3d mIoU: filters on {on['miou']:.3f} (Acc@0.25 {on['macc']:.3f}), off "
          f"{off['miou']:.3f} ({off['macc']:.3f}); not rendered {on['counts']['queries_not_rendered']}; "
          f"per query on {[(r['category'], round(r['iou'], 3), r['selected_gaussians'], r['rendered_gaussians']) for r in on['per_query']]}"
          f"\n[test_eval] per query off {[(r['category'], round(r['iou'], 3)) for r in off['per_query']]}")
    assert on["params"]["render_filters"] and not off["params"]["render_filters"]
    assert all(r["rendered_gaussians"] == r["selected_gaussians"] for r in off["per_query"])
    for r in on["per_query"]:
        assert r["rendered_gaussians"] <= r["after_scale_filter"] <= r["visible_selected"] <= r["selected_gaussians"]
        if r["after_scale_filter"] < MIN_SELECTED_TO_RENDER:
            assert not r["rendered"] and r["iou"] == 0.0
    # the filters drop something here: the selections hold Gaussians outside the view, large ones and outliers
    assert sum(r["rendered_gaussians"] for r in on["per_query"]) < sum(r["selected_gaussians"] for r in on["per_query"])
    assert [r["category"] for r in on["per_query"]] == [r["category"] for r in off["per_query"]]

    labels, files = _labels_copy(run, tmp_path)
    frame = read_frame_labels(files[0])
    folder = labels / "gt" / Path(frame.image_name).stem
    folder.mkdir(parents=True)
    categories = list(frame.queries)
    for category, gt in frame.queries.items():
        mask = gt.mask.copy()
        if category == categories[0]:
            mask[: mask.shape[0] // 2] = 0  # the jpg holds only the lower half: proves the jpg, not the polygon, is read
        cv2.imwrite(str(folder / f"{category}.jpg"), (mask * 255).astype(np.uint8))
    cv2.imwrite(str(folder / "spaceship.jpg"), np.full(frame.queries[categories[0]].mask.shape, 255, np.uint8))
    jpg = run_eval_lerf_ovs(EvalLerfOvs(output=tmp_path / "jpg", labels=labels, **base), pipeline=run["pipeline"])
    assert jpg["counts"]["frames_jpg_masks"] == 1 and jpg["params"]["gt_masks"] == str(labels / "gt")
    rows = {r["category"]: r for r in jpg["per_query"] if r["frame"] == frame.image_name}
    assert set(rows) == set(categories) | {"spaceship"}
    first = cv2.imread(str(folder / f"{categories[0]}.jpg"), cv2.IMREAD_GRAYSCALE)
    assert rows[categories[0]]["gt_pixels"] == int((first > 10).sum()) < int(frame.queries[categories[0]].mask.sum())
    # an unknown category is a query without a prediction: IoU 0, counted in the mean
    assert rows["spaceship"]["iou"] == 0.0 and rows["spaceship"]["unknown_category"]
    assert jpg["counts"]["queries_unknown_category"] == 1
    assert jpg["miou"] == pytest.approx(np.mean([r["iou"] for r in jpg["per_query"]]))
    assert jpg["num_queries"] == on["num_queries"] + 1
    with pytest.raises(LabelError, match="--gt-masks"):
        run_eval_lerf_ovs(EvalLerfOvs(output=tmp_path / "bad", gt_masks=tmp_path / "nowhere", **base),
                          pipeline=run["pipeline"])
    with pytest.raises(ValueError, match="--filter-max-scale"):
        run_eval_lerf_ovs(EvalLerfOvs(output=tmp_path / "bad", filter_max_scale=float("nan"), **base),
                          pipeline=run["pipeline"])
    print(f"[test_eval] opengaussian-3d filters / jpg / unknown checks in {time.perf_counter() - start:.1f} s")


def test_opengaussian_3d_oracle_selection(run, tmp_path):
    """--oracle-selection (a diagnosis): each category selects the Gaussians of its ground-truth class (gt/points.ply
    transferred to the world-frame centres as eval-scannet does), the rest of the protocol unchanged; written to its
    own file and marked as the oracle; a scene without that ground truth is refused in one sentence."""
    from qrender_ns.eval import dataparser_frame, to_world
    from qrender_ns.eval.lerf_ovs import _Scene3D, main, oracle_gaussian_classes

    pipeline, model = run["pipeline"], run["pipeline"].model
    base = dict(load_config=run["config_path"], protocol="opengaussian-3d", save_png=False, output=tmp_path)
    ours = run_eval_lerf_ovs(EvalLerfOvs(**base), pipeline=pipeline)
    oracle = run_eval_lerf_ovs(EvalLerfOvs(oracle_selection=True, **base), pipeline=pipeline)
    print(f"\n[test_eval] opengaussian-3d mIoU: ours {ours['miou']:.3f}, oracle selection {oracle['miou']:.3f} "
          f"(per query {[(r['category'], round(r['iou'], 3)) for r in oracle['per_query']]})")
    points = load_labels(run["root"] / "gt" / "points.ply", "scene", run["root"], "scene")
    transform, scale = dataparser_frame(pipeline)
    gt = transfer_labels(to_world(model.means.detach().numpy(), transform, scale), points.xyz, points.labels,
                         k=5, max_distance=0.1).labels
    scene = _Scene3D(pipeline, EvalLerfOvs(oracle_selection=True, **base))
    for r in oracle["per_query"]:  # every labelled category of the tiny scene is one of its generated classes
        expected = gt == points.class_names.index(r["category"]) + 1
        np.testing.assert_array_equal(scene.selection(r["category"]), expected)
        assert r["selected_gaussians"] == int(expected.sum()) > 0, r["category"]
        if r["rendered"]:
            assert r["rendered_gaussians"] <= r["after_scale_filter"] <= r["visible_selected"] <= r["selected_gaussians"]
    # the same queries, views, filters and threshold: only the selection differs
    assert [(r["frame"], r["category"]) for r in oracle["per_query"]] == [(r["frame"], r["category"]) for r in ours["per_query"]]
    assert oracle["miou"] == pytest.approx(np.mean([r["iou"] for r in oracle["per_query"]]))
    assert oracle["oracle_selection"] and oracle["params"]["oracle_selection"] and not ours["params"]["oracle_selection"]
    assert oracle["params"]["render_filters"] and oracle["params"]["silhouette_threshold"] == ours["params"]["silhouette_threshold"]
    assert "oracle" in oracle["method"] and "diagnosis" in oracle["method"]
    # its own files: the protocol's result beside it is not overwritten
    assert json.loads((tmp_path / "lerf_ovs_3d.json").read_text())["miou"] == pytest.approx(ours["miou"])
    assert json.loads((tmp_path / "lerf_ovs_3d_oracle.json").read_text())["oracle_selection"]
    assert "ORACLE selection (a diagnosis, not a result)" in (tmp_path / "lerf_ovs_3d_oracle.md").read_text()
    report = make_report([tmp_path], tmp_path / "report.md")
    assert f"| oracle selection on q-splat (ours)'s Gaussians (diagnosis) | {oracle['scene']} |" in report
    # no ground truth: one sentence, no traceback
    with pytest.raises(LabelError, match=r"needs a generated scene's ground truth \(gt/points.ply and gt/scene.json"):
        oracle_gaussian_classes(pipeline, tmp_path / "not_generated")
    with pytest.raises(SystemExit, match="--oracle-selection is a diagnosis of --protocol opengaussian-3d"):
        main(EvalLerfOvs(load_config=run["config_path"], oracle_selection=True))


def _wins_by_hand(model, text: str) -> np.ndarray:
    return wins_by_hand(model, text)  # tests/selection_by_hand.py: kNN smoothing by supervision weight, then wins


def test_eval_scannet_selection_3d(run, tmp_path):
    """3D precision / recall of the text selections: the default rule (wins, as `qsplat query`) recomputed by hand,
    the old absolute rule's sweep beside it, and --selection absolute still available."""
    from qrender_ns.eval import dataparser_frame, to_world
    from qrender_ns.workflows.query import gaussian_relevancy

    start = time.perf_counter()
    cfg = EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path, timing=False,
                      supervision_diagnostic=False, selection_sweep=(0.55, 0.7, 0.8, 0.9, 0.99, 1.0))
    result = run_eval_scannet(cfg, pipeline=run["pipeline"])
    sel = result["selection_3d"]
    print(f"\n[test_eval] 3D selection ({sel['mode']}): precision {sel['precision']:.3f} recall "
          f"{sel['recall']:.3f} IoU {sel['iou']:.3f}; per class "
          f"{ {n: (round(v['precision'], 3), round(v['recall'], 3), v['selected'], v['gt']) for n, v in sel['per_class'].items() if v['gt']} }"
          f"\n[test_eval] old rule sweep {[(t['threshold'], round(t['precision'], 3), round(t['recall'], 3), round(t['iou'], 3), t['classes_selecting_nothing']) for t in sel['sweep']]}")
    assert sel["mode"] == "wins" and sel["threshold"] is None
    # the ground truth and the selections recomputed by hand: eval-scannet's kNN transfer, the rule in numpy
    model, pipeline = run["pipeline"].model, run["pipeline"]
    transform, scale = dataparser_frame(pipeline)
    points = load_labels(run["root"] / "gt" / "points.ply", "scene", run["root"])
    gt = transfer_labels(to_world(model.means.detach().numpy(), transform, scale), points.xyz, points.labels).labels
    gt = np.where(low_opacity_mask(model.opacities.detach(), 0.1), 0, gt)
    for c, name in enumerate(points.class_names):
        chosen = _wins_by_hand(model, name) & (gt > 0)
        got = sel["per_class"][name]
        assert (got["selected"], got["gt"]) == (int(chosen.sum()), int((gt == c + 1).sum())), name
        assert got["true_positives"] == int((chosen & (gt == c + 1)).sum())
        old = sel["sweep"][0]["per_class"][name]  # the old rule at 0.55, by qsplat query's relevancy
        assert old["selected"] == int(((gaussian_relevancy(model, name).detach().numpy() > 0.55) & (gt > 0)).sum())
    assert len(sel["present_classes"]) == result["num_present_classes"]
    # the rule is more precise than the old default at the same recall level (measured here: see the print)
    assert sel["precision"] > sel["sweep"][0]["precision"] and sel["recall"] >= 0.8
    # recall falls as the threshold rises; nothing has relevancy > 1
    recalls = [t["recall"] for t in sel["sweep"]]
    assert all(a >= b for a, b in zip(recalls, recalls[1:])) and recalls[-1] == 0.0
    text = (tmp_path / "scannet3d_scene.md").read_text()
    assert "## 3D selection by text query (wins" in text and "| threshold | mean precision |" in text
    report = make_report([tmp_path])
    assert "## 3D selection by text query" in report
    assert f"| scene | wins | {100 * sel['precision']:.2f} | {100 * sel['recall']:.2f} | {100 * sel['iou']:.2f} |" in report
    # the old rule as an explicit option: its selection is the 0.55 row of the sweep
    old = run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path / "old",
                                       timing=False, supervision_diagnostic=False, selection="absolute",
                                       selection_threshold=0.55, selection_sweep=(0.55,)), pipeline=run["pipeline"])
    assert old["selection_3d"]["mode"] == "absolute" and old["selection_3d"]["threshold"] == 0.55
    assert old["selection_3d"]["precision"] == pytest.approx(sel["sweep"][0]["precision"])
    assert "relevancy > 0.55" in make_report([tmp_path / "old"])
    with pytest.raises(ValueError, match="finite"):
        run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path / "bad",
                                     timing=False, supervision_diagnostic=False, selection="absolute",
                                     selection_threshold=float("nan")), pipeline=run["pipeline"])
    with pytest.raises(ValueError, match="one of wins, absolute"):
        run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="scene", output=tmp_path / "bad",
                                     timing=False, supervision_diagnostic=False, selection="maybe"),
                         pipeline=run["pipeline"])
    print(f"[test_eval] 3D selection checks in {time.perf_counter() - start:.1f} s")


def _labels_copy(run, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(run["root"] / "label", labels)
    return labels, sorted(labels.glob("*.json"))


def test_eval_lerf_ovs_bad_input(run, tmp_path):
    labels, files = _labels_copy(run, tmp_path)
    # 1. a label file naming an image the run does not have: a clear error, or skipped and counted
    data = json.loads(files[0].read_text())
    data["info"]["name"] = "frame_09999.png"
    (labels / "frame_09999.json").write_text(json.dumps(data))
    cfg = EvalLerfOvs(load_config=run["config_path"], labels=labels, output=tmp_path / "a", smooth_kernel=3,
                      save_png=False)
    with pytest.raises(LabelError, match="frame_09999.png' is not an image of this run"):
        run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])
    cfg.skip_unmatched = True
    result = run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])
    assert result["counts"]["frames_unmatched"] == 1 and result["counts"]["frames_evaluated"] == 2
    (labels / "frame_09999.json").unlink()

    # 2. a polygon partly outside the image (clipped, counted) and 3. an unknown category (skipped, counted)
    data = json.loads(files[0].read_text())
    width = data["info"]["width"]
    first = data["objects"][0]
    first["segmentation"] = [[x + width // 2, y] for x, y in first["segmentation"]]  # shifted past the right edge
    data["objects"].append({"category": "spaceship", "segmentation": [[1, 1], [10, 1], [10, 10]], "bbox": [1, 1, 10, 10]})
    files[0].write_text(json.dumps(data))
    cfg = EvalLerfOvs(load_config=run["config_path"], labels=labels, output=tmp_path / "b", smooth_kernel=3,
                      save_png=False)
    result = run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])
    assert result["counts"]["polygons_clipped"] >= 1
    assert result["counts"]["queries_unknown_category"] == 1
    assert result["skipped"]["unknown_categories"] == [f"{files[0].name}:spaceship"]
    assert all(r["category"] != "spaceship" for r in result["per_query"])
    cfg.unknown_categories = "error"
    with pytest.raises(LabelError, match="'spaceship' is unknown"):
        run_eval_lerf_ovs(cfg, pipeline=run["pipeline"])


def test_report_table(run, tmp_path):
    run_dir = tmp_path / "run"
    run_eval_scannet(EvalScannet(load_config=run["config_path"], classes="scene", output=run_dir / "eval"),
                     pipeline=run["pipeline"])
    run_eval_lerf_ovs(EvalLerfOvs(load_config=run["config_path"], output=run_dir / "eval", smooth_kernel=3,
                                  save_png=False), pipeline=run["pipeline"])
    three = run_eval_lerf_ovs(EvalLerfOvs(load_config=run["config_path"], output=run_dir / "eval", save_png=False,
                                          protocol="opengaussian-3d"), pipeline=run["pipeline"])
    (run_dir / "metrics.json").write_text(json.dumps({
        "experiment_name": "room", "method_name": "q-splat", "checkpoint": str(run["config_path"].parent / "x.ckpt"),
        "results": {"psnr": 20.0, "ssim": 0.8, "feature_miou": 0.9, "feature_ms_dense": 10.0,
                    "feature_ms_quantile": 5.0, "feature_speedup_quantile_vs_dense": 2.0}}))
    out = tmp_path / "report.md"
    text = make_report([run_dir], out)
    assert out.read_text() == text
    assert "| Method | Scene | #classes | mIoU | mAcc | FPS (512-D map) | Source |" in text
    assert f"| 19 | 50.75 | — | — | *{QUOTED}* |" in text
    assert "| q-splat (ours) | room | scene (11) |" in text
    assert "LeRF-OVS 2D" in text and "| 45.8 | 56.9 |" in text and "| 20.00 | 0.800 |" in text
    # each number beside the paper rows of its own protocol only: 45.8 / 56.9 only in the 3D section, with ours
    two_d = text[text.index("## LeRF-OVS 2D"):text.index("## LeRF-OVS 3D")]
    three_d = text[text.index("## LeRF-OVS 3D"):text.index("## ns-eval")]
    assert "45.8" not in two_d and QUOTED not in two_d
    assert "| 45.8 | 56.9 |" in three_d
    assert f"| q-splat (ours) | room | {100 * three['miou']:.2f} | {100 * three['macc']:.2f} |" in three_d
    with pytest.raises(FileNotFoundError):
        make_report([tmp_path / "missing"])


def test_report_gsnet_generalization_table(tmp_path):
    """`qsplat report` turns the GS-Net benchmark JSON into one table row per method and fit kind."""
    bench = {"benchmark": "gsnet_generalization", "fits": {
        "plain": {"num_val_scenes": 8, "gsnet": {"k10": {"train_scenes": 88, "steps": 900}},
                  "mean": {"backproject": {"miou": 0.9, "macc": 0.95, "seconds": 1.5},
                           "gsnet_k10": {"miou": 0.61, "macc": 0.7, "seconds": 0.2},
                           "gsnet_k10_40rooms": {"miou": 0.55, "macc": 0.6, "seconds": 0.2},
                           "gsnet_k10_16rooms": {"miou": 0.5, "macc": 0.6, "seconds": 0.2}}},
        "depth": {"num_val_scenes": 8, "mean": {"gsnet_k10": {"miou": 0.65, "macc": 0.72, "seconds": 0.2}}}}}
    (tmp_path / "gsnet.json").write_text(json.dumps(bench))
    text = make_report([tmp_path], tmp_path / "report.md")
    rows = [line for line in text.split("## GS-Net generalization")[1].splitlines() if line.startswith("| (")]
    assert len(rows) == 5, rows
    assert any("back-projection" in r and "RGB only" in r and "90.00" in r for r in rows), rows
    # data scaling rows (--train-scenes), fewest rooms first, before the full-split net (which names its count)
    assert "K = 10), 16 rooms" in rows[1] and "50.00" in rows[1] and "K = 10), 40 rooms" in rows[2], rows
    assert "K = 10), 88 rooms, 900 steps" in rows[3] and "61.00" in rows[3], rows
    assert any("GS-Net feed-forward (trained with Q-Render" in r and "RGB + depth loss" in r and "65.00" in r
               for r in rows), rows


def test_report_names_weight_average_and_test_time_rows(tmp_path):
    """--ema-decay / --tta-views rows come right after their net's row, named, with that net's rooms and steps."""
    bench = {"benchmark": "gsnet_generalization", "fits": {
        "plain": {"num_val_scenes": 8, "gsnet": {"k10": {"train_scenes": 88, "steps": 900},
                                                  "k10_ema": {"train_scenes": 88, "steps": 900}},
                  "mean": {"gsnet_k10": {"miou": 0.61, "macc": 0.7, "seconds": 0.2},
                           "gsnet_k10_tta8": {"miou": 0.63, "macc": 0.7, "seconds": 1.6},
                           "gsnet_k10_ema": {"miou": 0.64, "macc": 0.7, "seconds": 0.2},
                           "gsnet_k10_ema_tta8": {"miou": 0.66, "macc": 0.7, "seconds": 1.6},
                           "gsnet_k10_finetune": {"miou": 0.7, "macc": 0.8, "seconds": 10}}}}}
    (tmp_path / "gsnet.json").write_text(json.dumps(bench))
    text = make_report([tmp_path], tmp_path / "report.md")
    rows = [line for line in text.split("## GS-Net generalization")[1].splitlines() if line.startswith("| (")]
    assert len(rows) == 5, rows
    assert "K = 10), 88 rooms, 900 steps |" in rows[0] and "61.00" in rows[0], rows
    assert "weight average (EMA), 88 rooms, 900 steps" in rows[1] and "64.00" in rows[1], rows
    assert "weight average (EMA), test-time average of 8 views, 88 rooms" in rows[2] and "66.00" in rows[2], rows
    assert "test-time average of 8 views, 88 rooms" in rows[3] and "EMA" not in rows[3], rows
    assert "fine-tune" in rows[4], rows


def test_report_names_the_noisy_teacher_and_the_exact_reference(tmp_path):
    """A noisy-teacher run says so on every row, and its exact-teacher back-projection comes right after (b)."""
    bench = {"benchmark": "gsnet_generalization", "fits": {
        "plain": {"num_val_scenes": 8, "teacher": {"name": "synthetic", "label_noise": 0.2, "miss_rate": 0.1},
                  "mean": {"backproject": {"miou": 0.8, "macc": 0.85, "seconds": 0.6},
                           "backproject_exact": {"miou": 0.9, "macc": 0.95, "seconds": 0.6},
                           "gsnet_k10": {"miou": 0.85, "macc": 0.9, "seconds": 0.2}}},
        "depth": {"num_val_scenes": 8, "teacher": {"name": "synthetic", "noise": 0.05},
                  "mean": {"backproject": {"miou": 0.9, "macc": 0.95, "seconds": 0.6}}}}}
    (tmp_path / "gsnet.json").write_text(json.dumps(bench))
    text = make_report([tmp_path], tmp_path / "report.md")
    rows = [line for line in text.split("## GS-Net generalization")[1].splitlines() if line.startswith("| (")]
    assert len(rows) == 4, rows
    assert "(b) back-projection of the teacher masks" in rows[0] and "80.00" in rows[0], rows
    assert "exact teacher" in rows[1] and "90.00" in rows[1] and "GS-Net" in rows[2], rows
    assert all("| RGB only, teacher with label noise 0.2 / miss rate 0.1 |" in rows[i] for i in (0, 2)), rows
    assert "| RGB only |" in rows[1], rows  # the reference reads the exact teacher
    assert "| RGB + depth loss |" in rows[3], rows  # an exact teacher's rows are labelled as before
