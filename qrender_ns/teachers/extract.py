"""`qsplat extract-features`: run a 2D teacher over a scene's images and fill its cache (resumable).

Kept free of torch at import time: the CLI imports this module on every `qsplat` call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple


@dataclass
class ExtractFeatures:
    """Cache per-image masks and 512-D embeddings from a 2D teacher (images already cached are skipped)."""

    data: Path
    """Scene root: any scene the qsplat dataparser reads (ScanNet or nerfstudio layout); for the synthetic
    teacher, a folder made by `qsplat make-scene`."""
    teacher: Literal["synthetic", "grounded-sam2-clip"] = "synthetic"
    """synthetic: ground-truth masks with fixed class vectors (generated scenes only). grounded-sam2-clip:
    GroundingDINO boxes for the prompts -> SAM2 masks -> one open_clip embedding per mask (real scenes; local
    weights only, see docs/teachers.md)."""
    noise: float = 0.05
    """Synthetic teacher: norm of the random perturbation added to each mask's unit class vector."""
    overwrite: bool = False
    """Recompute every image, not only those without a current cache entry."""

    # --- grounded-sam2-clip ---------------------------------------------------------------------------------
    prompts: Optional[str] = None
    """Comma-separated prompts (classes) for GroundingDINO, e.g. "chair,table,sofa". Default for a generated
    scene: its class names."""
    prompts_file: Optional[Path] = None
    """File with prompts, one per line ('#' starts a comment); added to --prompts."""
    clip_model: str = "ViT-B-16"
    """open_clip architecture (512-D for ViT-B-16)."""
    clip_pretrained: str = "laion2b_s34b_b88k"
    """open_clip tag of the weights: where they are looked for ($QSPLAT_WEIGHTS_DIR/<its hf repo>, HF cache);
    it also sets QuickGELU and normalisation, so keep it matching a --clip-checkpoint ("" for no known tag)."""
    clip_checkpoint: Optional[Path] = None
    """open_clip checkpoint file (or a folder holding open_clip_pytorch_model.bin / open_clip_model.safetensors)."""
    sam2_config: str = "sam2.1_hiera_l"
    """SAM2 config: sam2.1_hiera_t|s|b+|l (or sam2_hiera_*)."""
    sam2_checkpoint: Optional[Path] = None
    """SAM2 checkpoint; default: $QSPLAT_WEIGHTS_DIR/facebook/sam2.1-hiera-large/sam2.1_hiera_large.pt (or
    $QSPLAT_WEIGHTS_DIR/sam2.1_hiera_large.pt) for sam2.1_hiera_l, else the HF cache."""
    detector_checkpoint: str = "IDEA-Research/grounding-dino-tiny"
    """GroundingDINO: a local folder (transformers format) or a HF id looked up under $QSPLAT_WEIGHTS_DIR/<id>
    and in the HF cache."""
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    automatic_masks: bool = False
    """Also add SAM2's automatic masks for regions no prompt found."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 32
    """CLIP crops (and SAM2 boxes) per forward pass."""
    splits: Tuple[str, ...] = ("train",)
    """Dataparser splits whose images get features (training reads the train split)."""

    def main(self) -> None:
        from .cache import TeacherCacheError

        try:
            if self.teacher == "synthetic":
                self._synthetic()
            else:
                self._grounded_sam2_clip()
        except TeacherCacheError as e:  # busy cache, read-only folder, disk full: a sentence, exit 1
            raise SystemExit(f"[q-splat] {e}") from None

    def _synthetic(self) -> None:
        from .synthetic import SyntheticTeacher, require_generated_scene

        try:
            require_generated_scene(self.data)
        except FileNotFoundError:
            raise SystemExit(
                f"[q-splat] {self.data} has no gt/scene.json: the synthetic teacher needs a scene made by "
                "`qsplat make-scene` (its ground-truth masks are the teacher). For a real scene use the "
                "Grounded-SAM2 + CLIP teacher: --teacher grounded-sam2-clip --prompts 'chair,table,...' "
                "(docs/teachers.md).") from None
        teacher = SyntheticTeacher(self.data, noise=self.noise)
        print(f"[q-splat] {teacher.name} teacher on {len(teacher.image_keys)} images of {self.data}")
        stats = teacher.run(overwrite=self.overwrite, progress=True)
        print(f"[q-splat] teacher cache: {teacher.cache_root}")
        print(f"  {stats.written} images written ({stats.masks} masks), {stats.skipped} already current, "
              f"{stats.seconds:.1f} s")

    def resolve_prompts(self) -> List[str]:
        from .masks import parse_prompts

        prompts = parse_prompts(self.prompts, self.prompts_file)
        if prompts:
            return prompts
        scene_json = Path(self.data) / "gt" / "scene.json"
        if scene_json.is_file():
            classes = json.loads(scene_json.read_text())["classes"]
            names = [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
            print(f"[q-splat] no --prompts: using the generated scene's classes {names}")
            return names
        raise SystemExit("[q-splat] the grounded-sam2-clip teacher needs prompts: --prompts 'chair,table,...' or "
                         "--prompts-file FILE (one prompt per line)")

    def _grounded_sam2_clip(self) -> None:
        from .clip import MissingWeightsError, TeacherDependencyError
        from .masks import GroundedSam2ClipConfig, GroundedSam2ClipTeacher

        prompts = self.resolve_prompts()
        config = GroundedSam2ClipConfig(
            prompts=tuple(prompts), clip_model=self.clip_model, clip_pretrained=self.clip_pretrained,
            clip_checkpoint=self.clip_checkpoint, sam2_config=self.sam2_config, sam2_checkpoint=self.sam2_checkpoint,
            detector=self.detector_checkpoint, box_threshold=self.box_threshold, text_threshold=self.text_threshold,
            automatic_masks=self.automatic_masks, device=self.device, batch_size=self.batch_size)
        try:
            teacher = GroundedSam2ClipTeacher(self.data, config, splits=self.splits)
        except (MissingWeightsError, TeacherDependencyError) as e:
            raise SystemExit(f"[q-splat] {e}") from None
        print(f"[q-splat] {teacher.name} teacher on {len(teacher.image_keys)} images of {self.data} "
              f"({len(prompts)} prompts, device {teacher.device})")
        stats = teacher.run(overwrite=self.overwrite, progress=True)
        print(f"[q-splat] teacher cache: {teacher.cache_root}")
        rate = f", {stats.written / stats.seconds:.2f} images/s" if stats.written and stats.seconds > 0 else ""
        print(f"  {stats.written} images written ({stats.masks} masks), {stats.skipped} already current, "
              f"{stats.seconds:.1f} s{rate}")
