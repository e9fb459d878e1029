"""Options of the evaluation verbs (`qsplat eval-scannet`, `eval-lerf-ovs`, `report`): import-light, read by
`qsplat --help`; each `main()` makes the verb's one lazy import, its code module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import tyro

ClassChoice = Literal["19", "15", "10", "scene"]
DEFAULT_SELECTION_SWEEP = (0.55, 0.7, 0.8, 0.9, 0.99)
LABEL_GLOB = "frame_*.json"  # LangSplat's eval_gt_lerfdata reads only these


@dataclass
class EvalScannet:
    """ScanNet 3D semantic segmentation of a trained q-splat scene (mIoU / mAcc per Gaussian)."""

    load_config: Path
    """config.yml of a q-splat run (as for ns-eval)."""
    classes: ClassChoice = "19"
    """19 / 15 / 10: OpenGaussian's ScanNet subsets; scene: a generated scene's own class list."""
    scene_labels: Optional[Path] = None
    """Labelled points (default: the scene's gt/points.ply, else its *_vh_clean_2.labels.ply)."""
    output: Optional[Path] = None
    """Folder for scannet3d_<classes>.json / .md (default: <run dir>/eval)."""
    label_space: Literal["auto", "nyu40", "scene"] = "auto"
    """Ids in the label PLY: nyu40 (ScanNet), scene (generated); auto: *.labels.ply -> nyu40."""
    prompt_template: str = "{}"
    """Text for class c = template.format(c); '{}' = the bare name (required by the synthetic teacher)."""
    knn: int = 5
    """Labelled points voting for each Gaussian's ground truth."""
    distance: Literal["metric", "mahalanobis"] = "metric"
    """How far a neighbour may be to vote: metric (metres) or Mahalanobis under the Gaussian's covariance."""
    max_distance: float = 0.1
    """Neighbours farther than this do not vote (metres, or sigmas for mahalanobis)."""
    min_opacity: float = 0.1
    """Gaussians with sigmoid(opacity) below this are not evaluated."""
    timing: bool = True
    """Also time dense vs quantile 512-D feature maps on one eval view (as ns-eval)."""
    timing_view: int = 0
    """Eval view used for the timing."""
    method_name: str = "q-splat (ours)"
    """Name of this run in the tables."""
    supervision_diagnostic: bool = True
    """Also report the metrics over the Gaussians the feature loss could reach (see --supervised-min-weight);
    a diagnostic beside the protocol's numbers, never instead of them."""
    supervised_min_weight: float = 0.5
    """Diagnostic subset: summed Q-Render weight over the training views >= this many pixels."""
    supervision_max_views: int = 0
    """Training views used for the diagnostic (0 = all)."""
    selection_metrics: bool = True
    """Also measure the 3D selection of each class by its text query (precision / recall / IoU of the Gaussians
    the --selection rule picks, against the per-Gaussian ground truth)."""
    selection: Literal["wins", "absolute"] = "wins"
    """The 3D selection rule (as qsplat query and the opengaussian-3d protocol): wins = the class's prompt beats
    the run's other classes/prompts and the canonical negatives (no threshold); absolute = relevancy vs the
    canonical negatives > --selection-threshold (the old rule)."""
    selection_threshold: float = 0.55
    """--selection absolute: the relevancy a selected Gaussian exceeds."""
    selection_knn: int = 32  # = qrender_ns.features.selection.DEFAULT_KNN (this module stays import-light)
    """wins: smooth each Gaussian's feature over its this-many nearest Gaussians in 3D, weighted by the supervision
    each received, before the comparison (0 = its own feature only; 32 chosen on validation rooms, docs/evaluation.md)."""
    selection_sweep: Tuple[float, ...] = DEFAULT_SELECTION_SWEEP
    """Thresholds of the old absolute rule reported beside the chosen rule (the old sweep)."""

    def main(self) -> None:
        from qrender_ns.eval.scannet3d import main

        main(self)


@dataclass
class EvalLerfOvs:
    """LeRF-OVS segmentation: LangSplat's 2D protocol (relevancy maps vs label polygons, mIoU + localization;
    the default) or OpenGaussian's 3D one (the paper's: Gaussians selected by the query, silhouettes vs the
    same masks, mIoU + Acc@0.25)."""

    load_config: Path
    """config.yml of a q-splat run (as for ns-eval)."""
    protocol: Literal["langsplat-2d", "opengaussian-3d"] = "langsplat-2d"
    """langsplat-2d: LangSplat's eval/evaluate_iou_loc.py. opengaussian-3d: OpenGaussian's
    render_lerf_by_text.py + compute_lerf_iou.py, the protocol of the paper's LeRF-OVS numbers (45.8 / 56.9)."""
    labels: Optional[Path] = None
    """Folder of LeRF-OVS label JSONs for this scene (default: <scene>/label)."""
    label_glob: str = LABEL_GLOB
    """Which files of --labels are label files (LangSplat reads only frame_*.json)."""
    output: Optional[Path] = None
    """Folder for lerf_ovs_2d.json / lerf_ovs_3d.json, .md and the PNG overlays (default: <run dir>/eval)."""
    selection: Literal["wins", "absolute"] = "wins"
    """opengaussian-3d: how the query selects Gaussians (as `qsplat query`). wins: the query's cosine beats every
    other class/prompt of the run's vocabulary and the canonical negatives, non-zero feature (no threshold);
    absolute: relevancy vs the canonical negatives > --select-threshold (the old rule)."""
    select_threshold: float = 0.55
    """opengaussian-3d with --selection absolute: the relevancy a selected Gaussian exceeds."""
    selection_knn: int = 32  # = qrender_ns.features.selection.DEFAULT_KNN (this module stays import-light)
    """opengaussian-3d with wins: smooth each Gaussian's feature over its this-many nearest Gaussians in 3D, weighted by the supervision
    each received, before the comparison (0 = its own feature only; 32 chosen on validation rooms, docs/evaluation.md)."""
    select_min_opacity: float = 0.0
    """opengaussian-3d: also require sigmoid(opacity) above this (OpenGaussian applies no opacity cut here)."""
    silhouette_threshold: float = 0.7
    """opengaussian-3d: silhouette (accumulated opacity of the selected Gaussians) > this is the predicted mask."""
    oracle_selection: bool = False
    """opengaussian-3d, a diagnosis (not a result): each category selects the Gaussians whose ground-truth class is
    that category (a generated scene's gt/points.ply + gt/scene.json, transferred as eval-scannet does: 5 nearest
    labelled points within 0.1 world units) instead of the text query; filters, silhouette threshold and IoU as
    the protocol. The score is the protocol's ceiling for a perfect 3D selection. Writes lerf_ovs_3d_oracle.json."""
    render_filters: bool = True
    """opengaussian-3d: apply OpenGaussian's render filters per view (scale, >= 100 selected, kNN outliers,
    >= 10 kept); --no-render-filters renders the whole selection (a diagnosis, not the protocol)."""
    filter_max_scale: float = 0.1
    """opengaussian-3d: Gaussians with any scale >= this (world units, as OpenGaussian's scales < 0.1) are not
    rendered."""
    gt_masks: Optional[Path] = None
    """opengaussian-3d: folder of <frame stem>/<category>.jpg masks (OpenGaussian's path_gt; default
    <labels>/gt when it exists); frames without such a folder use the label JSON's filled polygons."""
    mask_threshold: float = 0.4
    """LangSplat's --mask_thresh, applied after its [-1, 1] rescale (= 0.7 of the min-max range)."""
    smooth_kernel: int = 30
    """Mean-filter size in pixels (LangSplat: 30, at LeRF-OVS image resolution)."""
    majority_radius: int = 3
    """Radius of LangSplat's majority filter on the thresholded mask (7 x 7 window)."""
    prompt_template: str = "{}"
    """Query text = template.format(category) (LangSplat: the bare category)."""
    skip_unmatched: bool = False
    """Skip (and count) label files whose info.name is no image of the run, instead of failing."""
    unknown_categories: Literal["skip", "error"] = "skip"
    """Categories a closed-vocabulary teacher (synthetic) cannot embed: skip and count, or fail. opengaussian-3d
    counts them IoU 0 (as OpenGaussian counts a missing prediction) instead of skipping."""
    save_png: bool = True
    """Write one overlay PNG per (frame, query)."""
    method_name: str = "q-splat (ours)"

    def main(self) -> None:
        from qrender_ns.eval.lerf_ovs import main

        main(self)


@dataclass
class Report:
    """One markdown table per protocol from eval JSONs under the given run folders, with the paper's rows."""

    run_dirs: tyro.conf.Positional[List[Path]]
    """Run folders (searched recursively for result JSONs) or result JSON files."""
    out: Path = Path("report.md")
    """Markdown file to write."""

    def main(self) -> None:
        from qrender_ns.eval.report import main

        main(self)
