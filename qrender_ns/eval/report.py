"""`qsplat report RUN_DIRS... --out report.md`: the evaluation JSONs of runs as tables shaped like the
paper's (method, #classes, mIoU, mAcc, FPS), with the paper's published numbers as reference rows.

Reads, recursively under every RUN_DIR (or the files themselves when given): the JSONs written by
`qsplat eval-scannet` (protocol "scannet3d") and `qsplat eval-lerf-ovs` (protocols "lerf_ovs_2d" and
"lerf_ovs_3d"), and ns-eval's output JSON (a dict with "results" and "checkpoint"). Reference rows hold only
numbers stated in the project's design notes as the paper's, and each is printed only in the table of its
own protocol (the paper's LeRF-OVS 45.8 / 56.9 beside our opengaussian-3d rows, never beside 2D ones);
everything else is measured by the listed commands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from qrender_ns.eval import fmt, write_text
from qrender_ns.eval.options import Report

PAPER = "arXiv 2512.20927"
QUOTED = f"quoted from {PAPER}"

# (method, setting, #classes, mIoU, mAcc, FPS): only numbers the design notes attribute to the paper.
REFERENCE_SCANNET: List[Tuple[str, str, str, Optional[float], Optional[float], Optional[float]]] = [
    ("Q-Render + GS-Net (paper, K = 10)", "ScanNet, OpenGaussian's 10 val scenes", "19", 50.75, None, None),
]
# The paper's LeRF-OVS numbers use OpenGaussian's 3D protocol (mIoU, mAcc): not comparable with 2D rows.
REFERENCE_LERF_3D: List[Tuple[str, Optional[float], Optional[float]]] = [
    ("Q-Render + GS-Net (paper)", 45.8, 56.9),
]


def collect(paths: List[Path]) -> Dict[str, List[Dict]]:
    """{"scannet3d": [...], "lerf_ovs_2d": [...], "lerf_ovs_3d": [...], "ns_eval": [...]} from the JSON files
    under `paths`."""
    found: Dict[str, List[Dict]] = {"scannet3d": [], "lerf_ovs_2d": [], "lerf_ovs_3d": [], "ns_eval": [],
                                    "gsnet_generalization": []}
    seen = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (pass run folders or result JSON files)")
        if path.is_file() and path.suffix != ".json":
            path = path.parent  # e.g. a config.yml: its run folder
        files = [path] if path.is_file() else sorted(path.rglob("*.json"))
        for f in files:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict):
                continue
            data["_file"] = str(f)
            if data.get("protocol") in ("scannet3d", "lerf_ovs_2d", "lerf_ovs_3d"):
                found[data["protocol"]].append(data)
            elif data.get("benchmark") == "gsnet_generalization":
                found["gsnet_generalization"].append(data)
            elif isinstance(data.get("results"), dict) and "checkpoint" in data:
                found["ns_eval"].append(data)
    return found


def _ns_eval_for(result: Dict, ns_evals: List[Dict]) -> Optional[Dict]:
    """ns-eval output of the same run (same config's folder), if any."""
    run_dir = Path(result.get("load_config", "")).parent
    for ev in ns_evals:
        checkpoint = Path(str(ev.get("checkpoint", "")))
        if run_dir != Path(".") and run_dir in checkpoint.parents:
            return ev
    return None


def _fps(result: Dict, ns_evals: List[Dict]) -> Tuple[Optional[float], str]:
    timing = result.get("timing") or {}
    if timing.get("fps_quantile"):
        return timing["fps_quantile"], f"{timing['width']}x{timing['height']}, {timing['device']}"
    ev = _ns_eval_for(result, ns_evals)
    ms = (ev or {}).get("results", {}).get("feature_ms_quantile")
    return (1000.0 / ms, "ns-eval mean over eval views") if ms else (None, "")


def render_report(found: Dict[str, List[Dict]]) -> str:
    ns_evals = found["ns_eval"]
    lines = ["# q-splat evaluation report", "",
             f"Rows marked *{QUOTED}* are the paper's published numbers (not measured here); every other row "
             "comes from the listed JSON files. Protocols: docs/evaluation.md.", ""]

    lines += ["## ScanNet 3D semantic segmentation (OpenGaussian's protocol)", "",
              "| Method | Scene | #classes | mIoU | mAcc | FPS (512-D map) | Source |",
              "|---|---|---|---|---|---|---|"]
    for method, setting, classes, miou, macc, fps in REFERENCE_SCANNET:
        lines.append(f"| {method} | {setting} | {classes} | {fmt(miou, 2, 1)} | {fmt(macc, 2, 1)} | "
                     f"{fmt(fps, 2, 1)} | *{QUOTED}* |")
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for r in sorted(found["scannet3d"], key=lambda r: (r.get("method", ""), str(r.get("classes")), r.get("scene", ""))):
        fps, where = _fps(r, ns_evals)
        n = r.get("num_classes")
        label = f"{r['classes']}" if r.get("classes") != "scene" else f"scene ({n})"
        lines.append(f"| {r.get('method', '?')} | {r.get('scene', '?')} | {label} | {fmt(r.get('miou'))} | "
                     f"{fmt(r.get('macc'))} | {fmt(fps, 1, 1.0)}{f' ({where})' if where else ''} | {r['_file']} |")
        sup = r.get("supervised_diagnostic")
        if sup:
            lines.append(f"| {r.get('method', '?')}, supervised Gaussians only (diagnostic) | {r.get('scene', '?')} | "
                         f"{label} | {fmt(sup.get('miou'))} | {fmt(sup.get('macc'))} | | {r['_file']} |")
        groups.setdefault((r.get("method", "?"), label), []).append(r)
    for (method, label), rows in groups.items():
        if len(rows) > 1:
            lines.append(f"| {method} | mean of {len(rows)} scenes | {label} | "
                         f"{fmt(np.nanmean([_num(r.get('miou')) for r in rows]))} | "
                         f"{fmt(np.nanmean([_num(r.get('macc')) for r in rows]))} | — | (mean of the rows above) |")
    if not found["scannet3d"]:
        lines.append("| (no `qsplat eval-scannet` result found) | | | | | | |")
    lines += ["", "mIoU / mAcc in %, over the classes present in each scene's ground truth. The paper's number is "
              "the mean over OpenGaussian's 10 validation scenes; a generated scene ('scene' classes) is a "
              "pipeline check, not comparable with it. FPS: our quantile 512-D feature map at the stated "
              "resolution and device. 'diagnostic' rows keep only the Gaussians with enough summed Q-Render weight "
              "over the training views (the ones the feature loss reached; threshold in each JSON); they are "
              "not the protocol.", ""]

    lines += selection_table(found["scannet3d"])

    lines += ["## LeRF-OVS 2D segmentation (LangSplat's protocol)", "",
              "| Method | Scene | mIoU | Localization acc. | Queries | Source |", "|---|---|---|---|---|---|"]
    for r in sorted(found["lerf_ovs_2d"], key=lambda r: (r.get("method", ""), r.get("scene", ""))):
        lines.append(f"| {r.get('method', '?')} | {r.get('scene', '?')} | {fmt(r.get('miou'))} | "
                     f"{fmt(r.get('localization_accuracy'))} | {r.get('num_queries')} | {r['_file']} |")
    if not found["lerf_ovs_2d"]:
        lines.append("| (no `qsplat eval-lerf-ovs` result found) | | | | | |")
    lines += ["", "The paper reports no number under this protocol (its LeRF-OVS numbers use OpenGaussian's 3D "
              "protocol, next table); these rows compare with LangSplat-style 2D results only.", ""]

    lines += ["## LeRF-OVS 3D selection (OpenGaussian's protocol, the paper's)", "",
              "| Method | Scene | mIoU | mAcc (Acc@0.25) | Queries | Render filters | Source |",
              "|---|---|---|---|---|---|---|"]
    for method, miou, macc in REFERENCE_LERF_3D:
        lines.append(f"| {method} | LeRF-OVS (paper) | {fmt(miou, 1, 1)} | {fmt(macc, 1, 1)} | | | *{QUOTED}* |")
    rows3d = sorted(found["lerf_ovs_3d"], key=lambda r: (r.get("method", ""), r.get("scene", "")))
    for r in rows3d:
        lines.append(f"| {r.get('method', '?')} | {r.get('scene', '?')} | {fmt(r.get('miou'))} | "
                     f"{fmt(r.get('macc'))} | {r.get('num_queries')} | {_filters_cell(r)} | {r['_file']} |")
    results3d = [r for r in rows3d if not r.get("oracle_selection")]  # --oracle-selection rows: diagnoses, no mean
    if len(results3d) > 1:
        lines.append(f"| mean of {len(results3d)} scenes | | {fmt(np.nanmean([_num(r.get('miou')) for r in results3d]))} | "
                     f"{fmt(np.nanmean([_num(r.get('macc')) for r in results3d]))} | | | (mean of the rows above"
                     f"{', oracle rows left out' if len(results3d) < len(rows3d) else ''}) |")
    if not rows3d:
        lines.append("| (no `qsplat eval-lerf-ovs --protocol opengaussian-3d` result found) | | | | | | |")
    lines += ["", "mAcc is OpenGaussian's Acc@0.25: the share of (frame, query) pairs whose silhouette IoU exceeds "
              "0.25 (a query with no selected Gaussian counts IoU 0). Selection rule and thresholds: "
              "docs/evaluation.md.", ""]

    lines += gsnet_generalization_table(found.get("gsnet_generalization", []))

    if ns_evals:
        lines += ["## ns-eval (held-out views)", "",
                  "| Run | PSNR | SSIM | LPIPS | 2D feature mIoU | ms dense | ms quantile | speed-up | Source |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for ev in ns_evals:
            res = ev["results"]
            run = f"{ev.get('method_name', '?')} / {ev.get('experiment_name', '?')}"
            lines.append(f"| {run} | {fmt(res.get('psnr'), 2, 1)} | {fmt(res.get('ssim'), 3, 1)} | "
                         f"{fmt(res.get('lpips'), 3, 1)} | {fmt(res.get('feature_miou'))} | "
                         f"{fmt(res.get('feature_ms_dense'), 1, 1)} | {fmt(res.get('feature_ms_quantile'), 1, 1)} | "
                         f"{fmt(res.get('feature_speedup_quantile_vs_dense'), 2, 1)} | {ev['_file']} |")
        lines.append("")
    return "\n".join(lines)


SCALING_KEY = re.compile(r"gsnet_k10_(\d+)rooms$")  # bench_gsnet_generalization.py --train-scenes N
# --ema-decay / --tta-views rows of a net: its weight average, and features averaged over turned input copies
VARIANT_KEY = re.compile(r"(gsnet_(?:k10|dense)(?:_\d+rooms)?)(_ema)?(?:_tta(\d+))?$")
GSNET_METHODS = [  # (key in the benchmark JSON, row label)
    ("table", "(a) per-scene feature table (from scratch)"),
    ("backproject", "(b) back-projection of the teacher masks (K = 10)"),
    ("backproject_exact", "(b) back-projection of the exact teacher's masks (reference, noisy-teacher runs)"),
    ("gsnet_k10", "(c) GS-Net feed-forward (trained with Q-Render K = 10)"),
    ("gsnet_dense", "(c') GS-Net feed-forward (trained with dense blending, V-Render)"),
    ("gsnet_k10_finetune", "(d) GS-Net + per-scene fine-tune"),
]
GSNET_BASELINES = [m for m in GSNET_METHODS if not m[0].startswith("gsnet_")]  # rows before the data-scaling ones
GSNET_NETS = [m for m in GSNET_METHODS if m[0].startswith("gsnet_")]


def gsnet_generalization_table(results: List[Dict]) -> List[str]:
    """Markdown rows of benchmarks/bench_gsnet_generalization.py's JSON: held-out generated rooms, ScanNet-19
    protocol, per method and fit kind (RGB fit with or without the depth loss)."""
    if not results:
        return []
    lines = ["## GS-Net generalization (held-out generated rooms, ScanNet-19 protocol)", "",
             "| Features | 3DGS fit | Held-out rooms | mIoU | mAcc | s / scene | Source |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for kind, fit in r.get("fits", {}).items():
            fit_label = exact_label = {"plain": "RGB only", "depth": "RGB + depth loss"}.get(kind, kind)
            teacher = fit.get("teacher") or {}  # a noisy synthetic teacher trains and scores every method
            noise = [f"{name} {teacher[key]:g}" for key, name in (("label_noise", "label noise"),
                                                                   ("miss_rate", "miss rate")) if teacher.get(key)]
            if noise:
                fit_label += f", teacher with {' / '.join(noise)}"
            # --train-scenes N rows: GS-Net trained on fewer rooms (data scaling), fewest first
            scaling = sorted((int(match.group(1)), k) for k in fit.get("mean", {}) if (match := SCALING_KEY.match(k)))
            methods = GSNET_BASELINES + [
                (key, f"(c) GS-Net feed-forward (trained with Q-Render K = 10), {count} rooms") for count, key in scaling]
            labels = dict(methods + GSNET_NETS)
            ordered = []
            for key, _ in methods + GSNET_NETS:
                ordered.append(key)
                ordered += sorted(k for k in fit.get("mean", {})
                                  if (v := VARIANT_KEY.match(k)) and v.group(1) == key and (v.group(2) or v.group(3)))
            for key in ordered:
                m = fit.get("mean", {}).get(key)
                if m is None:
                    continue
                variant = VARIANT_KEY.match(key)
                net_key = key[len("gsnet_"):]
                if key in labels:
                    label = labels[key]
                else:  # a variant of the row before
                    label = labels[variant.group(1)]
                    net_key = variant.group(1)[len("gsnet_"):] + (variant.group(2) or "")
                    if variant.group(2):
                        label += ", weight average (EMA)"
                    if variant.group(3):
                        label += f", test-time average of {variant.group(3)} views"
                # the net behind the row (the fine-tune starts from the K = 10 one): its rooms and steps
                net = fit.get("gsnet", {}).get("k10" if key == "gsnet_k10_finetune" else net_key, {})
                if (variant.group(1) if variant else key) in ("gsnet_k10", "gsnet_dense") and net.get("train_scenes"):
                    label += f", {net['train_scenes']} rooms"
                if key.startswith("gsnet_") and net.get("steps"):
                    label += f", {net['steps']} steps"
                row_fit = exact_label if key == "backproject_exact" else fit_label  # that row reads the exact teacher
                lines.append(f"| {label} | {row_fit} | {fit.get('num_val_scenes')} | {fmt(m.get('miou'))} | "
                             f"{fmt(m.get('macc'))} | {fmt(m.get('seconds'), 2, 1)} | {r['_file']} |")
    lines += ["", "Every method uses the same fitted Gaussians of each held-out room; s / scene excludes the 3DGS fit "
              "(GS-Net: its forward pass; fine-tune: forward + the fine-tune steps). Settings (steps, dataset) are "
              "in each JSON's args; the paper's GS-Net is trained on 1,503 real ScanNet scenes, these on generated "
              "rooms with the synthetic teacher, so only the ranking is comparable, not the numbers.", ""]
    return lines


def _filters_cell(result: Dict) -> str:
    """'on' / 'off (diagnosis)' for an opengaussian-3d JSON; '—' for one written before the filters existed."""
    flag = (result.get("params") or {}).get("render_filters")
    return "—" if flag is None else ("on" if flag else "off (diagnosis)")


def selection_table(scannet_results: List[Dict]) -> List[str]:
    """Markdown rows of eval-scannet's 3D selection metrics: mean precision / recall / IoU of the text selections
    at the run's threshold, and the same at every threshold of its sweep."""
    rows = [r for r in scannet_results if r.get("selection_3d")]
    if not rows:
        return []
    lines = ["## 3D selection by text query (per-Gaussian ground truth)", "",
             "| Method | Scene | #classes | Rule | Precision | Recall | IoU | Old rule, sweep: threshold P / R / IoU | Source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("method", ""), str(r.get("classes")), r.get("scene", ""))):
        sel = r["selection_3d"]
        sweep = "; ".join(f"{t['threshold']:g}: {fmt(t['precision'])} / {fmt(t['recall'])} / {fmt(t['iou'])}"
                          for t in sel.get("sweep", []))
        lines.append(f"| {r.get('method', '?')} | {r.get('scene', '?')} | {r.get('classes')} | {_rule_cell(sel)} | "
                     f"{fmt(sel['precision'])} | {fmt(sel['recall'])} | {fmt(sel['iou'])} | {sweep} | {r['_file']} |")
    lines += ["", "In %, means over the classes present in the scene's per-Gaussian ground truth (eval-scannet's kNN "
              "transfer): precision = share of the Gaussians a class's text query selects that are that class; recall "
              "= share of the class's Gaussians selected. Rule 'wins' (the default of `qsplat query`): the query beats "
              "the run's other classes/prompts and the canonical negatives; the sweep is the old rule (relevancy > "
              "threshold). Per class: scannet3d_*.md.", ""]
    return lines


def _rule_cell(selection: Dict) -> str:
    """'wins', or 'relevancy > t' for the absolute rule (results written before the rule existed included)."""
    if selection.get("mode", "absolute") == "wins":
        return "wins"
    return f"relevancy > {selection['threshold']:g}"


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def make_report(run_dirs: List[Path], out: Optional[Path] = None) -> str:
    if not run_dirs:
        raise SystemExit("qsplat report: pass at least one run folder (or result JSON)")
    text = render_report(collect([Path(p) for p in run_dirs]))
    if out is not None:
        write_text(Path(out), text)
    return text


def main(cfg: Report) -> None:
    """`qsplat` runs this with the parsed options."""
    text = make_report(cfg.run_dirs, cfg.out)
    print(text)
