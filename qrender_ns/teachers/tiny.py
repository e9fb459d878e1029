"""Tiny randomly initialised Grounded-SAM2 / SAM2 + CLIP models (`--teacher-weights random-tiny`).

They run the real teachers' code (GroundingDINO via transformers, SAM2 and its automatic mask generator,
open_clip) end to end on any scene without a single downloaded weight, in seconds per image on a CPU: a smoke
test of a capture, of the install and of the cache plumbing. Their masks and embeddings mean nothing, and text queries against a
cache they made are refused unless that is acknowledged (the model allows it for caches they made).

The GroundingDINO (Swin + BERT, a few hundred thousand parameters, its own word-piece vocabulary) is built
once, seeded, into `$QSPLAT_CACHE/tiny-grounding-dino-v1` (default ~/.cache/qsplat), atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from qrender_ns.teachers.automatic import Sam2AutoClipConfig
from qrender_ns.teachers.masks import GroundedSam2ClipConfig

TINY_CLIP_NAME = "qsplat-tiny-random-clip"
TINY_CLIP = {"embed_dim": 512,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "chair", "table", "sofa", "lamp", "wall", "floor"]
_DETECTOR_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("QSPLAT_CACHE", Path.home() / ".cache" / "qsplat"))


def make_tiny_grounding_dino(folder: Path) -> Path:
    """A random GroundingDINO with a processor, saved like a hub snapshot (config.json, model.safetensors,
    tokenizer and processor files)."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=8, max_text_len=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_grounding_dino() -> Path:
    """The shared tiny detector folder, built on first use (into a temporary folder, then renamed)."""
    folder = cache_dir() / f"tiny-grounding-dino-v{_DETECTOR_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        make_tiny_grounding_dino(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def tiny_teacher_config(prompts: Sequence[str], device: str = "cpu", batch_size: int = 32, **overrides):
    """GroundedSam2ClipConfig of the tiny random models (every box kept: thresholds 0)."""
    settings = dict(prompts=tuple(prompts), clip_model=TINY_CLIP_NAME, clip_model_cfg=TINY_CLIP,
                    sam2_config="sam2.1_hiera_t", sam2_overrides=("++model.image_size=256",),
                    detector=str(tiny_grounding_dino()), box_threshold=0.0, text_threshold=0.0, min_mask_pixels=4,
                    random_init=True, device=device, batch_size=batch_size)
    settings.update(overrides)
    return GroundedSam2ClipConfig(**settings)


def tiny_auto_config(device: str = "cpu", batch_size: int = 32, mask_level: str = "large", **overrides):
    """Sam2AutoClipConfig of the tiny random models: SAM2 hiera-t at 256 px on a 4 x 4 point grid, every mask kept
    (no IoU / stability threshold, no box NMS: a random SAM2's masks are near-duplicates, which NMS would reduce to
    one per image and leave the contrastive loss without negatives; no small-region removal)."""
    settings = dict(clip_model=TINY_CLIP_NAME, clip_model_cfg=TINY_CLIP, sam2_config="sam2.1_hiera_t",
                    sam2_overrides=("++model.image_size=256",), mask_level=mask_level, points_per_side=4,
                    pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_region_area=0,
                    min_mask_pixels=4,
                    random_init=True, device=device, batch_size=batch_size)
    settings.update(overrides)
    return Sam2AutoClipConfig(**settings)
