"""LeRF-OVS 2D open-vocabulary segmentation (LangSplat's protocol, eval/evaluate_iou_loc.py).

For every labelled frame (label JSON `info.name` = an image file name of the run), render the view,
and for every category of the frame (one query per distinct category; its GT mask is the union of the
category's polygons, its boxes all the category's boxes):
- relevancy r = LERF's relevancy against the canonical negatives (QSplatModel.relevancy_map);
- IoU: v = (mean_filter_k(r) + r) / 2 with a k x k mean filter (k = 30 in LangSplat); v is min-max
  normalised over the image, mapped to [-1, 1] and clipped to [0, 1]; the mask is that > 0.4 (i.e.
  normalised v > 0.7), then a 7 x 7 majority filter; IoU against the GT mask;
- localization: hit when a maximum of mean_filter_k(r) lies inside one of the category's boxes.
Scene mIoU = mean IoU over all (frame, query) pairs; localization accuracy = hits / queries.
Details, deviations and what is comparable with what: docs/evaluation.md.

`--protocol opengaussian-3d` runs the paper's own LeRF-OVS protocol instead (OpenGaussian's
render_lerf_by_text.py + scripts/compute_lerf_iou.py): the Gaussians are selected in 3D by the text query,
rendered alone as a silhouette (their accumulated opacity), thresholded at 0.7 and compared with the same GT
masks; mIoU and mAcc = Acc@0.25 (share of queries with IoU > 0.25; a query with no prediction, or of a category
the teacher cannot embed, has IoU 0). Before rendering, OpenGaussian's per-view filters (scale, >= 100, kNN
outliers, >= 10; opengaussian_render_filter); GT = the per-category .jpg masks (> 10) where <labels>/gt/<frame>/
has them. Numbers from the two protocols are not comparable. `--oracle-selection` (a diagnosis) replaces the text
selection by the Gaussians of the category's ground-truth class (generated scenes): the protocol's ceiling.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from qrender_ns.eval import dataparser_frame, fmt, load_pipeline, scene_root_of, to_world, write_json, write_text
from qrender_ns.eval.options import LABEL_GLOB, EvalLerfOvs, EvalScannet
from qrender_ns.eval.scannet3d import load_labels, transfer_labels
from qrender_ns.features.selection import SelectionRule, select_by_rule
from qrender_ns.render import rasterize_to_pixels

PROTOCOL = "lerf_ovs_2d"
PROTOCOL_3D = "lerf_ovs_3d"
PROTOCOLS = {"langsplat-2d": PROTOCOL, "opengaussian-3d": PROTOCOL_3D}


class LabelError(ValueError):
    """A LeRF-OVS label file that cannot be used."""


# ---------------------------------------------------------------------------------------------- labels
@dataclass
class QueryGT:
    mask: np.ndarray  # [H, W] uint8, union of the category's polygons
    bboxes: np.ndarray  # [B, 4] x1, y1, x2, y2 (inclusive pixel coordinates)


@dataclass
class FrameLabels:
    path: Path
    image_name: str
    height: int
    width: int
    queries: "OrderedDict[str, QueryGT]"
    counts: Dict[str, int] = field(default_factory=dict)


def polygon_mask(height: int, width: int, polygon) -> Tuple[np.ndarray, bool]:
    """(mask, clipped): the filled polygon (vertices truncated to int as LangSplat's polygon_to_mask);
    `clipped` says a vertex lies outside the image (cv2.fillPoly then draws only the inside part)."""
    points = np.asarray(polygon, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise LabelError(f"a polygon needs >= 3 finite [x, y] vertices, got shape {points.shape}")
    points = points.astype(np.int32)
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [points], 1)
    clipped = bool((points[:, 0] < 0).any() or (points[:, 0] > width - 1).any()
                   or (points[:, 1] < 0).any() or (points[:, 1] > height - 1).any())
    return mask, clipped


def read_frame_labels(path: Path) -> FrameLabels:
    """One LeRF-OVS label JSON ({"info": {name, width, height}, "objects": [{category, segmentation,
    bbox}]}). Objects whose polygon is malformed or covers no pixel are skipped and counted."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        info = data["info"]
        name, height, width = str(info["name"]), int(info["height"]), int(info["width"])
        objects = list(data["objects"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LabelError(f"{path}: not a LeRF-OVS label file (needs info.name/width/height and objects): {err}") from err
    if height <= 0 or width <= 0:
        raise LabelError(f"{path}: info.width/height must be positive, got {width}x{height}")
    counts = dict(objects=0, polygons_clipped=0, empty_masks=0, invalid_polygons=0, bboxes_from_mask=0)
    queries: "OrderedDict[str, QueryGT]" = OrderedDict()
    for obj in objects:
        counts["objects"] += 1
        category = str(obj.get("category", "")).strip()
        try:
            if not category:
                raise LabelError("empty category")
            mask, clipped = polygon_mask(height, width, obj.get("segmentation"))
        except LabelError:
            counts["invalid_polygons"] += 1
            continue
        counts["polygons_clipped"] += int(clipped)
        if not mask.any():
            counts["empty_masks"] += 1
            continue
        box = obj.get("bbox")
        if box is None or len(np.asarray(box).reshape(-1)) != 4:
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
            counts["bboxes_from_mask"] += 1
        box = np.asarray(box, dtype=np.float64).reshape(1, 4)
        if category in queries:
            queries[category].mask |= mask
            queries[category].bboxes = np.concatenate([queries[category].bboxes, box])
        else:
            queries[category] = QueryGT(mask, box)
    return FrameLabels(path, name, height, width, queries, counts)


def read_label_dir(label_dir: Path, pattern: str = LABEL_GLOB) -> List[FrameLabels]:
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise LabelError(f"--labels {label_dir} is not a folder of LeRF-OVS label JSONs")
    files = sorted(label_dir.glob(pattern))
    if not files:
        others = sorted(p.name for p in label_dir.glob("*.json"))[:3]
        hint = f" (it has {', '.join(others)}: pass --label-glob '*.json' to read them)" if others else ""
        raise LabelError(f"{label_dir} holds no {pattern} label files{hint}")
    return [read_frame_labels(f) for f in files]


JPG_MASK_LEVEL = 10  # OpenGaussian's compute_lerf_iou.py load_image_as_binary: pixel > 10 is the object


def jpg_mask_folder(mask_root: Optional[Path], image_name: str) -> Optional[Path]:
    """<mask_root>/<image stem>/ when it holds .jpg masks (OpenGaussian's path_gt/<frame>/), else None."""
    if mask_root is None:
        return None
    folder = Path(mask_root) / Path(image_name).stem
    return folder if folder.is_dir() and any(folder.glob("*.jpg")) else None


def read_jpg_masks(folder: Path) -> "OrderedDict[str, QueryGT]":
    """One query per <category>.jpg of `folder` (category = the file stem), mask = grey level > 10."""
    queries: "OrderedDict[str, QueryGT]" = OrderedDict()
    for path in sorted(Path(folder).glob("*.jpg")):
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise LabelError(f"{path}: not a readable .jpg mask (expected a greyscale image, object > {JPG_MASK_LEVEL})")
        mask = (grey > JPG_MASK_LEVEL).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=np.float64) if len(xs) else np.zeros((0, 4))
        queries[path.stem] = QueryGT(mask, box)
    return queries


# ---------------------------------------------------------------------------------------------- maps
def mean_filter(relevancy: np.ndarray, kernel: int) -> np.ndarray:
    """LangSplat's cv2.filter2D with a kernel x kernel box of 1/kernel^2 (default border)."""
    relevancy = np.asarray(relevancy, dtype=np.float32)
    if kernel <= 1:
        return relevancy.copy()
    return cv2.filter2D(relevancy, -1, np.ones((kernel, kernel), np.float32) / float(kernel * kernel))


def majority_smooth(mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """LangSplat's `smooth`: each pixel takes the majority value of the window rows
    [max(0, i - r), min(i + r + 1, h - 1)) x cols likewise (its upper bound h - 1 / w - 1 is kept
    as is); ties go to 0. Vectorised with an integral image."""
    mask = (np.asarray(mask) != 0).astype(np.int64)
    h, w = mask.shape
    if radius <= 0:
        return mask.astype(np.uint8)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    r0, r1 = np.maximum(0, np.arange(h) - radius), np.minimum(np.arange(h) + radius + 1, h - 1)
    c0, c1 = np.maximum(0, np.arange(w) - radius), np.minimum(np.arange(w) + radius + 1, w - 1)
    r1, c1 = np.maximum(r1, r0), np.maximum(c1, c0)
    ones = integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
    count = (r1 - r0)[:, None] * (c1 - c0)[None]
    return (2 * ones > count).astype(np.uint8)


def prediction_mask(relevancy: np.ndarray, kernel: int = 30, threshold: float = 0.4,
                    radius: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """(mask [H, W] uint8, smoothed relevancy v) as LangSplat's activate_stream."""
    valid = 0.5 * (mean_filter(relevancy, kernel) + np.asarray(relevancy, dtype=np.float32))
    out = valid - valid.min()
    out = out / (out.max() + 1e-9)
    out = np.clip(out * 2.0 - 1.0, 0.0, 1.0)
    return majority_smooth((out > threshold).astype(np.uint8), radius), valid


def localize(relevancy: np.ndarray, bboxes: np.ndarray, kernel: int = 30) -> Tuple[bool, np.ndarray]:
    """(hit, maxima [M, 2] as x, y): LangSplat's lerf_localization for one query."""
    filtered = mean_filter(relevancy, kernel)
    coords = np.argwhere(filtered == filtered.max())[:, ::-1]
    for x1, y1, x2, y2 in np.asarray(bboxes).reshape(-1, 4):
        x_min, x_max, y_min, y_max = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        inside = (coords[:, 0] >= x_min) & (coords[:, 0] <= x_max) & (coords[:, 1] >= y_min) & (coords[:, 1] <= y_max)
        if inside.any():
            return True, coords
    return False, coords


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else float("nan")


def silhouette_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """OpenGaussian's compute_lerf_iou.calculate_iou: an empty union counts 0 (not NaN)."""
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def accuracy_at(ious, threshold: float) -> float:
    """Share of queries with IoU strictly above `threshold` (OpenGaussian's Acc@0.25 / Acc@0.5)."""
    ious = np.asarray(ious, dtype=np.float64)
    return float((ious > threshold).mean()) if ious.size else float("nan")


def select_gaussians(model, text: str, rule=None, min_opacity: float = 0.0):
    """[G] bool: the 3D selection by a text query: the Gaussians `rule` (qrender_ns.features.selection.SelectionRule;
    default: "wins", the query beats the run's vocabulary and the canonical negatives) selects whose opacity
    exceeds `min_opacity`."""
    chosen = select_by_rule(model, text, rule if rule is not None else SelectionRule())
    with torch.no_grad():
        opacity = torch.sigmoid(model.opacities.detach()).reshape(-1)
        return chosen & (opacity > min_opacity)


# OpenGaussian's render filters (gaussian_renderer/__init__.py @ b70dcc6, lines in docs/evaluation.md)
MIN_SELECTED_TO_RENDER = 100  # `if filter_idx.sum() < 100: continue` after the scale filter
MIN_KEPT_TO_RENDER = 10  # `if filter_idx.sum() < 10: continue` after the kNN outlier filter


def knn_outlier_keep(points: np.ndarray) -> np.ndarray:
    """[n] bool: OpenGaussian's kNN outlier filter. K = int(sqrt(n)) nearest neighbours of each point within
    the set, the point itself included (pytorch3d's knn_points of the set against itself), as *squared*
    distances (what knn_points returns); keep a point when the mean of its K squared distances is below the
    mean + std (torch's unbiased std) of all n*K of them."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = int(n ** 0.5)
    if k < 1:
        return np.ones(n, dtype=bool)
    dist, _ = cKDTree(points).query(points, k=k)
    squared = np.asarray(dist, dtype=np.float64).reshape(n, k) ** 2
    limit = squared.mean() + (squared.std(ddof=1) if squared.size > 1 else 0.0)
    return squared.mean(axis=1) < limit


@dataclass
class FilterOutcome:
    keep: np.ndarray  # [G] bool, the Gaussians rendered (all False: nothing rendered)
    visible_selected: int  # selected and projected into this view (OpenGaussian's viewed_pts)
    after_scale: int  # ... and every scale < max_scale
    after_knn: int  # ... and kept by the kNN outlier filter (0 when the 100 rule stopped it before)
    rendered: bool


def opengaussian_render_filter(selected: np.ndarray, visible: np.ndarray, max_world_scale: np.ndarray,
                               means: np.ndarray, max_scale: float = 0.1) -> FilterOutcome:
    """OpenGaussian's per-view filters of a text selection before its silhouette is rendered: keep the visible
    selected Gaussians whose every scale is < `max_scale`; render nothing if fewer than 100 remain; drop the
    kNN outliers (knn_outlier_keep); render nothing if fewer than 10 remain."""
    keep = np.asarray(selected, bool) & np.asarray(visible, bool)
    visible_selected = int(keep.sum())
    keep &= np.asarray(max_world_scale) < max_scale
    after_scale = int(keep.sum())
    if after_scale < MIN_SELECTED_TO_RENDER:
        return FilterOutcome(np.zeros_like(keep), visible_selected, after_scale, 0, False)
    index = np.flatnonzero(keep)
    keep[index] = knn_outlier_keep(np.asarray(means)[index])
    after_knn = int(keep.sum())
    if after_knn < MIN_KEPT_TO_RENDER:
        return FilterOutcome(np.zeros_like(keep), visible_selected, after_scale, after_knn, False)
    return FilterOutcome(keep, visible_selected, after_scale, after_knn, True)


def world_max_scales(pipeline) -> np.ndarray:
    """[G] the largest of each Gaussian's three scales (std-devs) in the scene's world frame (the label and
    camera frame before nerfstudio's rescale): the frame whose units OpenGaussian's `scales < 0.1` used."""
    _, scale = dataparser_frame(pipeline)
    with torch.no_grad():
        scales = torch.exp(pipeline.model.scales.detach()).amax(-1).float().cpu().numpy()
    return scales.astype(np.float64) / scale


def visible_in_view(info) -> np.ndarray:
    """[G] bool: projected into the view (radii > 0; OpenGaussian's viewed_pts)."""
    radii = info["radii"].detach()
    visible = radii > 0
    if visible.ndim == 3:  # [V, N, 2] per-axis radii (newer gsplat)
        visible = visible.all(-1)
    return visible[0].cpu().numpy()


def project_view(model, camera):
    """(rgb [H, W, 3] numpy, projection info) of one view: the model's own RGB render, whose projection and
    tile binning the silhouettes reuse."""
    with torch.no_grad():
        outputs = model.render_rgb(camera)
    return outputs["rgb"].clamp(0, 1).float().cpu().numpy(), model.info


def render_silhouette(info, selected, backend: str = "auto"):
    """[H, W] numpy: the accumulated opacity of the `selected` Gaussians rendered alone (the others removed,
    so they occlude nothing), as OpenGaussian's leaf-cluster silhouette."""
    with torch.no_grad():
        opacities = info["opacities"] * selected.to(info["opacities"])[None]
        ones = torch.ones(opacities.shape[-1], 1, device=opacities.device, dtype=opacities.dtype)
        _, alpha = rasterize_to_pixels(
            info["means2d"].detach(), info["conics"].detach(), ones, opacities.detach(), int(info["width"]),
            int(info["height"]), int(info["tile_size"]), info["isect_offsets"], info["flatten_ids"],
            num_quantiles=None, backend=backend)
    return alpha[0, ..., 0].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------- matching
def image_index(pipeline) -> Dict[str, Tuple[str, int]]:
    """file name -> (split, index) over the run's eval and train images (eval wins duplicates)."""
    index: Dict[str, Tuple[str, int]] = {}
    dm = pipeline.datamanager
    for split, dataset in (("train", dm.train_dataset), ("eval", dm.eval_dataset)):
        for i, filename in enumerate(dataset.image_filenames):
            index[Path(filename).name] = (split, i)
    return index


def match_frame(name: str, index: Dict[str, Tuple[str, int]]) -> Optional[Tuple[str, int, str]]:
    """(split, index, how) of the image a label's info.name refers to: the same file name, else the
    same stem (e.g. a label naming frame_00041.jpg and images converted to .png); None if neither."""
    base = Path(name).name
    if base in index:
        return (*index[base], "name")
    stem = Path(base).stem
    same_stem = [k for k in index if Path(k).stem == stem]
    if len(same_stem) == 1:
        return (*index[same_stem[0]], "stem")
    return None


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "_"


def _closed_vocabulary(model) -> Optional[set]:
    if getattr(model.text_encoder, "name", "") == "synthetic":
        return set(model.class_names)
    return None


def _jpg_mask_root(cfg: "EvalLerfOvs", label_dir: Path) -> Optional[Path]:
    if cfg.gt_masks is not None:
        if not Path(cfg.gt_masks).is_dir():
            raise LabelError(f"--gt-masks {cfg.gt_masks} is not a folder of <frame>/<category>.jpg masks")
        return Path(cfg.gt_masks)
    default = label_dir / "gt"
    return default if default.is_dir() else None


def _unknown_row(frame: FrameLabels, category: str, gt: QueryGT) -> Dict:
    return {"frame": frame.image_name, "label_file": frame.path.name, "category": category, "iou": 0.0,
            "unknown_category": True, "selected_gaussians": 0, "rendered_gaussians": 0, "rendered": False,
            "gt_pixels": int(gt.mask.sum()), "pred_pixels": 0, "max_silhouette": 0.0}


ORACLE_SUFFIX = "_oracle"  # lerf_ovs_3d_oracle.json: an oracle diagnosis never overwrites the protocol's result


def oracle_gaussian_classes(pipeline, scene_root: Path) -> Tuple[np.ndarray, List[str]]:
    """([G] ground-truth class of each Gaussian: 0 = none, i + 1 = names[i]; names): a generated scene's labelled
    points (gt/points.ply, classes of gt/scene.json) transferred to the Gaussians' world-frame centres as
    eval-scannet does (majority of the EvalScannet.knn nearest points within EvalScannet.max_distance)."""
    points_file, scene_json = Path(scene_root) / "gt" / "points.ply", Path(scene_root) / "gt" / "scene.json"
    if not (points_file.is_file() and scene_json.is_file()):
        raise LabelError(f"--oracle-selection needs a generated scene's ground truth (gt/points.ply and gt/scene.json "
                         f"under {scene_root}), which this scene does not have")
    points = load_labels(points_file, "scene", Path(scene_root), "scene")
    transform, scale = dataparser_frame(pipeline)
    with torch.no_grad():
        means_world = to_world(pipeline.model.means.detach().cpu().numpy(), transform, scale)
    transfer = transfer_labels(means_world, points.xyz, points.labels, k=EvalScannet.knn,
                               max_distance=EvalScannet.max_distance)
    return transfer.labels, list(points.class_names)


def oracle_rule_text() -> str:
    return (f"ORACLE (a diagnosis, not a result): the Gaussians whose ground-truth class is the category (gt/points.ply, "
            f"{EvalScannet.knn} nearest labelled points within {EvalScannet.max_distance} world units)")


class _Scene3D:
    """OpenGaussian's 3D protocol on one run: text selections (computed once per category), the per-view render
    filters and the silhouettes."""

    def __init__(self, pipeline, cfg: "EvalLerfOvs"):
        self.model, self.cfg = pipeline.model, cfg
        self.rule = SelectionRule(cfg.selection, cfg.select_threshold, cfg.selection_knn)
        self.rule.check()
        self.selections: Dict[str, np.ndarray] = {}
        self.oracle: Optional[Tuple[np.ndarray, List[str]]] = None
        if cfg.oracle_selection:
            self.oracle = oracle_gaussian_classes(pipeline, scene_root_of(pipeline))
        if cfg.render_filters:
            if not (math.isfinite(cfg.filter_max_scale) and cfg.filter_max_scale > 0):
                raise ValueError(f"--filter-max-scale must be a positive number of world units, got {cfg.filter_max_scale}")
            self.max_scales = world_max_scales(pipeline)
            with torch.no_grad():
                self.means = self.model.means.detach().float().cpu().numpy()

    def selection(self, category: str) -> np.ndarray:
        if category not in self.selections and self.oracle is not None:
            labels, names = self.oracle  # a category no ground-truth class has selects nothing (IoU 0)
            chosen = labels == (names.index(category) + 1) if category in names else np.zeros(len(labels), bool)
            with torch.no_grad():
                opacity = torch.sigmoid(self.model.opacities.detach()).reshape(-1).cpu().numpy()
            self.selections[category] = chosen & (opacity > self.cfg.select_min_opacity)  # as select_gaussians
        if category not in self.selections:
            chosen = select_gaussians(self.model, self.cfg.prompt_template.format(category), self.rule,
                                      self.cfg.select_min_opacity)
            self.selections[category] = chosen.cpu().numpy()
        return self.selections[category]

    def evaluate_frame(self, frame: FrameLabels, camera, queries, counts: Dict, png_dir: Path):
        cfg, model = self.cfg, self.model
        rgb, info = project_view(model, camera)
        resized = rgb.shape[:2] != (frame.height, frame.width)
        if resized:
            counts["frames_resized"] += 1
            rgb = cv2.resize(rgb, (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)
        visible = visible_in_view(info) if cfg.render_filters else None
        rows, pngs = [], []
        for category, gt in queries.items():
            selected = self.selection(category)
            row = {"frame": frame.image_name, "label_file": frame.path.name, "category": category,
                   "selected_gaussians": int(selected.sum())}
            rendered = selected
            if cfg.render_filters:
                outcome = opengaussian_render_filter(selected, visible, self.max_scales, self.means,
                                                     cfg.filter_max_scale)
                rendered = outcome.keep
                row.update(visible_selected=outcome.visible_selected, after_scale_filter=outcome.after_scale,
                           after_knn_filter=outcome.after_knn)
                counts["queries_not_rendered"] += int(not outcome.rendered)
            row.update(rendered_gaussians=int(rendered.sum()), rendered=bool(rendered.any()))
            silhouette = render_silhouette(info, torch.from_numpy(rendered).to(model.device),
                                           model.config.rasterizer_backend)
            if resized:
                silhouette = cv2.resize(silhouette, (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)
            pred = (silhouette > cfg.silhouette_threshold).astype(np.uint8)
            iou = silhouette_iou(pred, gt.mask)
            row.update(iou=iou, gt_pixels=int(gt.mask.sum()), pred_pixels=int(pred.sum()),
                       max_silhouette=float(silhouette.max()))
            if cfg.save_png:
                peak = np.unravel_index(int(np.argmax(silhouette)), silhouette.shape)[::-1]
                path = png_dir / _safe(Path(frame.image_name).stem) / f"{_safe(category)}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), overlay(rgb, silhouette, pred, gt, peak, iou > 0.25))
                row["png"] = str(path)
                pngs.append(str(path))
            rows.append(row)
        return rows, pngs


def run_eval_lerf_ovs(cfg: EvalLerfOvs, pipeline=None, checkpoint_path=None) -> Dict:
    """Evaluate; writes <output>/lerf_ovs_2d.json, .md and PNGs and returns the JSON's content.
    `pipeline` may be passed to evaluate an already-loaded run (tests)."""
    start = time.perf_counter()
    if "{}" not in cfg.prompt_template:
        raise ValueError(f"--prompt-template {cfg.prompt_template!r} must contain '{{}}'")
    if cfg.oracle_selection and cfg.protocol != "opengaussian-3d":
        raise ValueError("--oracle-selection is a diagnosis of --protocol opengaussian-3d (it replaces the 3D selection)")
    if pipeline is None:
        pipeline, checkpoint_path = load_pipeline(cfg.load_config)
    model = pipeline.model
    scene_root = scene_root_of(pipeline)
    label_dir = Path(cfg.labels) if cfg.labels is not None else scene_root / "label"
    if cfg.labels is None and not label_dir.is_dir():
        raise LabelError(f"no label folder at {label_dir}: pass --labels DIR (LeRF-OVS: data/lerf_ovs/label/<scene>)")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    protocol = PROTOCOLS[cfg.protocol]
    stem = protocol + (ORACLE_SUFFIX if cfg.oracle_selection else "")  # output file names
    frames = read_label_dir(label_dir, cfg.label_glob)
    index = image_index(pipeline)
    vocabulary = _closed_vocabulary(model)
    if vocabulary is not None and cfg.prompt_template != "{}":
        raise ValueError("the synthetic teacher's text encoder is exact-string: use --prompt-template '{}'")
    run_dir = Path(cfg.load_config).parent
    out_dir = Path(cfg.output) if cfg.output is not None else run_dir / "eval"
    png_dir = out_dir / stem

    counts = dict(label_files=len(frames), frames_evaluated=0, frames_unmatched=0, frames_matched_by_stem=0,
                  frames_resized=0, frames_without_queries=0, objects=0, polygons_clipped=0, empty_masks=0,
                  invalid_polygons=0, bboxes_from_mask=0, queries_unknown_category=0)
    unmatched, unknown = [], []
    for frame in frames:
        for key, value in frame.counts.items():
            counts[key] += value
    matches = []
    for frame in frames:
        match = match_frame(frame.image_name, index)
        if match is None:
            if not cfg.skip_unmatched:
                examples = ", ".join(sorted(index)[:4])
                raise LabelError(
                    f"{frame.path}: info.name '{frame.image_name}' is not an image of this run ({len(index)} "
                    f"train/eval images, e.g. {examples}). Check --labels belongs to this scene, or pass "
                    "--skip-unmatched to skip such files (they are counted in the report).")
            counts["frames_unmatched"] += 1
            unmatched.append(str(frame.path))
            continue
        counts["frames_matched_by_stem"] += int(match[2] == "stem")
        matches.append((frame, match))

    mask_root = _jpg_mask_root(cfg, label_dir) if protocol == PROTOCOL_3D else None
    if protocol == PROTOCOL_3D:
        counts.update(frames_jpg_masks=0, queries_not_rendered=0)
    scene_3d = _Scene3D(pipeline, cfg) if protocol == PROTOCOL_3D else None
    rows: List[Dict] = []
    pngs: List[str] = []
    for frame, (split, i, _) in matches:
        frame_queries = frame.queries
        jpg_folder = jpg_mask_folder(mask_root, frame.image_name)
        if jpg_folder is not None:  # OpenGaussian's GT: the frame's per-category .jpg masks, not the polygons
            frame_queries = read_jpg_masks(jpg_folder)
            counts["frames_jpg_masks"] += 1
        queries, unknown_here = OrderedDict(), []
        for category, gt in frame_queries.items():
            if vocabulary is not None and category not in vocabulary:
                if cfg.unknown_categories == "error":
                    raise LabelError(
                        f"{frame.path}: category '{category}' is unknown to the synthetic teacher (closed vocabulary: "
                        f"{', '.join(sorted(vocabulary))}); pass --unknown-categories skip to skip it")
                counts["queries_unknown_category"] += 1
                unknown.append(f"{frame.path.name}:{category}")
                unknown_here.append((category, gt))
                continue
            queries[category] = gt
        if not queries and not (protocol == PROTOCOL_3D and unknown_here):
            counts["frames_without_queries"] += 1
            continue
        dataset = pipeline.datamanager.train_dataset if split == "train" else pipeline.datamanager.eval_dataset
        camera = dataset.cameras[i: i + 1].to(model.device)
        if protocol == PROTOCOL_3D:
            counts["frames_evaluated"] += 1
            frame_rows, frame_pngs = scene_3d.evaluate_frame(frame, camera, queries, counts, png_dir)
            # OpenGaussian counts a query it has no prediction for as IoU 0 (compute_lerf_iou.py): so do we
            frame_rows += [_unknown_row(frame, category, gt) for category, gt in unknown_here]
            rows += frame_rows
            pngs += frame_pngs
            continue
        with torch.no_grad(), model.scores_only():  # relevancy rendered in query space, no feature map
            outputs = model.get_outputs_for_camera(camera)
            rgb = outputs["rgb"].clamp(0, 1).cpu().numpy()
            names = list(queries)
            maps = model.relevancy_maps([cfg.prompt_template.format(c) for c in names], crop_ids=model._crop_ids())
            relevancies = {c: maps[..., j].float().cpu().numpy() for j, c in enumerate(names)}
        resized = rgb.shape[:2] != (frame.height, frame.width)
        if resized:
            counts["frames_resized"] += 1
            rgb = cv2.resize(rgb, (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)
        counts["frames_evaluated"] += 1
        for category, gt in queries.items():
            rel = relevancies[category]
            if resized:
                rel = cv2.resize(rel, (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)
            pred, valid = prediction_mask(rel, cfg.smooth_kernel, cfg.mask_threshold, cfg.majority_radius)
            hit, maxima = localize(rel, gt.bboxes, cfg.smooth_kernel)
            row = {"frame": frame.image_name, "label_file": frame.path.name, "category": category,
                   "iou": mask_iou(pred, gt.mask), "localized": bool(hit),
                   "argmax_xy": [int(v) for v in maxima[0]], "gt_pixels": int(gt.mask.sum()),
                   "pred_pixels": int(pred.sum()), "max_relevancy": float(rel.max())}
            if cfg.save_png:
                path = png_dir / _safe(Path(frame.image_name).stem) / f"{_safe(category)}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), overlay(rgb, valid, pred, gt, maxima[0], hit))
                row["png"] = str(path)
                pngs.append(str(path))
            rows.append(row)

    ious = [r["iou"] for r in rows]
    per_category: Dict[str, Dict] = {}
    for r in rows:
        per_category.setdefault(r["category"], []).append(r)
    if protocol == PROTOCOL_3D:
        per_category = {c: {"miou": float(np.mean([r["iou"] for r in v])),
                            "acc_025": accuracy_at([r["iou"] for r in v], 0.25), "queries": len(v)}
                        for c, v in per_category.items()}
    else:
        per_category = {c: {"miou": float(np.mean([r["iou"] for r in v])),
                            "localization_accuracy": sum(r["localized"] for r in v) / len(v), "queries": len(v)}
                        for c, v in per_category.items()}
    result = {
        "protocol": protocol,
        "protocol_option": cfg.protocol,
        "method": (f"oracle selection on {cfg.method_name}'s Gaussians (diagnosis)" if cfg.oracle_selection
                   else cfg.method_name),
        **({"oracle_selection": True,
            "diagnosis": "ORACLE 3D selection: each category selected the Gaussians of its ground-truth class, not its "
                         "text query; the protocol's ceiling for a perfect 3D selection, not a result"}
           if cfg.oracle_selection else {}),
        "scene": scene_root.name,
        "scene_root": str(scene_root),
        "label_dir": str(label_dir),
        "miou": float(np.mean(ious)) if ious else float("nan"),
        **({"macc": accuracy_at(ious, 0.25), "acc_025": accuracy_at(ious, 0.25), "acc_05": accuracy_at(ious, 0.5)}
           if protocol == PROTOCOL_3D else
           {"localization_accuracy": float(np.mean([r["localized"] for r in rows])) if rows else float("nan")}),
        "num_queries": len(rows),
        "per_category": per_category,
        "per_query": rows,
        "counts": counts,
        "skipped": {"unmatched_label_files": unmatched, "unknown_categories": unknown},
        "params": {"mask_threshold": cfg.mask_threshold, "smooth_kernel": cfg.smooth_kernel,
                   "majority_radius": cfg.majority_radius, "prompt_template": cfg.prompt_template,
                   "negatives": list(model.config.relevancy_negatives),
                   "text_encoder": getattr(model.text_encoder, "name", type(model.text_encoder).__name__),
                   "num_quantiles": model.config.num_quantiles, "label_glob": cfg.label_glob,
                   **({"selection": cfg.selection, "select_threshold": cfg.select_threshold, "selection_knn": cfg.selection_knn,
                       "oracle_selection": cfg.oracle_selection,
                       "selection_rule": oracle_rule_text() if cfg.oracle_selection else scene_3d.rule.describe(),
                       **({"oracle_gaussians_with_class": int((scene_3d.oracle[0] > 0).sum()),
                           "oracle_classes": scene_3d.oracle[1]} if cfg.oracle_selection else {}),
                       "select_min_opacity": cfg.select_min_opacity,
                       "silhouette_threshold": cfg.silhouette_threshold, "render_filters": cfg.render_filters,
                       "filter_max_scale": cfg.filter_max_scale,
                       "gt_masks": str(mask_root) if mask_root is not None else None} if protocol == PROTOCOL_3D else {})},
        "pngs": len(pngs),
        "png_dir": str(png_dir) if pngs else None,
        "load_config": str(cfg.load_config),
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "seconds": time.perf_counter() - start,
    }
    if not rows:
        raise LabelError(f"no query could be evaluated (counts: {counts}); see the skipped label files/categories")
    result["json"] = str(out_dir / f"{stem}.json")
    result["markdown"] = str(out_dir / f"{stem}.md")
    write_json(Path(result["json"]), result)
    write_text(Path(result["markdown"]), lerf3d_markdown(result) if protocol == PROTOCOL_3D else lerf_markdown(result))
    return result


def overlay(rgb: np.ndarray, relevancy: np.ndarray, pred: np.ndarray, gt: QueryGT, argmax_xy, hit: bool) -> np.ndarray:
    """BGR uint8 panel [render | relevancy heat map | prediction (tinted) with GT outline (green),
    GT boxes (yellow) and the localization argmax (green dot: hit, red: miss)], upscaled to >= 256 px wide."""
    h, w = pred.shape
    scale = max(1, math.ceil(256 / w))
    up = lambda img: cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)  # noqa: E731
    base = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)[..., ::-1].copy()
    norm = relevancy - relevancy.min()
    norm = (norm / (norm.max() + 1e-9) * 255).astype(np.uint8)
    heat = cv2.applyColorMap(norm, cv2.COLORMAP_TURBO)
    pred_panel = (base * 0.4).astype(np.uint8)
    orange = np.array([0, 140, 255])  # BGR
    pred_panel[pred != 0] = (0.5 * base[pred != 0] + 0.5 * orange).astype(np.uint8)
    base, heat, pred_panel = up(base), up(heat), up(pred_panel)
    contours, _ = cv2.findContours(gt.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = [c * scale + scale // 2 for c in contours]
    cv2.drawContours(pred_panel, contours, -1, (0, 255, 0), 1)
    for x1, y1, x2, y2 in gt.bboxes.reshape(-1, 4):
        cv2.rectangle(pred_panel, (int(x1 * scale), int(y1 * scale)), (int((x2 + 1) * scale) - 1, int((y2 + 1) * scale) - 1),
                      (0, 255, 255), 1)
    centre = (int(argmax_xy[0] * scale + scale // 2), int(argmax_xy[1] * scale + scale // 2))
    cv2.circle(pred_panel, centre, max(3, scale), (0, 200, 0) if hit else (0, 0, 255), -1)
    return np.concatenate([base, heat, pred_panel], axis=1)


def lerf_markdown(result: Dict) -> str:
    c = result["counts"]
    p = result["params"]
    lines = [
        f"# LeRF-OVS 2D segmentation (LangSplat's protocol) — {result['scene']}",
        "",
        "| Method | scene | mIoU | localization acc. | queries |",
        "|---|---|---|---|---|",
        f"| {result['method']} | {result['scene']} | {fmt(result['miou'])} | {fmt(result['localization_accuracy'])} | "
        f"{result['num_queries']} |",
        "",
        "| category | mIoU | localization acc. | queries |",
        "|---|---|---|---|",
    ]
    for name, v in result["per_category"].items():
        lines.append(f"| {name} | {fmt(v['miou'])} | {fmt(v['localization_accuracy'])} | {v['queries']} |")
    lines += [
        "",
        "| frame | category | IoU | localized |",
        "|---|---|---|---|",
    ]
    for r in result["per_query"]:
        lines.append(f"| {r['frame']} | {r['category']} | {fmt(r['iou'])} | {'yes' if r['localized'] else 'no'} |")
    lines += [
        "",
        f"Label files: {c['label_files']} ({c['frames_evaluated']} frames evaluated, {c['frames_unmatched']} skipped: "
        f"no matching image, {c['frames_matched_by_stem']} matched by stem, {c['frames_resized']} rendered at another "
        f"resolution and resized, {c['frames_without_queries']} without a usable query). Objects: {c['objects']} "
        f"({c['polygons_clipped']} polygons clipped to the image, {c['empty_masks']} empty masks skipped, "
        f"{c['invalid_polygons']} invalid polygons skipped, {c['bboxes_from_mask']} boxes taken from the mask); "
        f"{c['queries_unknown_category']} queries skipped: unknown category.",
        f"Parameters: mean filter {p['smooth_kernel']} px, threshold {p['mask_threshold']} after LangSplat's [-1, 1] "
        f"rescale, majority radius {p['majority_radius']}, negatives {', '.join(p['negatives'])}, prompt "
        f"`{p['prompt_template']}`, text encoder {p['text_encoder']}, K = {p['num_quantiles']}.",
        "Not comparable with the paper's LeRF-OVS numbers (OpenGaussian's 3D protocol).",
    ]
    return "\n".join(lines) + "\n"


def lerf3d_markdown(result: Dict) -> str:
    c, p = result["counts"], result["params"]
    oracle = bool(result.get("oracle_selection"))
    lines = [
        f"# LeRF-OVS 3D selection (OpenGaussian's protocol, the paper's) — {result['scene']}"
        + (" — ORACLE selection (a diagnosis, not a result)" if oracle else ""),
        "",
        *([result["diagnosis"] + ".", ""] if oracle else []),
        "| Method | scene | mIoU | mAcc (Acc@0.25) | Acc@0.5 | queries |",
        "|---|---|---|---|---|---|",
        f"| {result['method']} | {result['scene']} | {fmt(result['miou'])} | {fmt(result['macc'])} | "
        f"{fmt(result['acc_05'])} | {result['num_queries']} |",
        "",
        "| category | mIoU | Acc@0.25 | queries |",
        "|---|---|---|---|",
    ]
    for name, v in result["per_category"].items():
        lines.append(f"| {name} | {fmt(v['miou'])} | {fmt(v['acc_025'])} | {v['queries']} |")
    lines += ["", "| frame | category | IoU | selected Gaussians | rendered (after the filters) |", "|---|---|---|---|---|"]
    for r in result["per_query"]:
        rendered = "unknown category (IoU 0)" if r.get("unknown_category") else r.get("rendered_gaussians", "")
        lines.append(f"| {r['frame']} | {r['category']} | {fmt(r['iou'])} | {r['selected_gaussians']} | {rendered} |")
    lines += [
        "",
        f"Label files: {c['label_files']} ({c['frames_evaluated']} frames evaluated, {c['frames_unmatched']} skipped: "
        f"no matching image, {c['frames_resized']} rendered at another resolution and resized); "
        f"{c['queries_unknown_category']} queries of an unknown category counted IoU 0; "
        f"{c.get('queries_not_rendered', 0)} queries rendered nothing after the filters; "
        f"{c.get('frames_jpg_masks', 0)} frames scored against .jpg masks (> {JPG_MASK_LEVEL}), the others against "
        "the label polygons.",
        ("Render filters (OpenGaussian's): every scale < " f"{p.get('filter_max_scale')} (world units), >= "
         f"{MIN_SELECTED_TO_RENDER} Gaussians, kNN outliers removed (K = sqrt(n), mean squared distance < mean + "
         f"std), >= {MIN_KEPT_TO_RENDER} kept." if p.get("render_filters") else
         "Render filters OFF (--no-render-filters): a diagnosis, not OpenGaussian's protocol."),
        f"Selection: {p.get('selection_rule', 'relevancy > ' + str(p['select_threshold']))} (negatives "
        f"{', '.join(p['negatives'])}), opacity > "
        f"{p['select_min_opacity']}; silhouette > {p['silhouette_threshold']}; text encoder {p['text_encoder']}.",
        ("Not a result: the ceiling this protocol allows a perfect 3D selection (ground-truth Gaussians, the "
         "protocol's filters, silhouettes and masks)." if oracle else
         "Comparable with the paper's LeRF-OVS numbers (45.8 mIoU / 56.9 mAcc), not with LangSplat's 2D protocol."),
    ]
    return "\n".join(lines) + "\n"


def main(cfg: EvalLerfOvs) -> None:
    """`qsplat` runs this with the parsed options."""
    try:
        result = run_eval_lerf_ovs(cfg)
    except ValueError as err:  # bad input (LabelError included): the message, not a traceback
        raise SystemExit(f"qsplat eval-lerf-ovs: {err}") from err
    keys = ("scene", "protocol", "miou", "macc" if cfg.protocol == "opengaussian-3d" else "localization_accuracy",
            "num_queries", "counts", "json", "markdown")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
