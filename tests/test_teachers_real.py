"""The real teachers, offline: grounded-sam2-clip (GroundingDINO + SAM2 + open_clip) and the prompt-free
sam2-auto-clip (SAM2's automatic masks + open_clip).

Without weights everything runs on randomly initialised small models: a tiny open_clip architecture (with
open_clip's shipped BPE tokenizer), SAM2's tiny config with no checkpoint (input shrunk to 256 px), and a tiny
GroundingDINO built here with its own word-piece vocabulary and saved as a local transformers folder. Their
outputs mean nothing; what is tested is the plumbing: cache format, manifest, resume, invalidation, errors.
Tests marked `weights` need real checkpoints under $QSPLAT_WEIGHTS_DIR (see docs/teachers.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed (the `teachers` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `teachers` extra)")
pytest.importorskip("sam2", reason="sam2 is not installed (the `teachers` extra)")

from qrender_ns.data import scene_generator as sg  # noqa: E402
from qrender_ns.teachers import automatic as qauto  # noqa: E402
from qrender_ns.teachers import clip as qclip  # noqa: E402
from qrender_ns.teachers import masks as qmasks  # noqa: E402
from qrender_ns.teachers.cache import TeacherCache  # noqa: E402
from qrender_ns.workflows.extract_features import ExtractFeatures  # noqa: E402
from qrender_ns.teachers.text import load_text_encoder  # noqa: E402

from qrender_ns.teachers import tiny as qtiny  # noqa: E402

WIDTH, HEIGHT = 64, 48
TINY_CLIP = qtiny.TINY_CLIP


def make_tiny_grounding_dino(folder: Path) -> Path:
    return qtiny.make_tiny_grounding_dino(folder)


def tiny_config(detector: Path, prompts=("chair", "table"), **overrides) -> qmasks.GroundedSam2ClipConfig:
    settings = dict(prompts=tuple(prompts), clip_model="qsplat-test-tiny-clip", clip_model_cfg=TINY_CLIP,
                    sam2_config="sam2.1_hiera_t", sam2_overrides=("++model.image_size=256",), detector=str(detector),
                    box_threshold=0.0, text_threshold=0.0, min_mask_pixels=4, random_init=True, device="cpu")
    settings.update(overrides)
    return qmasks.GroundedSam2ClipConfig(**settings)


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return make_tiny_grounding_dino(tmp_path_factory.mktemp("weights") / "tiny-grounding-dino")


def _scene(root: Path, layout="scannet"):
    return sg.generate_scene(root / "scene", layout=layout, seed=0, num_images=3, width=WIDTH, height=HEIGHT,
                             num_eval=1, num_points=2000)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, detector):
    """A 3-image generated scene (2 training images) with a filled grounded-sam2-clip cache."""
    info = _scene(tmp_path_factory.mktemp("extracted"))
    teacher = qmasks.GroundedSam2ClipTeacher(info.root, tiny_config(detector))
    stats = teacher.run(progress=False)
    return info, teacher, stats


# --- the whole extraction ------------------------------------------------------------------------------


def test_extraction_writes_a_valid_cache(extracted):
    info, teacher, stats = extracted
    assert teacher.image_keys == ["color/0.jpg", "color/2.jpg"]  # the dataparser's train split
    assert stats.written == 2 and stats.skipped == 0

    cache = TeacherCache(teacher.cache_root)
    cache.validate(teacher.image_keys, sizes=[(HEIGHT, WIDTH)] * 2)
    assert cache.feature_dim == 512 and cache.class_names == ["chair", "table"]
    assert cache.teacher_name == "grounded-sam2-clip"
    for key in teacher.image_keys:
        mask_ids, embeddings = cache.read(key)
        num_masks = embeddings.shape[0]
        assert mask_ids.shape == (HEIGHT, WIDTH) and num_masks >= 1
        assert set(np.unique(mask_ids.numpy())) <= set(range(-1, num_masks))
        assert set(range(num_masks)) <= set(np.unique(mask_ids.numpy()))  # every kept mask is visible
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(num_masks), atol=1e-5)
        assert int(np.bincount(mask_ids.numpy()[mask_ids.numpy() >= 0]).min()) >= 4  # min_mask_pixels

    info_ = cache.teacher_info
    assert info_["prompts"] == ["chair", "table"] and info_["version"] == qmasks.VERSION
    assert info_["clip"]["random_init"] is True and info_["clip"]["model"] == "qsplat-test-tiny-clip"
    assert info_["sam2"] == {"config": "sam2.1_hiera_t", "overrides": ["++model.image_size=256"],
                             "random_init": True, "seed": 0}
    weights = (Path(teacher.detector_path) / "model.safetensors")
    assert info_["detector"]["weights_sha256"] == qclip.file_sha256(weights)
    sidecar = json.loads((teacher.cache_root / "weights.json").read_text())
    assert Path(sidecar["detector"]) == Path(teacher.detector_path).resolve()


def test_text_encoder_of_a_clip_cache(extracted):
    _, teacher, _ = extracted
    with pytest.raises(ValueError, match="randomly initialised CLIP"):
        load_text_encoder(teacher.cache_root)  # never silently random
    encoder = load_text_encoder(teacher.cache_root / "manifest.json", allow_random_init=True)
    assert isinstance(encoder, qclip.ClipTextEncoder)
    assert encoder.name == "grounded-sam2-clip" and encoder.dim == 512
    vectors = encoder.encode(["chair", "table"])
    assert vectors.shape == (2, 512) and torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    # the same (seeded) CLIP as the teacher's: identical text embeddings
    assert torch.allclose(vectors, teacher.clip.encode_text(["chair", "table"]), atol=1e-6)
    assert encoder.encode([]).shape == (0, 512)


def test_resume_and_invalidation(extracted, tmp_path, detector, monkeypatch):
    info, teacher, _ = extracted
    # Everything current: nothing is recomputed and no model is even loaded.
    again = qmasks.GroundedSam2ClipTeacher(info.root, tiny_config(detector))
    stats = again.run(progress=False)
    assert (stats.written, stats.skipped) == (0, 2)
    assert again._segmenter is None and again._detector is None and again._clip is None

    # A fresh scene; the run is killed after the first image; the next run does only the second one.
    scene = _scene(tmp_path)
    first = qmasks.GroundedSam2ClipTeacher(scene.root, tiny_config(detector))
    real_compute, calls = first.compute_served, []

    def compute_then_crash(key, image):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(key)
        return real_compute(key, image)

    monkeypatch.setattr(first, "compute_served", compute_then_crash)
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)
    assert TeacherCache(first.cache_root).keys() == ["color/0.jpg"]
    resumed = qmasks.GroundedSam2ClipTeacher(scene.root, tiny_config(detector)).run(progress=False)
    assert (resumed.written, resumed.skipped) == (1, 1)

    # Other prompts (or any other setting recorded in the manifest): every image is redone.
    before = TeacherCache(first.cache_root).entry("color/0.jpg")["file"]
    changed = qmasks.GroundedSam2ClipTeacher(scene.root, tiny_config(detector, prompts=("sofa", "lamp")))
    with pytest.raises(ValueError, match="other settings"):  # never replaced silently ...
        changed.run(progress=False)
    stats = changed.run(overwrite=True, progress=False)  # ... only on request
    assert (stats.written, stats.skipped) == (2, 0)
    cache = TeacherCache(first.cache_root)
    assert cache.class_names == ["sofa", "lamp"] and cache.entry("color/0.jpg")["file"] != before
    threshold = qmasks.GroundedSam2ClipTeacher(scene.root, tiny_config(detector, prompts=("sofa", "lamp"),
                                                                       min_mask_pixels=5))
    assert threshold.run(overwrite=True, progress=False).written == 2


def test_automatic_masks_fill_unprompted_regions(extracted, detector):
    info, _, _ = extracted
    config = tiny_config(detector, automatic_masks=True, auto_points_per_side=4, auto_pred_iou_thresh=0.0,
                         auto_stability_score_thresh=0.0, auto_min_new_fraction=0.0)
    teacher = qmasks.GroundedSam2ClipTeacher(info.root, config, image_keys=["color/0.jpg"])
    assert teacher.teacher_info["automatic_masks"]["points_per_side"] == 4
    image = qmasks.load_rgb(info.root / "color/0.jpg")
    automatic = teacher.segmenter.automatic_masks(image)
    assert automatic.ndim == 3 and automatic.shape[1:] == (HEIGHT, WIDTH) and automatic.dtype == bool
    prompted_only = qmasks.GroundedSam2ClipTeacher(info.root, tiny_config(detector), image_keys=["color/0.jpg"])
    prompted = prompted_only.masks(image)
    candidates = teacher.masks(image)  # unprompted masks first (painted under the prompted ones)
    assert len(candidates) == len(prompted) + len([m for m in automatic if m.any()])
    assert all(np.array_equal(a, b) for a, b in zip(candidates[-len(prompted):], prompted))


def test_image_keys_come_from_the_dataparser_for_both_layouts(tmp_path):
    scene = _scene(tmp_path, layout="nerfstudio")
    keys = qmasks.scene_image_keys(scene.root)
    assert len(keys) == 2 and all(k.startswith("images/frame_") for k in keys)
    assert all((scene.root / k).is_file() for k in keys)
    assert len(qmasks.scene_image_keys(scene.root, splits=("train", "val"))) == 3


# --- the pieces ------------------------------------------------------------------------------------------


def test_compose_mask_ids_paints_in_order_and_drops_hidden_masks():
    big = np.zeros((6, 8), bool)
    big[:, :6] = True
    small = np.zeros((6, 8), bool)
    small[1:3, 1:3] = True
    hidden = np.zeros((6, 8), bool)
    hidden[1:2, 1:2] = True  # entirely under `small`, painted after it
    ids, kept = qmasks.compose_mask_ids([big, hidden, small], min_pixels=1)
    assert kept == [0, 2]
    assert (ids[small] == 1).all() and (ids[big & ~small] == 0).all() and (ids[:, 6:] == -1).all()
    ids, kept = qmasks.compose_mask_ids([big, small], min_pixels=5)  # small has 4 visible pixels
    assert kept == [0] and (ids[small] == 0).all() and ids.dtype == np.int32  # big shows through


def test_mask_crop_blanks_the_background_and_pads():
    image = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    mask[5, 5] = False
    crop = qmasks.mask_crop(image, mask, padding=0.1)
    assert crop.shape == (12, 12, 3)  # the 10 x 10 box grown by 1 px (10 %) per side
    assert (crop[1:11, 1:11][mask[5:15, 5:15]] == 200).all() and (crop[1, 1] == 0).all()
    assert (crop[0] == 0).all() and (crop[:, -1] == 0).all()


def test_clean_boxes_clips_dedups_and_caps():
    boxes = np.array([[-5, -5, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [5, 5, 6, 30], [40, 0, 80, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6], np.float32)
    out = qmasks.clean_boxes(boxes, scores, width=50, height=40, nms_iou=0.7, max_boxes=2)
    assert out.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]  # thin box dropped, duplicate suppressed, capped
    assert qmasks.clean_boxes(np.zeros((0, 4)), np.zeros(0), 50, 40, 0.7, 5).shape == (0, 4)


def test_prompts_parsing_and_chunking(tmp_path, detector):
    path = tmp_path / "prompts.txt"
    path.write_text("# ScanNet classes\nchair\ntable, sofa\n\nchair  # again\n")
    from qrender_ns.teachers.settings import parse_prompts

    assert parse_prompts("lamp, chair", path) == ["lamp", "chair", "table", "sofa"]
    with pytest.raises(ValueError, match="at least one prompt"):
        qmasks.GroundedSam2ClipConfig(prompts=(" ",))
    gd = qmasks.GroundingDinoDetector(detector, torch.device("cpu"))
    assert gd.prompt_chunks(["chair", "Table"]) == ["chair. table."]
    chunks = gd.prompt_chunks(["chair"] * 20)  # 40 tokens > the tiny model's 32-token window
    assert len(chunks) == 2 and " ".join(chunks) == " ".join(["chair."] * 20)


def test_clip_loader_checkpoints_and_hashes(tmp_path, monkeypatch):
    random_clip = qclip.load_clip("qsplat-test-tiny-clip", None, random_init=True, model_cfg=TINY_CLIP)
    assert random_clip.info["random_init"] and random_clip.dim == 512
    with pytest.raises(ValueError, match="pretrained tag or a checkpoint"):
        qclip.load_clip("qsplat-test-tiny-clip", None, model_cfg=TINY_CLIP)  # never silently random

    path = tmp_path / "tiny.pt"
    torch.save(random_clip.model.state_dict(), path)
    loaded = qclip.load_clip("qsplat-test-tiny-clip", None, path, model_cfg=TINY_CLIP)
    assert loaded.info["checkpoint_sha256"] == qclip.file_sha256(path) and loaded.checkpoint == path
    texts = ["a chair", "a table"]
    assert torch.allclose(loaded.encode_text(texts), random_clip.encode_text(texts), atol=1e-6)
    crops = [np.full((10, 6, 3), 90, np.uint8), np.zeros((3, 30, 3), np.uint8)]
    images = loaded.encode_images(crops, batch_size=1)
    assert images.shape == (2, 512) and torch.allclose(images, random_clip.encode_images(crops), atol=1e-5)

    same = qclip.load_clip_from_info(loaded.info, path)
    assert same.info == loaded.info
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in random_clip.model.state_dict().items()}, other)
    with pytest.raises(ValueError, match="not the one the teacher cache was made with"):
        qclip.load_clip_from_info(loaded.info, other)

    # ViT-B-16 / laion2b_s34b_b88k under $QSPLAT_WEIGHTS_DIR/<hf repo>/ (resolved only: no real weights here)
    repo = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    fake = tmp_path / "weights" / repo / "open_clip_pytorch_model.bin"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not really weights")
    monkeypatch.setenv("QSPLAT_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert qclip.resolve_clip_checkpoint("ViT-B-16", "laion2b_s34b_b88k") == fake
    assert qclip.resolve_clip_checkpoint("ViT-B-16", "laion2b_s34b_b88k", fake.parent) == fake


def test_missing_checkpoints_give_clear_errors(tmp_path, monkeypatch, detector):
    monkeypatch.setenv("QSPLAT_WEIGHTS_DIR", str(tmp_path / "empty"))
    repo = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    with pytest.raises(qclip.MissingWeightsError) as err:
        qclip.load_clip("ViT-B-16", "laion2b_s34b_b88k")
    message = str(err.value)
    assert str(tmp_path / "empty" / repo / "open_clip_pytorch_model.bin") in message
    assert f"hf download {repo} open_clip_pytorch_model.bin" in message and "never downloads" in message
    assert f"models--{repo.replace('/', '--')}" in message  # the HF cache path it checked

    with pytest.raises(qclip.MissingWeightsError, match="sam2.1_hiera_tiny.pt") as err:
        qmasks.resolve_sam2_checkpoint("sam2.1_hiera_t")
    assert "hf download facebook/sam2.1-hiera-tiny sam2.1_hiera_tiny.pt" in str(err.value)
    assert "dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt" in str(err.value)
    with pytest.raises(qclip.MissingWeightsError, match="/nowhere/sam2.pt"):
        qmasks.resolve_sam2_checkpoint("sam2.1_hiera_l", "/nowhere/sam2.pt")
    with pytest.raises(qclip.MissingWeightsError, match="hf download IDEA-Research/grounding-dino-tiny"):
        qmasks.resolve_detector("IDEA-Research/grounding-dino-tiny")
    assert qmasks.resolve_detector(str(detector)) == detector

    # Through the command line: the teacher stops before any work with the same message.
    import tyro

    scene = _scene(tmp_path)
    command = tyro.cli(ExtractFeatures, args=["--data", str(scene.root), "--teacher", "grounded-sam2-clip",
                                              "--prompts", "chair,table", "--clip-checkpoint", str(tmp_path / "no.bin"),
                                              "--detector-checkpoint", str(detector), "--teacher-device", "cpu"])
    assert command.sam2_config is None and command.teacher_batch_size == 32
    with pytest.raises(SystemExit, match=f"No open_clip checkpoint.*{tmp_path / 'no.bin'}") as err:
        command.main()
    assert "\n" not in str(err.value)  # one sentence, in qsplat as in ns-train
    assert not (scene.root / "qsplat_teacher" / "grounded-sam2-clip").exists()

    # A checkpoint option without --teacher picks the real teacher (never a silent synthetic run) ...
    implicit = tyro.cli(ExtractFeatures, args=["--data", str(scene.root), "--clip-checkpoint", str(tmp_path / "no.bin"),
                                               "--sam2-checkpoint", str(tmp_path / "no.pt")])
    with pytest.raises(SystemExit, match="No open_clip checkpoint"):
        implicit.main()
    # ... and an option of the other teacher is an error, not ignored.
    with pytest.raises(SystemExit, match="--clip-checkpoint is not read by the synthetic teacher"):
        ExtractFeatures(data=scene.root, teacher="synthetic", clip_checkpoint=tmp_path / "no.bin").main()
    with pytest.raises(SystemExit, match="--synthetic-noise is not read by the grounded-sam2-clip teacher"):
        ExtractFeatures(data=scene.root, teacher="grounded-sam2-clip", synthetic_noise=0.1).main()
    assert not (scene.root / "qsplat_teacher").exists()


# --- ns-train q-splat from this cache --------------------------------------------------------------------


def test_ns_train_and_eval_from_a_grounded_sam2_clip_cache(tmp_path, detector):
    """The issue's end-to-end path with random weights: extract-features fills the cache, ns-train q-splat
    trains its features from it (loss finite and falling), ns-eval computes the feature metrics with the same
    CLIP's text encoder, which is refused unless random weights are explicitly allowed."""
    import subprocess
    import sys

    from test_method import make_config, train

    info = sg.generate_scene(tmp_path / "scene", layout="scannet", seed=2, num_images=6, width=WIDTH, height=HEIGHT,
                             num_eval=1, num_points=3000)
    start = time.perf_counter()
    qmasks.GroundedSam2ClipTeacher(info.root, tiny_config(detector, prompts=("chair", "table", "wall"))).run(
        progress=False)
    print(f"\n[teachers] extraction {time.perf_counter() - start:.1f} s")
    steps = 60
    config = make_config(info.root, tmp_path / "runs", steps=steps, allow_random_text_encoder=True)
    config.pipeline.datamanager.teacher = "grounded-sam2-clip"
    trainer, history = train(config, steps)
    print(f"[teachers] + training {time.perf_counter() - start:.1f} s")
    feat = [h["feature_loss"] for h in history if "feature_loss" in h]
    assert len(feat) >= steps - 15 and all(np.isfinite(feat))
    assert sum(feat[-10:]) / 10 < sum(feat[:10]) / 10, (feat[:10], feat[-10:])
    model = trainer.pipeline.model
    assert model.text_encoder.name == "grounded-sam2-clip"  # the teacher's own CLIP, not the synthetic one

    out = tmp_path / "metrics.json"
    result = subprocess.run([str(Path(sys.executable).parent / "ns-eval"), "--load-config",
                             str(config.get_base_dir() / "config.yml"), "--output-path", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(out.read_text())["results"]
    assert np.isfinite(metrics["feature_miou"]) and np.isfinite(metrics["psnr"])

    model._text_encoder, model.config.allow_random_text_encoder = None, False
    with pytest.raises(ValueError, match="allow-random-text-encoder"):
        model.text_encoder  # noqa: B018


# --- the prompt-free teacher: sam2-auto-clip -------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_extracted(tmp_path_factory):
    """The 3-image generated scene (2 training images) with a filled sam2-auto-clip cache (tiny random models)."""
    info = _scene(tmp_path_factory.mktemp("auto"))
    teacher = qauto.Sam2AutoClipTeacher(info.root, qtiny.tiny_auto_config())
    return info, teacher, teacher.run(progress=False)


def test_prompt_free_extraction_writes_a_valid_cache(auto_extracted, detector):
    info, teacher, stats = auto_extracted
    assert teacher.image_keys == ["color/0.jpg", "color/2.jpg"] and (stats.written, stats.skipped) == (2, 0)
    cache = TeacherCache(teacher.cache_root)
    assert teacher.cache_root == info.root / "qsplat_teacher" / "sam2-auto-clip"  # its own folder, the same format
    cache.validate(teacher.image_keys, sizes=[(HEIGHT, WIDTH)] * 2)
    assert cache.teacher_name == "sam2-auto-clip" and cache.feature_dim == 512
    assert cache.class_names == []  # no vocabulary before training
    for key in teacher.image_keys:
        mask_ids, embeddings = cache.read(key)
        num_masks = embeddings.shape[0]
        assert mask_ids.shape == (HEIGHT, WIDTH) and num_masks >= 2  # negatives for the contrastive loss
        assert set(np.unique(mask_ids.numpy())) <= set(range(-1, num_masks))
        assert set(range(num_masks)) <= set(np.unique(mask_ids.numpy()))
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(num_masks), atol=1e-5)
        assert int(np.bincount(mask_ids.numpy()[mask_ids.numpy() >= 0]).min()) >= 4
    info_ = cache.teacher_info
    assert info_["version"] == qauto.VERSION and "prompts" not in info_ and "detector" not in info_
    assert info_["clip"]["random_init"] is True and info_["sam2"]["random_init"] is True
    assert info_["automatic_masks"]["mask_level"] == "large" and info_["automatic_masks"]["points_per_side"] == 4
    sidecar = json.loads((teacher.cache_root / "weights.json").read_text())
    assert sidecar == {"clip_checkpoint": None, "sam2_checkpoint": None}

    # The text side: the teacher's own CLIP (refused while random unless allowed), as for grounded-sam2-clip.
    with pytest.raises(ValueError, match="randomly initialised CLIP"):
        load_text_encoder(teacher.cache_root)
    encoder = load_text_encoder(teacher.cache_root, allow_random_init=True)
    assert encoder.name == "sam2-auto-clip" and encoder.dim == 512
    assert torch.allclose(encoder.encode(["chair"]), teacher.clip.encode_text(["chair"]), atol=1e-6)

    # A grounded-sam2-clip cache of the same scene lives beside it: neither replaces the other.
    assert not (info.root / "qsplat_teacher" / "grounded-sam2-clip").exists()
    grounded = qmasks.GroundedSam2ClipTeacher(info.root, tiny_config(detector), image_keys=["color/0.jpg"])
    assert grounded.cache_root != teacher.cache_root


def test_prompt_free_resume_and_invalidation(auto_extracted):
    info, _, _ = auto_extracted
    again = qauto.Sam2AutoClipTeacher(info.root, qtiny.tiny_auto_config())
    assert (again.run(progress=False).written, again._segmenter, again._clip) == (0, None, None)  # nothing loaded
    other = qauto.Sam2AutoClipTeacher(info.root, qtiny.tiny_auto_config(mask_level="all"))
    with pytest.raises(ValueError, match=r"other settings \(differ: automatic_masks\)"):
        other.run(progress=False)  # another granularity is never mixed in silently ...
    assert other.run(overwrite=True, progress=False).written == 2  # ... only on request
    assert TeacherCache(other.cache_root).teacher_info["automatic_masks"]["mask_level"] == "all"
    with pytest.raises(ValueError, match="mask level must be one of small, medium, large, all"):
        qtiny.tiny_auto_config(mask_level="huge")


def test_one_granularity_is_the_area_rank_of_the_three_masks_per_point():
    """small / medium / large: per point the smallest / middle / largest of SAM2's three masks by area, whatever
    the order of SAM2's outputs; the predicted IoUs and low-res logits follow their mask."""
    from types import SimpleNamespace

    areas = [[9, 1, 4], [1, 4, 9]]  # per point, SAM2's three masks in output order
    masks = torch.full((2, 3, 3, 3), -1.0)
    for p, row in enumerate(areas):
        for k, area in enumerate(row):
            masks[p, k].view(-1)[:area] = 1.0
    ious = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    low_res = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)

    def predict(points, labels, multimask_output=True, return_logits=False):
        return (masks, ious, low_res) if multimask_output else (masks[:, :1], ious[:, :1], low_res[:, :1])

    for level, chosen in (("small", [1, 0]), ("medium", [2, 1]), ("large", [0, 2])):
        generator = SimpleNamespace(predictor=SimpleNamespace(_predict=predict), mask_threshold=0.0)
        qmasks.keep_one_granularity(generator, level)
        out_masks, out_ious, out_low = generator.predictor._predict(None, None, multimask_output=True,
                                                                     return_logits=True)
        assert out_masks.shape == (2, 1, 3, 3) and out_ious.shape == (2, 1) and out_low.shape == (2, 1, 2, 2)
        for p, k in enumerate(chosen):
            assert torch.equal(out_masks[p, 0], masks[p, k]) and out_ious[p, 0] == ious[p, k]
            assert torch.equal(out_low[p, 0], low_res[p, k])
        assert generator.predictor._predict(None, None, multimask_output=False)[0].shape[1] == 1
    with pytest.raises(ValueError, match="mask level"):
        qmasks.keep_one_granularity(SimpleNamespace(predictor=SimpleNamespace(_predict=predict), mask_threshold=0.0),
                                    "all")


