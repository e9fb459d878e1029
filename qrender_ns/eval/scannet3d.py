"""ScanNet 3D semantic segmentation of the Gaussians (the paper's protocol, from OpenGaussian).

Per Gaussian: predicted class = argmax over the class names of cos(feature, text embedding);
ground truth = majority vote of its k nearest labelled points (scipy cKDTree), where only
neighbours within `max_distance` vote; a Gaussian with no voting neighbour, whose vote is
"unlabelled" (0), or whose opacity is below `min_opacity` is not evaluated. mIoU and mAcc are
means over the classes present in the ground truth (as OpenGaussian's `calculate_metrics`).
Exact choices and their sources: docs/evaluation.md.

Class subsets: OpenGaussian's scripts/eval_scannet.py (NYU40 ids, 19 / 15 / 10 classes; the query
strings are OpenGaussian's NYU40 names, e.g. "showercurtain").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from qrender_ns.data.classes import NYU40_NAMES, SUBSET_IDS, subset_classes  # noqa: F401  (re-exported)
from qrender_ns.eval import (dataparser_frame, feature_timing, fmt, load_pipeline, scene_root_of, to_world, write_json,
                             write_text)
from qrender_ns.eval.options import ClassChoice, EvalScannet
from qrender_ns.features.selection import SelectionRule, feature_chunks, gaussian_relevancy, select_by_rule
from qrender_ns.render import rasterize_to_pixels
from qrender_ns.utils.geometry import quat_to_rotmat_numpy

PROTOCOL = "scannet3d"


# OpenGaussian's 10 validation scenes (the paper evaluates on these).
OPENGAUSSIAN_SCENES = ("scene0000_00", "scene0062_00", "scene0070_00", "scene0097_00", "scene0140_00",
                       "scene0200_00", "scene0347_00", "scene0400_00", "scene0590_00", "scene0645_00")


# ---------------------------------------------------------------------------------------------- labels
@dataclass
class LabelledPoints:
    xyz: np.ndarray  # [P, 3] float64, the scene's world frame
    labels: np.ndarray  # [P] int64: 0 = not one of the classes, i + 1 = class_names[i]
    class_names: List[str]
    source: str  # the PLY read
    label_space: str  # "nyu40" or "scene"


def read_label_ply(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """xyz [P, 3] and the integer vertex property `label` of a labelled PLY."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label point cloud {path} does not exist")
    vertex = PlyData.read(str(path))["vertex"].data
    names = vertex.dtype.names or ()
    if "label" not in names:
        raise ValueError(f"{path} has no vertex property 'label' (properties: {', '.join(names)}); ScanNet's "
                         "labels are in <scene>_vh_clean_2.labels.ply, generated scenes' in gt/points.ply")
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    return xyz, np.asarray(vertex["label"]).astype(np.int64)


def remap(raw: np.ndarray, source_ids: Sequence[int]) -> np.ndarray:
    """raw label == source_ids[i] -> i + 1; every other value -> 0."""
    lut = np.zeros(max(int(raw.max(initial=0)), max(source_ids, default=0)) + 1, dtype=np.int64)
    for index, source in enumerate(source_ids):
        if source >= 0:  # a negative id stands for "this class has no source id"
            lut[source] = index + 1
    out = np.zeros_like(raw)
    ok = (raw >= 0) & (raw < len(lut))
    out[ok] = lut[raw[ok]]
    return out


def _scene_classes(scene_root: Path) -> Dict[int, str]:
    meta = json.loads((scene_root / "gt" / "scene.json").read_text())
    return {int(c["id"]): c["name"] for c in meta["classes"]}


def default_label_file(scene_root: Path) -> Path:
    generated = scene_root / "gt" / "points.ply"
    if generated.is_file():
        return generated
    found = sorted(scene_root.glob("*_vh_clean_2.labels.ply"))
    if found:
        return found[0]
    raise FileNotFoundError(
        f"no labelled point cloud in {scene_root}: expected gt/points.ply (generated scene) or "
        "<scene>_vh_clean_2.labels.ply (ScanNet); pass --scene-labels PATH")


