"""Throughput of the grounded-sam2-clip teacher (GroundingDINO -> SAM2 -> open_clip) on randomly initialised
models: images/s and seconds per stage. Writes benchmarks/results/teachers_<device>.json:

    python benchmarks/bench_teachers.py                          # tiny configs (the tests' models)
    python benchmarks/bench_teachers.py --configs tiny full      # + the real architectures, random weights

tiny: a 1-layer open_clip, SAM2 hiera-t at 256 px, a 0.4 M-parameter GroundingDINO (as in
tests/test_teachers_real.py) -- measures the pipeline's own overhead. full: ViT-B-16, SAM2 `--sam2-config`
(hiera-t by default) at 1024 px and GroundingDINO-T's architecture (Swin-T + BERT-base) with random weights:
the compute of the real teacher (weights do not change the cost; the box count is fixed by taking the
`--boxes` best boxes at threshold 0). Images: a generated scene at --width x --height.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qrender_ns.data import scene_generator as sg  # noqa: E402
from qrender_ns.teachers import masks as qmasks  # noqa: E402
from test_teachers_real import TINY_CLIP, VOCAB, make_tiny_grounding_dino  # noqa: E402


def make_full_grounding_dino(folder: Path) -> Path:
    """GroundingDINO-T's architecture (transformers defaults: Swin-T, BERT-base text) with random weights."""
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # ids < BERT's 30522: fine for timing
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                           tokenizer=BertTokenizer(str(folder / "vocab.txt"))).save_pretrained(folder)
    return folder


def timed_stages(teacher: qmasks.GroundedSam2ClipTeacher, timings: dict) -> None:
    """Wrap the three models' entry points to accumulate their wall time."""
    for owner, name, stage in ((teacher.detector, "detect", "detect_s"),
                               (teacher.segmenter, "masks_for_boxes", "sam2_s"),
                               (teacher.clip, "encode_images", "clip_s")):
        inner = getattr(owner, name)

        def wrapper(*args, _inner=inner, _stage=stage, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                timings[_stage] += time.perf_counter() - start

        setattr(owner, name, wrapper)


def run_config(kind: str, args, scene_root: Path, workdir: Path) -> dict:
    prompts = tuple(args.prompts.split(","))
    if kind == "tiny":
        detector = make_tiny_grounding_dino(workdir / "gd-tiny")
        config = qmasks.GroundedSam2ClipConfig(
            prompts=prompts, clip_model="qsplat-test-tiny-clip", clip_model_cfg=TINY_CLIP, sam2_config="sam2.1_hiera_t",
            sam2_overrides=("++model.image_size=256",), detector=str(detector), box_threshold=0.0, text_threshold=0.0,
            max_boxes=args.boxes, random_init=True, device=args.device, batch_size=args.batch_size)
    else:
        detector = make_full_grounding_dino(workdir / "gd-full")
        config = qmasks.GroundedSam2ClipConfig(
            prompts=prompts, clip_model="ViT-B-16", sam2_config=args.sam2_config, detector=str(detector),
            box_threshold=0.0, text_threshold=0.0, max_boxes=args.boxes, random_init=True, device=args.device,
            batch_size=args.batch_size)
    teacher = qmasks.GroundedSam2ClipTeacher(scene_root, config, image_keys=None)
    keys = teacher.image_keys[: args.images + 1]
    start = time.perf_counter()
    _ = teacher.clip, teacher.detector, teacher.segmenter
    load_s = time.perf_counter() - start

    images = [qmasks.load_rgb(scene_root / k) for k in keys]
    teacher.compute_image(images[0])  # warm-up, not timed
    timings = defaultdict(float)
    timed_stages(teacher, timings)
    masks = 0
    start = time.perf_counter()
    for image in images[1:]:
        _, embeddings = teacher.compute_image(image)
        masks += int(embeddings.shape[0])
    total = time.perf_counter() - start
    n = len(images) - 1
    params = {"clip": sum(p.numel() for p in teacher.clip.model.parameters()),
              "sam2": sum(p.numel() for p in teacher.segmenter.model.parameters()),
              "detector": sum(p.numel() for p in teacher.detector.model.parameters())}
    return {"config": kind, "clip_model": config.clip_model, "sam2_config": config.sam2_config,
            "sam2_image_size": int(teacher.segmenter.model.image_size), "detector": "tiny" if kind == "tiny" else
            "GroundingDINO-T architecture", "parameters": params, "images": n, "masks_per_image": masks / n,
            "model_load_s": load_s, "images_per_s": n / total, "s_per_image": total / n,
            **{k: v / n for k, v in sorted(timings.items())},
            "other_s": (total - sum(timings.values())) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=["tiny", "full"])
    parser.add_argument("--images", type=int, default=4, help="timed images (after one warm-up image)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--boxes", type=int, default=16, help="boxes (masks) per image")
    parser.add_argument("--prompts", default="chair,table,sofa,bed,lamp,plant,box,wall,floor")
    parser.add_argument("--sam2-config", default="sam2.1_hiera_t", help="full config only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"teachers_{device.type}.json"

    load_at_start = [round(x, 2) for x in __import__("os").getloadavg()]  # other jobs sharing the CPU
    results = []
    with tempfile.TemporaryDirectory(prefix="qsplat-bench-teachers-") as tmp:
        workdir = Path(tmp)
        scene = sg.generate_scene(workdir / "scene", seed=2, num_images=args.images + 2, width=args.width,
                                  height=args.height, num_eval=1, num_points=2000)
        for kind in args.configs:
            print(f"[bench] {kind} ...", flush=True)
            result = run_config(kind, args, scene.root, workdir)
            results.append(result)
            print(f"[bench] {kind}: {result['images_per_s']:.3f} images/s ({result['s_per_image']:.2f} s/image: "
                  f"detect {result.get('detect_s', 0):.2f}, sam2 {result.get('sam2_s', 0):.2f}, "
                  f"clip {result.get('clip_s', 0):.2f}; {result['masks_per_image']:.1f} masks), "
                  f"models loaded in {result['model_load_s']:.1f} s", flush=True)

    import importlib.metadata
    import os

    import open_clip
    import transformers

    meta = {"device": device.type, "width": args.width, "height": args.height, "boxes_per_image": args.boxes,
            "num_prompts": len(args.prompts.split(",")), "batch_size": args.batch_size, "torch": torch.__version__,
            "open_clip": open_clip.__version__, "transformers": transformers.__version__,
            "sam2": importlib.metadata.version("sam2"), "threads": torch.get_num_threads(), "cpu": platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights": "random (architecture cost only)", "timing": "wall time over --images images after one warm-up",
            "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