def _real_capture_layout(root: Path) -> Path:
    """A generated nerfstudio-layout scene without gt/ and label/: to q-splat, a user's capture with no prompts."""
    import shutil

    info = sg.generate_scene(root, layout="nerfstudio", seed=3, num_images=6, width=WIDTH, height=HEIGHT,
                             num_eval=1, num_points=3000)
    shutil.rmtree(info.root / "gt")
    shutil.rmtree(info.root / "label", ignore_errors=True)
    return info.root


def test_ns_train_a_capture_without_prompts_trains_open_vocabulary_features(tmp_path):
    """`ns-train q-splat --data <capture>` with no prompts: teacher auto picks sam2-auto-clip, fills its cache (tiny
    random models: --pipeline.datamanager.teacher-weights random-tiny) and trains the features; a query then
    competes against the canonical negatives only (the run has no vocabulary)."""
    from test_method import make_config, train

    from qrender_ns.features.selection import SelectionRule, competitor_texts, select_by_rule

    scene = _real_capture_layout(tmp_path / "capture")
    steps = 40
    config = make_config(scene, tmp_path / "runs", steps=steps)
    config.pipeline.datamanager.teacher_weights = "random-tiny"
    start = time.perf_counter()
    trainer, history = train(config, steps)
    print(f"\n[teachers] sam2-auto-clip extraction + {steps} steps: {time.perf_counter() - start:.1f} s")
    cache = trainer.pipeline.datamanager.teacher_cache
    assert cache.teacher_name == "sam2-auto-clip" and cache.root == scene / "qsplat_teacher" / "sam2-auto-clip"
    feat = [h["feature_loss"] for h in history if "feature_loss" in h]
    assert len(feat) >= steps - 15 and all(np.isfinite(feat))
    model = trainer.pipeline.model
    assert model.class_names == [] and model.text_encoder.name == "sam2-auto-clip"
    assert competitor_texts("chair", model.class_names, model.config.relevancy_negatives) == list(
        model.config.relevancy_negatives)
    selected = select_by_rule(model, "chair", SelectionRule())
    assert selected.dtype == torch.bool and selected.shape == (model.gaussian_features.shape[0],)