def load_labels(path: Path, classes: str, scene_root: Optional[Path],
                label_space: Literal["auto", "nyu40", "scene"] = "auto") -> LabelledPoints:
    """Labelled points mapped to the chosen class list (see the module docstring)."""
    path = Path(path)
    xyz, raw = read_label_ply(path)
    scene_json = scene_root / "gt" / "scene.json" if scene_root is not None else None
    if label_space == "auto":
        if path.name.endswith(".labels.ply"):
            label_space = "nyu40"
        elif scene_json is not None and scene_json.is_file():
            label_space = "scene"
        else:
            raise ValueError(f"cannot tell the label ids of {path}: pass --label-space nyu40 (ScanNet *.labels.ply) "
                             "or scene (a generated scene's gt/points.ply)")
    if label_space == "scene" and (scene_json is None or not scene_json.is_file()):
        raise ValueError(f"--label-space scene needs the generated scene's gt/scene.json (not found under {scene_root})")
    if classes == "scene":
        if label_space != "scene":
            raise ValueError("--classes scene uses a generated scene's own class list; for ScanNet labels choose "
                             "--classes 19, 15 or 10")
        id_to_name = _scene_classes(scene_root)
        ids = sorted(id_to_name)
        return LabelledPoints(xyz, remap(raw, ids), [id_to_name[i] for i in ids], str(path), label_space)
    nyu_ids, names = subset_classes(classes)
    if label_space == "nyu40":
        return LabelledPoints(xyz, remap(raw, nyu_ids), names, str(path), label_space)
    # a generated scene evaluated with a ScanNet subset: its classes are matched to the subset by name
    id_to_name = _scene_classes(scene_root)
    source_ids = [next((i for i, n in id_to_name.items() if n == name), -1) for name in names]
    return LabelledPoints(xyz, remap(raw, source_ids), names, str(path), label_space)


@dataclass
class Transfer:
    labels: np.ndarray  # [G] ground-truth class per Gaussian, 0 = not evaluated
    nearest_distance: np.ndarray  # [G] metric distance to the nearest labelled point
    has_neighbour: np.ndarray  # [G] bool: at least one neighbour within the threshold


def transfer_labels(gaussian_xyz: np.ndarray, point_xyz: np.ndarray, point_labels: np.ndarray, k: int = 5,
                    max_distance: float = 0.1, distance: Literal["metric", "mahalanobis"] = "metric",
                    rotations: Optional[np.ndarray] = None, stds: Optional[np.ndarray] = None,
                    chunk: int = 500_000) -> Transfer:
    """Majority vote of the k nearest labelled points of every Gaussian.

    Only neighbours within `max_distance` vote: metres for distance="metric"; for "mahalanobis" the
    distance sqrt((p - mu)^T Sigma^-1 (p - mu)) under the Gaussian's covariance (rotations [G,3,3],
    stds [G,3] in the points' frame), evaluated on the k Euclidean-nearest points. A Gaussian with no
    voting neighbour gets 0. Label 0 ("not one of the classes") votes like any other label. A tie in
    the count goes to the tied label of the nearest voting neighbour (not to the smaller class id, which
    a plain bincount/mode argmax would give).
    """
    from scipy.spatial import cKDTree

    if k < 1:
        raise ValueError("k must be >= 1")
    if len(point_xyz) == 0:
        raise ValueError("the label point cloud is empty")
    if distance == "mahalanobis" and (rotations is None or stds is None):
        raise ValueError("distance='mahalanobis' needs the Gaussians' rotations and standard deviations")
    k = min(k, len(point_xyz))
    gaussian_xyz = np.asarray(gaussian_xyz, dtype=np.float64)
    point_labels = np.asarray(point_labels, dtype=np.int64)
    num_labels = int(point_labels.max(initial=0)) + 1
    tree = cKDTree(np.asarray(point_xyz, dtype=np.float64))
    out = np.zeros(len(gaussian_xyz), dtype=np.int64)
    nearest = np.zeros(len(gaussian_xyz))
    any_within = np.zeros(len(gaussian_xyz), dtype=bool)
    for start in range(0, len(gaussian_xyz), chunk):
        sl = slice(start, start + chunk)
        dist, idx = tree.query(gaussian_xyz[sl], k=k, workers=-1)
        dist, idx = dist.reshape(len(dist), k), idx.reshape(len(idx), k)
        if distance == "metric":
            within = dist <= max_distance
        else:
            offset = point_xyz[idx] - gaussian_xyz[sl][:, None]  # [g, k, 3]
            local = np.einsum("gkd,gde->gke", offset, rotations[sl]) / np.maximum(stds[sl][:, None], 1e-12)
            within = np.linalg.norm(local, axis=-1) <= max_distance
        labels = point_labels[idx]
        votes = np.zeros((len(idx), num_labels), dtype=np.int64)
        rows = np.arange(len(idx))
        for r in range(k):
            np.add.at(votes, (rows, labels[:, r]), within[:, r].astype(np.int64))
        # among the labels with the most votes, the one of the nearest voting neighbour (rank order)
        top = votes.max(1)
        candidate = within & (votes[rows[:, None], labels] == top[:, None])
        winner = labels[rows, candidate.argmax(1)]
        has = within.any(1)
        out[sl] = np.where(has, winner, 0)
        nearest[sl] = dist[:, 0]
        any_within[sl] = has
    return Transfer(out, nearest, any_within)


