"""GS-Net generalization on held-out generated rooms (issue 14's table), as a benchmark writing JSON.

For every fit kind (`plain`: RGB fit; `depth`: RGB + depth loss) of a `qsplat make-dataset` folder:
  1. GS-Net is trained across the train scenes (`qsplat train-gsnet --dataset D --fit KIND`, Q-Render K=10),
     and for `plain` also with dense blending ("V-Render", --num-quantiles None) for the K=10 vs dense row;
  2. on every val scene (never seen in training), with the same fitted Gaussians, features come from
     (a) a per-scene feature table trained from scratch with the same loss (TABLE_STEPS steps),
     (b) back-projection of the teacher masks (K=10, one pass),
     (c) GS-Net feed-forward,
     (d) GS-Net fine-tuned on that scene (FINETUNE_STEPS steps);
  3. each is scored with the ScanNet-19 protocol (eval-scannet's kNN transfer to the Gaussians, 0.1 opacity cut):
     mIoU / mAcc, with seconds per scene (for (c): the forward pass only; fitting the 3DGS is excluded for all).
  --train-scenes N ... adds GS-Net rows trained on only the first N train rooms (same steps): how the
  feed-forward score grows with the number of training rooms.
  --extra-train-datasets D2 ... adds every room of other datasets (e.g. `make-dataset --seed 1 --val-scenes 0`)
  to GS-Net's training set; only --dataset's val rooms are scored.
  --ema-decay D trains with a weight average (train-gsnet --ema-decay) and adds its rows (gsnet_<net>_ema);
  --tta-views V adds every net's features averaged over V turned / mirrored copies of the inputs (..._tta<V>).
  A dataset made with a noisy teacher (make-dataset --synthetic-label-noise / --synthetic-miss-rate) trains and
  scores every method with that teacher; its rows add "backproject_exact": back-projection of the exact
  synthetic teacher on the same Gaussians (its cache written under <work>/exact_teacher), for reference.

    python benchmarks/bench_gsnet_generalization.py --dataset data/rooms --fits plain depth \\
        --gsnet-steps 150 --table-steps 150 --finetune-steps 30 --out benchmarks/results/gsnet_generalization_cpu.json

Everything runs on this process's device (CPU here); one torch thread per process is not forced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qrender_ns.workflows.make_dataset import dataset_scenes  # noqa: E402
from qrender_ns.eval import to_world  # noqa: E402
from qrender_ns.eval.scannet3d import scannet_metrics_of_features  # noqa: E402
from qrender_ns.gsnet.augment import predict_with_tta, tta_transforms  # noqa: E402
from qrender_ns.workflows.backproject import backproject_scene  # noqa: E402
from qrender_ns.workflows.gsnet_finetune import fit_feature_table, finetune_gsnet  # noqa: E402
from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig  # noqa: E402
from qrender_ns.workflows.gsnet_scenes import load_scene  # noqa: E402
from qrender_ns.workflows.train_gsnet import TrainGSNet, ema_path_of, train_gsnet  # noqa: E402
from qrender_ns.teachers.text import load_text_encoder  # noqa: E402


def world_frame(scene_root: Path):
    """(transform, scale) of the dataparser the fit used: its Gaussians live in that frame."""
    from qrender_ns.data.dataparser import QSplatDataParserConfig

    outputs = QSplatDataParserConfig(data=scene_root).setup().get_dataparser_outputs("train")
    return outputs.dataparser_transform.numpy().astype(np.float64), float(outputs.dataparser_scale)


def score(scene, features, transform, scale, encoder) -> dict:
    g = scene.gaussians
    means = to_world(g.means.detach().cpu().numpy(), transform, scale)
    return scannet_metrics_of_features(scene.root, means, g.opacities, features, encoder, classes="19")


def exact_teacher_scene(scene, work: Path):
    """The scene with an exact synthetic teacher (no label noise, no missed masks) in place of its noisy one;
    None when its teacher is already exact."""
    import dataclasses

    from qrender_ns.teachers.synthetic import SyntheticTeacher

    info = scene.teacher.teacher_info
    if info.get("name") != "synthetic" or not (info.get("label_noise") or info.get("miss_rate")):
        return None
    teacher = SyntheticTeacher(scene.root, noise=info["noise"], cache_root=work / "exact_teacher" / scene.name)
    teacher.run(image_keys=scene.train.image_keys, progress=False)
    return dataclasses.replace(scene, teacher_root=teacher.cache_root)


def extra_train_scenes(args, kind: str) -> tuple:
    """Every scene of each --extra-train-datasets folder (their val splits too: none of them is scored)."""
    return tuple(spec for extra in args.extra_train_datasets for split in ("train", "val")
                 for spec in dataset_scenes(extra, split, kind))


def train_net(args, kind: str, num_quantiles, work: Path, train_scenes=None) -> tuple:
    """GS-Net over the dataset's train split, or over its first `train_scenes` rooms (a data-scaling row)."""
    rooms = "" if train_scenes is None else f"_{train_scenes}rooms"
    out = work / f"gsnet_{kind}_{'dense' if num_quantiles is None else f'k{num_quantiles}'}{rooms}.ckpt"
    scenes, dataset = extra_train_scenes(args, kind), args.dataset
    if train_scenes is not None:
        train = dataset_scenes(args.dataset, "train", kind)
        if not 0 < train_scenes <= len(train):
            raise SystemExit(f"--train-scenes {train_scenes}: the train split of {args.dataset} has {len(train)} scenes")
        scenes, dataset = tuple(train[:train_scenes]), None
    cfg = TrainGSNet(scenes=scenes, dataset=dataset, fit=kind, out=out, steps=args.gsnet_steps,
                     scenes_per_step=args.scenes_per_step, views_per_scene=4, num_quantiles=num_quantiles,
                     lr=args.lr, ema_decay=args.ema_decay, plateau_patience=3, save_every=25, seed=args.seed,
                     eval_val=False,
                     progress=False, tensorboard=True, gsnet=GSNetConfig())
    summary = train_gsnet(cfg)
    net = GSNet.from_checkpoint(out).eval()
    # seconds_total: training time over all the runs that made this checkpoint (it may have been resumed, or
    # trained beforehand with the same `qsplat train-gsnet` settings), evaluations excluded
    num_train = len(scenes) if train_scenes is not None else len(scenes) + len(dataset_scenes(args.dataset, "train", kind))
    info = {"checkpoint": str(out), "train_scenes": num_train, "steps": summary["steps"], "loss": summary["loss"],
            "train_seconds": summary["seconds_total"], "num_quantiles": num_quantiles, "augment": asdict(cfg.augment)}
    if args.ema_decay <= 0:
        return [("", net, info)]
    ema = GSNet.from_checkpoint(ema_path_of(out)).eval()
    return [("", net, info), ("_ema", ema, {**info, "checkpoint": str(ema_path_of(out)), "ema_decay": args.ema_decay})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--fits", nargs="+", default=["plain", "depth"])
    parser.add_argument("--gsnet-steps", type=int, default=150)
    parser.add_argument("--scenes-per-step", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--table-steps", type=int, default=150)
    parser.add_argument("--table-lr", type=float, default=0.05)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-blending GS-Net (V-Render) row")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="only the GS-Net rows (e.g. a longer GS-Net run: re-running with more --gsnet-steps "
                             "resumes the checkpoints in --work)")
    parser.add_argument("--baselines-only", action="store_true",
                        help="only the per-scene table and back-projection rows (e.g. while GS-Net trains elsewhere)")
    parser.add_argument("--train-scenes", type=int, nargs="+", default=[],
                        help="also GS-Net (K=10) trained on only the first N train rooms, for each N: rows "
                             "gsnet_k10_<N>rooms (how feed-forward mIoU grows with the number of training rooms)")
    parser.add_argument("--extra-train-datasets", type=Path, nargs="+", default=[],
                        help="more `qsplat make-dataset` folders (other --seed) whose scenes all join GS-Net's "
                             "training set; only --dataset's val split is scored")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="train GS-Net with this weight-average decay (train-gsnet --ema-decay) and score the average too")
    parser.add_argument("--tta-views", type=int, default=1,
                        help="also score every net averaged over this many test-time views (1: none; else even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="GS-Net checkpoints (default: <dataset>/bench)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gsnet_generalization_cpu.json"))
    args = parser.parse_args()
    tta_transforms(args.tta_views)  # fails early on a bad count
    work = args.work or args.dataset / "bench"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"benchmark": "gsnet_generalization", "dataset": str(args.dataset), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "protocol": "ScanNet-19 (OpenGaussian's list), kNN-5 transfer within 0.1 m, opacity >= 0.1",
              "fits": {}}
    previous_fits = {}
    if args.out.is_file():  # one fit kind per run is fine: the others' results are kept
        previous_fits = json.loads(args.out.read_text()).get("fits", {})
        result["fits"] = {k: v for k, v in previous_fits.items() if k not in args.fits}
    for kind in args.fits:
        # Rows of methods this run does not compute (--skip-baselines / --baselines-only) are kept from the previous
        # JSON for the same room with the same fitted Gaussians (same count: a re-made dataset's fits differ).
        previous_rows = {(r["scene"], r["gaussians"]): r for r in previous_fits.get(kind, {}).get("val_scenes", [])}
        nets = {}  # name -> (net, info); "k10" is the one fine-tuned
        if not args.baselines_only:
            trained = [("k10", train_net(args, kind, 10, work))]
            if kind == "plain" and not args.no_dense:
                trained.append(("dense", train_net(args, kind, None, work)))
            for count in args.train_scenes:
                trained.append((f"k10_{count}rooms", train_net(args, kind, 10, work, train_scenes=count)))
            nets = {name + suffix: (net, info) for name, variants in trained for suffix, net, info in variants}
        rows, teacher = [], None
        for spec in dataset_scenes(args.dataset, "val", kind):
            scene = load_scene(spec, with_eval=False)
            teacher = {k: v for k, v in scene.teacher.teacher_info.items() if k != "ground_truth_sha256"}
            transform, scale = world_frame(scene.root)
            encoder = load_text_encoder(scene.teacher_root)
            row = {"scene": scene.name, "gaussians": scene.gaussians.num}
            t0 = time.perf_counter()
            if not args.skip_baselines:
                feats, stats = fit_feature_table(scene, args.table_steps, lr=args.table_lr, seed=args.seed)
                row["table"] = {**score(scene, feats, transform, scale, encoder), "seconds": time.perf_counter() - t0,
                                "steps": args.table_steps, "last_loss": stats["last_loss"]}
                t0 = time.perf_counter()
                feats, _ = backproject_scene(scene, num_quantiles=10)
                row["backproject"] = {**score(scene, feats, transform, scale, encoder),
                                      "seconds": time.perf_counter() - t0}
                exact = exact_teacher_scene(scene, work)
                if exact is not None:
                    t0 = time.perf_counter()
                    feats, _ = backproject_scene(exact, num_quantiles=10)
                    row["backproject_exact"] = {**score(exact, feats, transform, scale, encoder),
                                                "seconds": time.perf_counter() - t0}
            for name, (net, _) in nets.items():
                for views in sorted({1, args.tta_views}):
                    t0 = time.perf_counter()
                    feats = predict_with_tta(net, scene.gaussians.gsnet_inputs(), scene.units_per_metre, views)
                    seconds = time.perf_counter() - t0
                    key = f"gsnet_{name}" + (f"_tta{views}" if views > 1 else "")
                    row[key] = {**score(scene, feats, transform, scale, encoder), "seconds": seconds}
            if "k10" in nets:
                t0 = time.perf_counter()
                feats, stats = finetune_gsnet(nets["k10"][0], scene, args.finetune_steps, seed=args.seed)
                row["gsnet_k10_finetune"] = {**score(scene, feats, transform, scale, encoder),
                                             "seconds": time.perf_counter() - t0 + row["gsnet_k10"]["seconds"],
                                             "steps": args.finetune_steps}
            for method, value in previous_rows.get((row["scene"], row["gaussians"]), {}).items():
                row.setdefault(method, value)
            print(f"[bench] {kind} {scene.name}: " + ", ".join(
                f"{k} {v['miou']:.3f}" for k, v in row.items() if isinstance(v, dict)), flush=True)
            rows.append(row)
        methods = [k for k, v in rows[0].items() if isinstance(v, dict) and all(k in r for r in rows)] if rows else []
        mean = {m: {key: float(np.nanmean([r[m][key] for r in rows])) for key in ("miou", "macc", "seconds")}
                for m in methods}
        gsnet_info = {k: v[1] for k, v in nets.items()}
        result["fits"][kind] = {"gsnet": gsnet_info, "val_scenes": rows, "mean": mean,
                                "num_val_scenes": len(rows), "teacher": teacher}
    result["seconds_this_run"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    for kind, r in result["fits"].items():
        print(f"\n{kind} fits, {r['num_val_scenes']} held-out rooms:")
        for m, v in r["mean"].items():
            print(f"  {m:20s} mIoU {v['miou']:.3f}  mAcc {v['macc']:.3f}  {v['seconds']:.2f} s/scene")
    print(f"wrote {args.out} ({result['seconds_this_run']:.0f} s)")


if __name__ == "__main__":
    main()