def test_teacher_setup_errors_end_ns_train_with_one_line(tmp_path):
    """No weights on the machine: `ns-train q-splat --data <capture without prompts>` ends with one sentence (which
    teacher, what is missing, where it looked, the alternatives), no traceback; so does an explicit
    grounded-sam2-clip without prompts, in the datamanager's set-up."""
    import subprocess
    import sys

    from qrender_ns.data.dataparser import QSplatDataParserConfig
    from qrender_ns.method.datamanager import QSplatDataManagerConfig

    scene = _real_capture_layout(tmp_path / "capture")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    env = dict(os.environ, QSPLAT_WEIGHTS_DIR=str(empty), HF_HUB_CACHE=str(empty), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    result = subprocess.run([str(Path(sys.executable).parent / "ns-train"), "q-splat", "--data", str(scene),
                             "--output-dir", str(tmp_path / "runs"), "--machine.device-type", "cpu", "--vis",
                             "tensorboard", "--max-num-iterations", "5"],
                            capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if "[q-splat]" in line]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr[-3000:]
    line = lines[0]
    assert line.startswith("[q-splat] The sam2-auto-clip teacher (auto's choice for a real scene without prompts) "
                           "needs its weights on this machine: No open_clip checkpoint")
    assert str(empty / "laion") in line and "--pipeline.datamanager.clip-checkpoint PATH" in line
    assert "--pipeline.datamanager.teacher-weights random-tiny" in line and "--pipeline.datamanager.teacher none" in line
    assert not (scene / "qsplat_teacher").exists()

    config = QSplatDataManagerConfig(dataparser=QSplatDataParserConfig(data=scene), teacher="grounded-sam2-clip")
    with pytest.raises(SystemExit, match=r"^\[q-splat\] the grounded-sam2-clip teacher needs text prompts") as err:
        config.setup(device="cpu", test_mode="val")
    assert "\n" not in str(err.value) and "--pipeline.datamanager.prompts" in str(err.value)


# --- real weights ----------------------------------------------------------------------------------------

weights = pytest.mark.skipif(not os.environ.get("QSPLAT_WEIGHTS_DIR"), reason="QSPLAT_WEIGHTS_DIR is unset")


@pytest.mark.weights
@weights
def test_real_clip_matches_colours():
    clip = qclip.load_clip()  # ViT-B-16 / laion2b_s34b_b88k from $QSPLAT_WEIGHTS_DIR or the HF cache
    red, blue = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    scores = clip.encode_images([red, blue]) @ clip.encode_text(["a red square", "a blue square"]).T
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]


@pytest.mark.weights
@weights
def test_real_teacher_on_a_generated_scene(tmp_path):
    scene = _scene(tmp_path)
    command = ExtractFeatures(data=scene.root, teacher="grounded-sam2-clip", prompts="chair,table,sofa,wall,floor",
                              sam2_config=os.environ.get("QSPLAT_TEST_SAM2_CONFIG", "sam2.1_hiera_t"))
    command.main()
    root = scene.root / "qsplat_teacher" / "grounded-sam2-clip"
    cache = TeacherCache(root)
    cache.validate(qmasks.scene_image_keys(scene.root))
    assert not cache.teacher_info["clip"].get("random_init")
    encoder = load_text_encoder(root)
    assert encoder.encode(["chair"]).shape == (1, 512)