# ---------------------------------------------------------------------------------------------- metrics
def segmentation_metrics(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> Dict:
    """OpenGaussian's calculate_metrics: labels 1..num_classes, gt 0 = ignored. IoU_c = |gt=c & pred=c| /
    |gt=c | pred=c| over the evaluated items; acc_c = |gt=c & pred=c| / |gt=c|; mIoU / mAcc = means over
    the classes present in gt; overall accuracy over all evaluated items."""
    gt, pred = np.asarray(gt, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ")
    if pred.size and (pred.min() < 0 or pred.max() > num_classes) or gt.size and (gt.min() < 0 or gt.max() > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes}")
    valid = gt > 0
    n = num_classes + 1
    conf = np.bincount(gt[valid] * n + pred[valid], minlength=n * n).reshape(n, n)
    inter = np.diag(conf).astype(np.float64)
    gt_count = conf.sum(1).astype(np.float64)
    pred_count = conf.sum(0).astype(np.float64)
    union = gt_count + pred_count - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt_count > 0, inter / gt_count, np.nan)
    present = [c for c in range(1, n) if gt_count[c] > 0]
    total = int(valid.sum())
    return {
        "miou": float(np.mean(iou[present])) if present else float("nan"),
        "macc": float(np.mean(acc[present])) if present else float("nan"),
        "overall_acc": float(inter[1:].sum() / total) if total else float("nan"),
        "iou": iou[1:].tolist(), "acc": acc[1:].tolist(), "gt_count": gt_count[1:].astype(int).tolist(),
        "present": present, "num_evaluated": total,
    }


def selection_metrics(gt: np.ndarray, selected: np.ndarray, class_index: int) -> Dict:
    """3D selection of one class by its text query, over the evaluated Gaussians (gt > 0; the others are not
    counted either way): precision = |selected & gt = c| / |selected|, recall = ... / |gt = c|, IoU = ... /
    |selected or gt = c|; NaN where the denominator is 0 (nothing selected: precision NaN, recall 0)."""
    gt, selected = np.asarray(gt), np.asarray(selected, dtype=bool)
    evaluated = gt > 0
    chosen = selected & evaluated
    truth = gt == class_index
    hits = int((chosen & truth).sum())
    picked, relevant, union = int(chosen.sum()), int(truth.sum()), int((chosen | truth).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"precision": ratio(hits, picked), "recall": ratio(hits, relevant), "iou": ratio(hits, union),
            "selected": picked, "gt": relevant, "true_positives": hits}


def _mean_of(per_class: Dict[str, Dict], key: str) -> float:
    values = [v[key] for v in per_class.values() if v["gt"] > 0 and np.isfinite(v[key])]
    return float(np.mean(values)) if values else float("nan")


def selection_at(gt: np.ndarray, selections: Dict[str, np.ndarray]) -> Dict:
    """Per-class selection_metrics of `selections[name]` (bool [G]; class c + 1 = the c-th name) and their means
    over the classes present in `gt`; a class selecting nothing has no precision (left out of the mean) and
    recall 0."""
    per_class = {name: selection_metrics(gt, chosen, c + 1) for c, (name, chosen) in enumerate(selections.items())}
    nothing = [n for n, v in per_class.items() if v["gt"] > 0 and v["selected"] == 0]
    return {"per_class": per_class, "precision": _mean_of(per_class, "precision"),
            "recall": _mean_of(per_class, "recall"), "iou": _mean_of(per_class, "iou"),
            "classes_selecting_nothing": nothing}


def selection_report(gt: np.ndarray, selections: Dict[str, np.ndarray], rule: str, mode: str,
                     threshold: Optional[float], relevancies: Dict[str, np.ndarray], sweep: Sequence[float]) -> Dict:
    """Precision / recall / IoU of the rule's text selections (`selections`, per class in the order of the label
    ids) and, beside them, of the old absolute rule `relevancies[name] > t` at every t of `sweep`."""
    main = selection_at(gt, selections)
    rows = [{"threshold": float(t), **selection_at(gt, {n: r > t for n, r in relevancies.items()})} for t in sweep]
    return {"rule": rule, "mode": mode, "threshold": threshold, **main, "sweep": rows,
            "present_classes": [n for n, v in main["per_class"].items() if v["gt"] > 0]}


def low_opacity_mask(opacity_logits, min_opacity: float = 0.1) -> np.ndarray:
    """[G] bool: sigmoid(opacity) < min_opacity, computed in float32 as OpenGaussian does (scripts/
    eval_scannet.py: numpy `1 / (1 + np.exp(-x)) < 0.1` on the PLY's float32 opacities). It matters: a Gaussian still at splatfacto's initial
    opacity 0.1 has a float32 logit whose float32 sigmoid rounds to float32(0.1) (kept) while its float64
    sigmoid is just below 0.1 (dropped); that flipped +0.010 mIoU in one of our runs."""
    logits = torch.as_tensor(opacity_logits).detach().reshape(-1).to(torch.float32)
    return (torch.sigmoid(logits) < torch.tensor(min_opacity, dtype=torch.float32)).cpu().numpy()


def predict_classes(features, text_embeddings) -> np.ndarray:
    """1 + argmax_c cos(f, t_c) per row (torch tensors in, numpy out); 0 ("no prediction", a miss for every
    class) for an exactly zero feature: a Gaussian no training pixel reached (never-supervised, back-projection
    weight 0) predicts nothing, instead of class 1 that an argmax over equal zero scores would give.
    `features`: a [G, D] tensor, or an iterable of (start, [rows, D]) blocks in order (`feature_chunks`)."""
    blocks = ((start, features[start:start + 262_144]) for start in range(0, features.shape[0], 262_144)) \
        if isinstance(features, torch.Tensor) else features
    with torch.no_grad():
        out = []
        for _, rows in blocks:
            text = F.normalize(text_embeddings.to(rows), dim=-1)
            sims = F.normalize(rows, dim=-1) @ text.T
            pred = sims.argmax(-1) + 1
            out.append(torch.where(rows.abs().amax(-1) > 0, pred, torch.zeros_like(pred)).cpu())
        pred = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return pred.numpy().astype(np.int64)


def supervision_weights(pipeline, max_views: int = 0):
    """[G] summed Q-Render weight of every Gaussian over the training views, in pixels: the feature each
    Gaussian contributes to the rendered maps the contrastive loss sees (with the model's own K, at the
    training resolution). A Gaussian with ~0 never shaped a rendered feature: its table entry is still
    its random initialisation. Computed as the gradient of sum(render of a constant 1-channel feature).
    `max_views` > 0 uses that many views spread evenly over the training split."""
    model = pipeline.model
    dataset = pipeline.datamanager.train_dataset
    views = list(range(len(dataset)))
    if 0 < max_views < len(views):
        views = [views[int(round(i))] for i in np.linspace(0, len(views) - 1, max_views)]
    total = torch.zeros(model.num_points, device=model.device)
    for i in views:
        camera = dataset.cameras[i: i + 1].to(model.device)
        info = _project_only(model, camera)
        ones = torch.ones(model.num_points, 1, device=model.device, requires_grad=True)
        with torch.enable_grad():
            out, _ = rasterize_to_pixels(
                info["means2d"].detach(), info["conics"].detach(), ones, info["opacities"].detach(),
                int(info["width"]), int(info["height"]), int(info["tile_size"]), info["isect_offsets"],
                info["flatten_ids"], num_quantiles=model.config.num_quantiles, backend=model.config.rasterizer_backend)
            out.sum().backward()
        total += ones.grad[:, 0]
    return total.cpu().numpy(), len(views)


def _project_only(model, camera):
    """Project and tile-bin the Gaussians for `camera` (sets model.info) without rendering features."""
    with torch.no_grad():
        model.render_rgb(camera)
    return model.info


def apply_template(template: str, names: Sequence[str], encoder_name: str) -> List[str]:
    if "{}" not in template:
        raise ValueError(f"--prompt-template {template!r} must contain '{{}}' where the class name goes")
    if encoder_name == "synthetic" and template != "{}":
        raise ValueError("the synthetic teacher's text encoder is exact-string (one vector per class name): use "
                         "--prompt-template '{}' (the bare class name)")
    return [template.format(n) for n in names]


def run_eval_scannet(cfg: EvalScannet, pipeline=None, checkpoint_path=None) -> Dict:
    """Evaluate; writes <output>/scannet3d_<classes>.json and .md and returns the JSON's content.
    `pipeline` may be passed to evaluate an already-loaded run (tests)."""
    start = time.perf_counter()
    if pipeline is None:
        pipeline, checkpoint_path = load_pipeline(cfg.load_config)
    model = pipeline.model
    scene_root = scene_root_of(pipeline)
    label_path = Path(cfg.scene_labels) if cfg.scene_labels is not None else default_label_file(scene_root)
    points = load_labels(label_path, cfg.classes, scene_root, cfg.label_space)
    encoder = model.text_encoder
    prompts = apply_template(cfg.prompt_template, points.class_names, getattr(encoder, "name", ""))

    transform, scale = dataparser_frame(pipeline)
    with torch.no_grad():
        means_world = to_world(model.means.detach().cpu().numpy(), transform, scale)
        low_opacity = low_opacity_mask(model.opacities.detach(), cfg.min_opacity)
        rotations = stds = None
        if cfg.distance == "mahalanobis":
            rotations = np.einsum("ij,gjk->gik", transform[:3, :3].T,
                                  quat_to_rotmat_numpy(model.quats.detach().cpu().numpy().astype(np.float64)))
            stds = np.exp(model.scales.detach().cpu().numpy().astype(np.float64)) / scale
        text = encoder.encode(prompts)
        pred = predict_classes(feature_chunks(model), text)  # block by block: no float32 [N, D] copy

    transfer = transfer_labels(means_world, points.xyz, points.labels, k=cfg.knn, max_distance=cfg.max_distance,
                               distance=cfg.distance, rotations=rotations, stds=stds)
    gt = np.where(low_opacity, 0, transfer.labels)
    metrics = segmentation_metrics(gt, pred, len(points.class_names))
    in_labels = np.bincount(points.labels, minlength=len(points.class_names) + 1)[1:]

    predicted = np.bincount(pred[gt > 0], minlength=len(points.class_names) + 1)[1:]
    per_class = {}
    for c, name in enumerate(points.class_names):
        present = (c + 1) in metrics["present"]
        per_class[name] = {"iou": metrics["iou"][c] if present else None, "acc": metrics["acc"][c] if present else None,
                           "num_gt_gaussians": metrics["gt_count"][c], "num_predicted_gaussians": int(predicted[c]),
                           "num_label_points": int(in_labels[c]), "present": present}
    skipped = [n for n, v in per_class.items() if not v["present"]]
    supervised = None
    if cfg.supervision_diagnostic:
        weights, num_views = supervision_weights(pipeline, cfg.supervision_max_views)
        keep = weights >= cfg.supervised_min_weight
        sub = segmentation_metrics(np.where(keep, gt, 0), pred, len(points.class_names))
        supervised = {"min_weight_pixels": cfg.supervised_min_weight, "views": num_views,
                      "gaussians": int(keep.sum()), "evaluated": sub["num_evaluated"],
                      "evaluated_never_rendered": int(((weights <= 0) & (gt > 0)).sum()),
                      "miou": sub["miou"], "macc": sub["macc"], "overall_acc": sub["overall_acc"],
                      "present_classes": [points.class_names[c - 1] for c in sub["present"]],
                      "per_class_iou": {n: sub["iou"][c] for c, n in enumerate(points.class_names)
                                        if (c + 1) in sub["present"]}}
    selection = _selection_of_prompts(model, prompts, points.class_names, gt, cfg) if cfg.selection_metrics else None
    timing = feature_timing(pipeline, cfg.timing_view) if cfg.timing else None
    run_dir = Path(cfg.load_config).parent
    out_dir = Path(cfg.output) if cfg.output is not None else run_dir / "eval"
    result = {
        "protocol": PROTOCOL,
        "method": cfg.method_name,
        "classes": cfg.classes,
        "num_classes": len(points.class_names),
        "class_names": points.class_names,
        "prompts": prompts,
        "miou": metrics["miou"],
        "macc": metrics["macc"],
        "overall_acc": metrics["overall_acc"],
        "num_present_classes": len(metrics["present"]),
        "num_skipped_classes": len(skipped),
        "skipped_classes": skipped,
        "per_class": per_class,
        "counts": {
            "gaussians": int(len(pred)),
            "evaluated": metrics["num_evaluated"],
            "ignored_low_opacity": int(low_opacity.sum()),
            "ignored_no_neighbour_within_threshold": int((~transfer.has_neighbour & ~low_opacity).sum()),
            "ignored_unlabelled_vote": int(((transfer.labels == 0) & transfer.has_neighbour & ~low_opacity).sum()),
            "label_points": int(len(points.xyz)),
            "label_points_in_classes": int((points.labels > 0).sum()),
        },
        "params": {"knn": cfg.knn, "distance": cfg.distance, "max_distance": cfg.max_distance,
                   "min_opacity": cfg.min_opacity, "prompt_template": cfg.prompt_template,
                   "label_file": points.source, "label_space": points.label_space,
                   "text_encoder": getattr(encoder, "name", type(encoder).__name__),
                   "num_quantiles": model.config.num_quantiles},
        "supervised_diagnostic": supervised,
        "selection_3d": selection,
        "timing": timing,
        "scene": scene_root.name,
        "scene_root": str(scene_root),
        "load_config": str(cfg.load_config),
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "seconds": time.perf_counter() - start,
    }
    stem = f"{PROTOCOL}_{cfg.classes}"
    result["json"] = str(out_dir / f"{stem}.json")
    result["markdown"] = str(out_dir / f"{stem}.md")
    write_json(Path(result["json"]), result)
    write_text(Path(result["markdown"]), scannet_markdown(result))
    return result


def _check_thresholds(threshold: float, sweep: Sequence[float]) -> None:
    for t in (threshold, *sweep):
        if not (isinstance(t, (int, float)) and np.isfinite(t)):
            raise ValueError(f"--selection-threshold / --selection-sweep must be finite relevancy values, got {t!r}")


def _selection_of_prompts(model, prompts: Sequence[str], names: Sequence[str], gt: np.ndarray,
                          cfg: "EvalScannet") -> Dict:
    """selection_report of every class's prompt under the rule of qsplat query (cfg.selection), with the old
    absolute rule's sweep beside it."""
    _check_thresholds(cfg.selection_threshold, cfg.selection_sweep)
    rule = SelectionRule(cfg.selection, cfg.selection_threshold, cfg.selection_knn)
    rule.check()
    selections = {name: select_by_rule(model, prompt, rule).cpu().numpy() for name, prompt in zip(names, prompts)}
    relevancies = {name: gaussian_relevancy(model, prompt).float().cpu().numpy() for name, prompt in zip(names, prompts)}
    threshold = cfg.selection_threshold if cfg.selection == "absolute" else None
    return selection_report(gt, selections, rule.describe(), cfg.selection, threshold, relevancies, cfg.selection_sweep)


def scannet_metrics_of_features(scene_root: Path, means_world: np.ndarray, opacities, features, text_encoder,
                                classes: ClassChoice = "19", knn: int = 5, max_distance: float = 0.1,
                                min_opacity: float = 0.1, prompt_template: str = "{}") -> Dict:
    """The ScanNet protocol of `run_eval_scannet` (defaults equal) for per-Gaussian features held in memory
    (GS-Net experiments: no run folder): {miou, macc, overall_acc, num_present_classes, evaluated}. `opacities`
    are in [0, 1]; the cut is taken in float32 as `low_opacity_mask`."""
    points = load_labels(default_label_file(scene_root), classes, scene_root, "auto")
    prompts = apply_template(prompt_template, points.class_names, getattr(text_encoder, "name", ""))
    opacities = torch.as_tensor(opacities).detach().reshape(-1).to(torch.float32)
    low_opacity = (opacities < torch.tensor(min_opacity, dtype=torch.float32)).cpu().numpy()
    with torch.no_grad():
        pred = predict_classes(torch.as_tensor(features).detach().float().cpu(), text_encoder.encode(prompts).cpu())
    transfer = transfer_labels(np.asarray(means_world, dtype=np.float64), points.xyz, points.labels, k=knn,
                               max_distance=max_distance)
    gt = np.where(low_opacity, 0, transfer.labels)
    metrics = segmentation_metrics(gt, pred, len(points.class_names))
    return {"miou": metrics["miou"], "macc": metrics["macc"], "overall_acc": metrics["overall_acc"],
            "num_present_classes": len(metrics["present"]), "evaluated": metrics["num_evaluated"]}


def scannet_markdown(result: Dict) -> str:
    timing = result.get("timing") or {}
    fps = fmt(timing.get("fps_quantile"), 1, 1.0)
    lines = [
        f"# ScanNet 3D semantic segmentation — {result['scene']} ({result['num_classes']} classes: {result['classes']})",
        "",
        "| Method | #classes | mIoU | mAcc | overall acc | FPS (512-D map) |",
        "|---|---|---|---|---|---|",
        f"| {result['method']} | {result['num_classes']} | {fmt(result['miou'])} | {fmt(result['macc'])} | "
        f"{fmt(result['overall_acc'])} | {fps} |",
    ]
    sup = result.get("supervised_diagnostic")
    if sup:
        lines.append(f"| {result['method']}, supervised Gaussians only (diagnostic) | {len(sup['present_classes'])} | "
                     f"{fmt(sup['miou'])} | {fmt(sup['macc'])} | {fmt(sup['overall_acc'])} | |")
    lines += [
        "",
        f"mIoU / mAcc over the {result['num_present_classes']} classes present in the ground truth; "
        f"{result['num_skipped_classes']} skipped (absent): {', '.join(result['skipped_classes']) or 'none'}.",
        "",
        "| class | IoU | Acc | GT Gaussians | predicted | label points |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in result["per_class"].items():
        label = name if v["present"] else f"{name} (skipped: absent)"
        lines.append(f"| {label} | {fmt(v['iou'])} | {fmt(v['acc'])} | {v['num_gt_gaussians']} | "
                     f"{v['num_predicted_gaussians']} | {v['num_label_points']} |")
    c, p = result["counts"], result["params"]
    lines += [
        "",
        f"Gaussians: {c['gaussians']}, evaluated {c['evaluated']}; not evaluated: opacity < {p['min_opacity']}: "
        f"{c['ignored_low_opacity']}, no labelled point within {p['max_distance']} ({p['distance']}): "
        f"{c['ignored_no_neighbour_within_threshold']}, majority vote 'not one of the classes': "
        f"{c['ignored_unlabelled_vote']}.",
        f"Ground truth: {p['knn']}-NN majority vote over {p['label_file']} ({p['label_space']} ids). "
        f"Prompt template: `{p['prompt_template']}`; text encoder: {p['text_encoder']}; K = {p['num_quantiles']}.",
    ]
    if sup:
        lines.append(f"Diagnostic: {sup['gaussians']} Gaussians have a summed Q-Render weight >= "
                     f"{sup['min_weight_pixels']} px over {sup['views']} training views ({sup['evaluated']} of them "
                     f"evaluated); {sup['evaluated_never_rendered']} evaluated Gaussians were never rendered in a "
                     "training view (their features are untrained). The protocol's numbers are the first row.")
    lines += selection_markdown(result.get("selection_3d"))
    if timing:
        lines.append(f"Timing ({timing['device']}, {timing['width']}x{timing['height']}x{timing['channels']}, "
                     f"{timing['view']}): dense {timing['feature_ms_dense']:.1f} ms, quantile "
                     f"{timing['feature_ms_quantile']:.1f} ms per feature map "
                     f"(x{timing['feature_speedup_quantile_vs_dense']:.2f}).")
    return "\n".join(lines) + "\n"


def selection_markdown(selection: Optional[Dict]) -> List[str]:
    """The 3D selection section of scannet3d_*.md: per class at the threshold, then the sweep."""
    if not selection:
        return []
    lines = ["", f"## 3D selection by text query ({selection['rule']})", "",
             "| class | precision | recall | IoU | selected | GT Gaussians |", "|---|---|---|---|---|---|"]
    for name, v in selection["per_class"].items():
        if v["gt"] > 0:
            lines.append(f"| {name} | {fmt(v['precision'])} | {fmt(v['recall'])} | {fmt(v['iou'])} | "
                         f"{v['selected']} | {v['gt']} |")
    lines += [f"| mean ({len(selection['present_classes'])} classes) | {fmt(selection['precision'])} | "
              f"{fmt(selection['recall'])} | {fmt(selection['iou'])} | | |", "",
              "The old absolute rule (relevancy vs the canonical negatives > threshold) beside it:", "",
              "| threshold | mean precision | mean recall | mean IoU | classes selecting nothing |", "|---|---|---|---|---|"]
    for row in selection["sweep"]:
        lines.append(f"| {row['threshold']} | {fmt(row['precision'])} | {fmt(row['recall'])} | {fmt(row['iou'])} | "
                     f"{', '.join(row['classes_selecting_nothing']) or '—'} |")
    lines += ["", "Over the evaluated Gaussians (those with a ground-truth class); a query selecting nothing has "
              "recall 0 and no precision (left out of the mean precision)."]
    return lines


def main(cfg: EvalScannet) -> None:
    """`qsplat` runs this with the parsed options."""
    try:
        result = run_eval_scannet(cfg)
    except (FileNotFoundError, ValueError) as err:  # bad input: the message, not a traceback
        raise SystemExit(f"qsplat eval-scannet: {err}") from err
    summary = {k: result[k] for k in ("miou", "macc", "overall_acc", "num_present_classes", "num_skipped_classes")}
    if result["supervised_diagnostic"]:
        summary["supervised_diagnostic_miou"] = result["supervised_diagnostic"]["miou"]
    if result["selection_3d"]:
        sel = result["selection_3d"]
        summary["selection_3d"] = {k: sel[k] for k in ("mode", "threshold", "precision", "recall", "iou")}
    summary.update(json=result["json"], markdown=result["markdown"])
    print(json.dumps(summary, indent=2))
