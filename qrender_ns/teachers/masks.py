"""The real 2D teacher, "grounded-sam2-clip": Grounded-SAM2 masks with one open_clip embedding per mask.

Per image (RGB, as the qsplat dataparser lists it):

1. GroundingDINO (transformers, local weights only) finds boxes for the prompts ("chair. table."; prompt lists
   longer than the text encoder's window are split into several passes); boxes are clipped to the image,
   de-duplicated across prompts by NMS and capped at `max_boxes` by score.
2. SAM2 (`SAM2ImagePredictor`) turns each box into a mask. Optionally SAM2's automatic mask generator adds
   masks for regions no prompt found (kept when enough of their area is new).
3. The masks become one id map: unprompted masks are painted first, then prompted ones, each group largest
   first, so smaller masks stay visible on top; masks left with fewer than `min_mask_pixels` visible pixels
   are dropped and the rest renumbered 0..M-1 (-1 = no mask).
4. CLIP (`clip.load_clip`, the same model text queries use) embeds each kept mask: its whole SAM2 mask's box,
   padded by `crop_padding`, background blanked to black, zero-padded to a square; crops go in batches.

The cache (`TeacherCache`, atomic, resumable, progress bar with ETA) records in its manifest the model names,
the sha256 of every checkpoint, the prompts and every setting that changes the result: change one and the
next run redoes all images. Where the weights were found is kept beside it in `weights.json` (not part of
the key: moving the weights does not invalidate features), so `load_text_encoder` finds the same CLIP.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from qrender_ns.data.datamanager import served_images
from qrender_ns.data.dataparser import QSplatDataParserConfig
from qrender_ns.teachers.cache import FillStats, default_cache_root, image_key
from qrender_ns.teachers.clip import (DEFAULT_MODEL, DEFAULT_PRETRAINED, WEIGHTS_DIR_ENV, ClipModel,
                                      MissingWeightsError, describe_clip, file_sha256, hf_cache_hint, hf_cached_file,
                                      load_clip, require, require_installed, weights_dir)
from qrender_ns.teachers.filling import fill_teacher_cache, open_cache_for
from qrender_ns.utils.fsio import atomic_write_json

NAME = "grounded-sam2-clip"
VERSION = 1  # bump when what compute() produces changes: caches made by an older version are then redone
WEIGHTS_SIDECAR = "weights.json"

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"  # Grounded-SAM-2's default (its HF demo)
DEFAULT_SAM2_CONFIG = "sam2.1_hiera_l"  # Grounded-SAM-2's default

# config name -> (HF repo, checkpoint file, folder of Meta's direct download)
SAM2_CHECKPOINTS: Dict[str, Tuple[str, str, str]] = {
    "sam2.1_hiera_t": ("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", "092824"),
    "sam2.1_hiera_s": ("facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt", "092824"),
    "sam2.1_hiera_b+": ("facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt", "092824"),
    "sam2.1_hiera_l": ("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt", "092824"),
    "sam2_hiera_t": ("facebook/sam2-hiera-tiny", "sam2_hiera_tiny.pt", "072824"),
    "sam2_hiera_s": ("facebook/sam2-hiera-small", "sam2_hiera_small.pt", "072824"),
    "sam2_hiera_b+": ("facebook/sam2-hiera-base-plus", "sam2_hiera_base_plus.pt", "072824"),
    "sam2_hiera_l": ("facebook/sam2-hiera-large", "sam2_hiera_large.pt", "072824"),
}
_DETECTOR_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Sam2ClipModels:
    """The models and CLIP-crop settings every SAM2 + CLIP teacher shares (grounded-sam2-clip, sam2-auto-clip);
    keyword-only, so each teacher's own fields may come first."""

    clip_model: str = DEFAULT_MODEL
    clip_pretrained: Optional[str] = DEFAULT_PRETRAINED
    clip_checkpoint: Optional[PathLike] = None
    sam2_config: str = DEFAULT_SAM2_CONFIG
    sam2_checkpoint: Optional[PathLike] = None
    min_mask_pixels: int = 64
    crop_padding: float = 0.1
    """CLIP crop = the mask's box grown by this fraction of its size on each side."""
    batch_size: int = 32
    """CLIP crops per forward pass (and, for grounded-sam2-clip, SAM2 boxes per decoder call)."""
    device: str = "auto"
    # --- tests and benchmarks only -----------------------------------------------------------------------
    random_init: bool = False
    """Randomly initialised CLIP and SAM2 (seeded, no checkpoint): only for tests and benchmarks."""
    clip_model_cfg: Optional[dict] = None
    """A custom open_clip architecture registered as clip_model (tests: a tiny CLIP)."""
    sam2_overrides: Tuple[str, ...] = ()
    """Extra hydra overrides for the SAM2 config (tests: "++model.image_size=256")."""
    seed: int = 0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class GroundedSam2ClipConfig(Sam2ClipModels):
    """Models and settings of the grounded-sam2-clip teacher (the CLI's `ExtractFeatures` fills it)."""

    prompts: Tuple[str, ...]
    detector: str = DEFAULT_DETECTOR
    """GroundingDINO: a local folder (config.json + weights + processor files) or a HF id (looked up under
    $QSPLAT_WEIGHTS_DIR/<id> and in the HF cache)."""
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    nms_iou: float = 0.7
    max_boxes: int = 64
    automatic_masks: bool = False
    auto_points_per_side: int = 32
    auto_pred_iou_thresh: float = 0.8
    auto_stability_score_thresh: float = 0.95
    auto_min_new_fraction: float = 0.5
    """An automatic mask is kept when at least this fraction of it is not covered by a prompted mask."""

    def __post_init__(self):
        self.prompts = tuple(p.strip() for p in self.prompts if p and p.strip())
        if not self.prompts:
            raise ValueError("the grounded-sam2-clip teacher needs at least one prompt (--prompts 'chair,table')")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError(f"duplicate prompts: {list(self.prompts)}")


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------


def sam2_config_file(config: str) -> str:
    """'sam2.1_hiera_t' -> 'configs/sam2.1/sam2.1_hiera_t.yaml' (the hydra name sam2's build_sam2 takes)."""
    if config.endswith(".yaml"):
        return config
    family = "sam2.1" if config.startswith("sam2.1") else "sam2"
    return f"configs/{family}/{config}.yaml"


def _config_key(config: str) -> str:
    return Path(config).name.removesuffix(".yaml")


def resolve_sam2_checkpoint(config: str, checkpoint: Optional[PathLike] = None) -> Path:
    """The SAM2 checkpoint for a config: the explicit path, else $QSPLAT_WEIGHTS_DIR/<repo>/<file> or
    $QSPLAT_WEIGHTS_DIR/<file>, else the HF cache. MissingWeightsError lists where it looked."""
    key = _config_key(config)
    repo, filename, folder = SAM2_CHECKPOINTS.get(key, (None, None, None))
    looked: List[str] = []
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_file():
            return path
        looked.append(str(path))
    else:
        root = weights_dir()
        if filename and root is not None:
            for path in (root / repo / filename, root / filename):
                if path.is_file():
                    return path
                looked.append(str(path))
        elif filename:
            looked.append(f"${WEIGHTS_DIR_ENV}/{repo}/{filename} (${WEIGHTS_DIR_ENV} is unset)")
        if filename:
            found = hf_cached_file(repo, filename)
            if found is not None:
                return found
            looked.append(hf_cache_hint(repo, filename))
    message = (f"No SAM2 checkpoint for config {key} on this machine (q-splat never downloads weights); looked for "
               f"{', '.join(looked)}")
    if filename:
        message += (f"; fetch it on a connected machine (`hf download {repo} {filename} --local-dir "
                    f"\"${WEIGHTS_DIR_ENV}/{repo}\"`, or wget https://dl.fbaipublicfiles.com/segment_anything_2/"
                    f"{folder}/{filename}), then set {WEIGHTS_DIR_ENV} or pass --sam2-checkpoint PATH.")
    else:
        message += f"; known configs: {', '.join(SAM2_CHECKPOINTS)}; pass --sam2-checkpoint PATH for others."
    raise MissingWeightsError(message)


def resolve_detector(detector: str) -> Path:
    """GroundingDINO folder: `detector` itself when it is a folder, else $QSPLAT_WEIGHTS_DIR/<id>, else the HF
    cache snapshot of the id (no network)."""
    looked: List[str] = []
    path = Path(detector).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    looked.append(str(path / "config.json") if path.is_dir() else str(path))
    is_id = not path.is_absolute() and len(Path(detector).parts) == 2 and not detector.startswith(".")
    if is_id:
        root = weights_dir()
        if root is not None:
            if (root / detector / "config.json").is_file():
                return root / detector
            looked.append(str(root / detector / "config.json"))
        else:
            looked.append(f"${WEIGHTS_DIR_ENV}/{detector}/config.json (${WEIGHTS_DIR_ENV} is unset)")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(detector, local_files_only=True))
        except ImportError:
            pass
        except Exception:  # LocalEntryNotFoundError and friends: not cached
            looked.append(hf_cache_hint(detector, "config.json"))
    repo = detector if is_id else DEFAULT_DETECTOR
    raise MissingWeightsError(
        f"No GroundingDINO model {detector!r} on this machine (q-splat never downloads weights); looked for "
        f"{', '.join(looked)}; fetch it on a connected machine (`hf download {repo} --local-dir "
        f"\"${WEIGHTS_DIR_ENV}/{repo}\"`), then set {WEIGHTS_DIR_ENV} or pass --detector-checkpoint FOLDER.")


def detector_sha256(folder: Path) -> str:
    """sha256 of a transformers model folder's weights (of their sha256s when sharded)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise MissingWeightsError(f"{folder} holds no weights ({' or '.join(_DETECTOR_WEIGHTS)})")
    if len(files) == 1:
        return file_sha256(files[0])

    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


class GroundingDinoDetector:
    """Text-prompted boxes from a local GroundingDINO (transformers)."""

    def __init__(self, folder: PathLike, device: torch.device, box_threshold: float = 0.35,
                 text_threshold: float = 0.25):
        transformers = require("transformers")
        self.processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        self.model = transformers.GroundingDinoForObjectDetection.from_pretrained(
            str(folder), local_files_only=True).to(device).eval()
        self.device = device
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def prompt_chunks(self, prompts: Sequence[str]) -> List[str]:
        """'a. b. c.' texts, each within the model's text window (GroundingDINO reads lower-case, '.'-separated)."""
        chunks, current = [], []
        for prompt in prompts:
            candidate = current + [prompt]
            text = " ".join(f"{p.lower()}." for p in candidate)
            if current and len(self.processor.tokenizer(text)["input_ids"]) > self.max_text_len:
                chunks.append(" ".join(f"{p.lower()}." for p in current))
                candidate = [prompt]
            current = candidate
        if current:
            chunks.append(" ".join(f"{p.lower()}." for p in current))
        return chunks

    @torch.inference_mode()
    def detect(self, image: np.ndarray, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes float32 [B, 4] xyxy in pixels, scores [B]) over all prompts, before NMS."""
        height, width = image.shape[:2]
        boxes, scores = [], []
        for text in self.prompt_chunks(prompts):
            inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(height, width)])[0]
            boxes.append(result["boxes"].float().cpu())
            scores.append(result["scores"].float().cpu())
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        return torch.cat(boxes).numpy(), torch.cat(scores).numpy()


class Sam2Segmenter:
    """SAM2 masks for boxes, and optionally SAM2's automatic masks."""

    def __init__(self, config: str, checkpoint: Optional[Path], device: torch.device, overrides: Sequence[str] = (),
                 seed: int = 0, automatic: Optional[dict] = None, level: str = "all"):
        build_sam2 = require("sam2.build_sam").build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_sam2(sam2_config_file(config), ckpt_path=str(checkpoint) if checkpoint else None,
                                    device=str(device), hydra_overrides_extra=list(overrides))
        self.predictor = SAM2ImagePredictor(self.model)
        self._fit_feature_sizes(self.predictor)
        self.generator = None
        if automatic is not None:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            self.generator = SAM2AutomaticMaskGenerator(self.model, output_mode="binary_mask", **automatic)
            self._fit_feature_sizes(self.generator.predictor)
            if level != "all":
                keep_one_granularity(self.generator, level)

    def _fit_feature_sizes(self, predictor) -> None:
        # SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 input; keep them in step with the
        # model's image_size (identical at 1024; needed when a test shrinks the input).
        size = int(self.model.image_size)
        if hasattr(predictor, "_bb_feat_sizes"):
            predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]

    @torch.inference_mode()
    def masks_for_boxes(self, image: np.ndarray, boxes: np.ndarray, batch: int = 32) -> np.ndarray:
        """bool [B, H, W], one mask per box (single-mask output)."""
        height, width = image.shape[:2]
        if len(boxes) == 0:
            return np.zeros((0, height, width), bool)
        self.predictor.set_image(image)
        out = []
        for start in range(0, len(boxes), max(1, batch)):
            masks, _, _ = self.predictor.predict(box=boxes[start:start + batch], multimask_output=False)
            out.append(np.asarray(masks).reshape(-1, height, width) > 0)
        self.predictor.reset_predictor()
        return np.concatenate(out)

    @torch.inference_mode()
    def automatic_masks(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        records = self.generator.generate(image) if self.generator is not None else []
        if not records:
            return np.zeros((0, height, width), bool)
        return np.stack([np.asarray(r["segmentation"], bool) for r in records])


GRANULARITY_RANK = {"small": 0, "medium": 1, "large": 2}


def keep_one_granularity(generator, level: str) -> None:
    """Make a SAM2AutomaticMaskGenerator keep one granularity: of the three masks SAM2 predicts per grid point
    (subpart / part / whole), the smallest, middle or largest by area ("small" / "medium" / "large"), as
    LangSplat's s / m / l levels, which are SAM's multimask outputs 0 / 1 / 2 generated separately. Ranking by
    area does not rely on the order of SAM2's output tokens. The generator's own filters (predicted IoU,
    stability, box NMS) then run on that level alone. Wraps the predictor's `_predict` (sam2 1.1.0), the one
    call `_process_batch` makes with multimask_output=True."""
    if level not in GRANULARITY_RANK:
        raise ValueError(f"mask level must be one of {', '.join(GRANULARITY_RANK)} or all, got {level!r}")
    rank, predict, threshold = GRANULARITY_RANK[level], generator.predictor._predict, generator.mask_threshold

    def one_level(*args, **kwargs):
        masks, iou_preds, low_res = predict(*args, **kwargs)
        if masks.shape[1] < 3:  # multimask_output=False: nothing to choose
            return masks, iou_preds, low_res
        area = (masks > threshold).flatten(2).sum(-1)  # [B, 3]
        pick = area.argsort(dim=1, stable=True)[:, rank:rank + 1]  # [B, 1]
        take = lambda x: x.gather(1, pick.view(-1, 1, *[1] * (x.ndim - 2)).expand(-1, 1, *x.shape[2:]))  # noqa: E731
        return take(masks), iou_preds.gather(1, pick), take(low_res)

    generator.predictor._predict = one_level


# ----------------------------------------------------------------------------------------------------
# Geometry helpers (pure numpy; unit-tested directly)
# ----------------------------------------------------------------------------------------------------


def clean_boxes(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, nms_iou: float,
                max_boxes: int) -> np.ndarray:
    """Clip to the image, drop boxes thinner than 2 px, class-agnostic NMS, keep the max_boxes best."""
    from torchvision.ops import nms

    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    b = np.asarray(boxes, np.float32).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    ok = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
    b, s = b[ok], np.asarray(scores, np.float32)[ok]
    if len(b) == 0:
        return np.zeros((0, 4), np.float32)
    keep = nms(torch.from_numpy(b), torch.from_numpy(s), nms_iou).numpy()[:max_boxes]  # sorted by score
    return b[keep]


def compose_mask_ids(masks: Sequence[np.ndarray], min_pixels: int) -> Tuple[np.ndarray, List[int]]:
    """Paint masks in the given order (later ones on top) into an int32 id map; masks left with fewer than
    min_pixels visible pixels are dropped and the rest repainted, so what a dropped mask covered falls back to
    the mask beneath. Returns (ids: -1 = no mask, else 0..M-1 in paint order; the kept input indices)."""
    if len(masks) == 0:
        raise ValueError("compose_mask_ids needs at least one mask")

    def paint(order: Sequence[int]) -> np.ndarray:
        painted = np.full(masks[0].shape, -1, np.int32)
        for new_id, i in enumerate(order):
            painted[masks[i]] = new_id
        return painted

    painted = paint(range(len(masks)))
    counts = np.bincount(painted[painted >= 0], minlength=len(masks))
    kept = [i for i in range(len(masks)) if counts[i] >= max(1, min_pixels)]
    # Repainting only the kept masks can only add visible pixels to them, so one pass is enough.
    return paint(kept), kept


def mask_crop(image: np.ndarray, mask: np.ndarray, padding: float) -> np.ndarray:
    """The mask's box grown by `padding` x its size per side (clipped), with pixels outside the mask black."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad_y, pad_x = int(round(padding * (y1 - y0))), int(round(padding * (x1 - x0)))
    y0, y1 = max(0, y0 - pad_y), min(mask.shape[0], y1 + pad_y)
    x0, x1 = max(0, x0 - pad_x), min(mask.shape[1], x1 + pad_x)
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = 0
    return crop


def load_rgb(path: PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only arrays)


def scene_image_keys(scene_dir: PathLike, splits: Sequence[str] = ("train",)) -> List[str]:
    """Image keys (paths relative to the scene) of the given splits, as the qsplat dataparser lists them."""
    parser = QSplatDataParserConfig(data=Path(scene_dir)).setup()
    keys: List[str] = []
    for split in splits:
        for filename in parser.get_dataparser_outputs(split=split).image_filenames:
            key = image_key(filename, scene_dir)
            if key not in keys:
                keys.append(key)
    return keys


# ----------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------


class ClipMaskTeacher:
    """What the real teachers share: SAM2 + open_clip weights resolved and hashed at construction (a missing one
    or a missing package fails at once, before any work), models loaded lazily on the first image that is not
    already cached (a finished cache resumes instantly), one id map per image (`compose_mask_ids`) and one CLIP
    embedding per kept mask (`mask_crop`), the resumable fill and the weights sidecar. A subclass sets `name`,
    `packages`, `_info` (the manifest's teacher entry) and `masks(image)` (candidates in paint order)."""

    name = ""
    packages: Tuple[str, ...] = ("sam2",)

    def _setup_models(self, scene_dir: PathLike, config, cache_root: Optional[PathLike]) -> dict:
        """Resolve the packages and the CLIP / SAM2 weights; returns the manifest's "sam2" entry."""
        self.scene_dir = Path(scene_dir)
        self.config = config
        self.device = config.resolved_device()
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root(self.scene_dir, self.name)
        c = config
        require_installed(*self.packages)
        self.clip_info, self.clip_path = describe_clip(
            c.clip_model, c.clip_pretrained, c.clip_checkpoint, random_init=c.random_init,
            model_cfg=c.clip_model_cfg, seed=c.seed)
        self.sam2_path = None if c.random_init else resolve_sam2_checkpoint(c.sam2_config, c.sam2_checkpoint)
        sam2_info = {"config": _config_key(c.sam2_config), "overrides": list(c.sam2_overrides)}
        if self.sam2_path is None:
            sam2_info.update(random_init=True, seed=c.seed)
        else:
            sam2_info.update(checkpoint_file=self.sam2_path.name, checkpoint_sha256=file_sha256(self.sam2_path))
        self._clip: Optional[ClipModel] = None
        self._segmenter: Optional[Sam2Segmenter] = None
        return sam2_info

    def _setup_images(self, image_keys: Optional[Sequence[str]], splits: Sequence[str]) -> None:
        self.splits = tuple(splits)
        self.image_keys = list(image_keys) if image_keys is not None else scene_image_keys(self.scene_dir, splits)

    @property
    def teacher_info(self) -> dict:
        """The manifest's teacher entry: any change in it redoes every image."""
        return json.loads(json.dumps(self._info))

    @property
    def dim(self) -> int:
        return int(self.clip_info["dim"])

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:
            c = self.config
            self._clip = load_clip(c.clip_model, c.clip_pretrained, self.clip_path, device=self.device,
                                   random_init=c.random_init, model_cfg=c.clip_model_cfg, seed=c.seed)
        return self._clip

    def masks(self, image: np.ndarray) -> List[np.ndarray]:
        raise NotImplementedError

    def compute_image(self, image: np.ndarray) -> Tuple[np.ndarray, torch.Tensor]:
        """(mask_ids int32 [H, W], unit embeddings [M, dim]) of one RGB uint8 image."""
        height, width = image.shape[:2]
        candidates = self.masks(image)
        if not candidates:
            return np.full((height, width), -1, np.int32), torch.zeros(0, self.dim)
        mask_ids, kept = compose_mask_ids(candidates, self.config.min_mask_pixels)
        crops = [mask_crop(image, candidates[i], self.config.crop_padding) for i in kept]
        embeddings = self.clip.encode_images(crops, self.config.batch_size)
        return mask_ids, embeddings.reshape(len(kept), self.dim)

    def compute_served(self, key: str, image: np.ndarray) -> Tuple[np.ndarray, torch.Tensor]:
        """compute_image() of an image as the datamanager serves it (undistorted, cropped, downscaled)."""
        return self.compute_image(np.ascontiguousarray(np.asarray(image)[..., :3]))

    def run(self, overwrite: bool = False, progress: bool = True) -> FillStats:
        """Fill the cache for the teacher's images as the datamanager serves them (resuming: current entries
        are skipped)."""
        items = served_images(self.scene_dir, self.splits)
        if self.image_keys:
            items = [item for item in items if item[0] in self.image_keys]
        keys = [key for key, _ in items]
        with open_cache_for(self, keys, replace_other_teacher=overwrite) as cache:  # the lock is released on leaving
            self.write_weights_sidecar()
            return fill_teacher_cache(cache, self, items, overwrite=overwrite, progress=progress)

    def _weight_paths(self) -> Dict[str, Optional[Path]]:
        return {"clip_checkpoint": self.clip_path, "sam2_checkpoint": self.sam2_path}

    def write_weights_sidecar(self) -> None:
        """Where the weights were found (not part of the cache key): load_text_encoder reads the CLIP path."""
        data = {k: str(Path(v).resolve()) if v else None for k, v in self._weight_paths().items()}
        atomic_write_json(self.cache_root / WEIGHTS_SIDECAR, data, indent=1)


class GroundedSam2ClipTeacher(ClipMaskTeacher):
    """Grounded-SAM2 masks + CLIP embeddings for a scene's images, written to its teacher cache."""

    name = NAME
    packages = ("sam2", "transformers")

    def __init__(self, scene_dir: PathLike, config: GroundedSam2ClipConfig, image_keys: Optional[Sequence[str]] = None,
                 splits: Sequence[str] = ("train",), cache_root: Optional[PathLike] = None):
        sam2_info = self._setup_models(scene_dir, config, cache_root)
        c = config
        self.detector_path = resolve_detector(c.detector)
        automatic = None
        if c.automatic_masks:
            automatic = {"points_per_side": c.auto_points_per_side, "pred_iou_thresh": c.auto_pred_iou_thresh,
                         "stability_score_thresh": c.auto_stability_score_thresh,
                         "min_new_fraction": c.auto_min_new_fraction}
        self._info = {
            "name": NAME, "version": VERSION, "prompts": list(c.prompts),
            "clip": self.clip_info, "sam2": sam2_info,
            "detector": {"model": "GroundingDINO (transformers)", "weights_sha256": detector_sha256(self.detector_path),
                         "box_threshold": c.box_threshold, "text_threshold": c.text_threshold, "nms_iou": c.nms_iou,
                         "max_boxes": c.max_boxes},
            "automatic_masks": automatic,
            "masks": {"min_mask_pixels": c.min_mask_pixels, "crop_padding": c.crop_padding,
                      "crop": "mask box + padding, background black, zero-padded square, bicubic resize"},
        }
        self._detector: Optional[GroundingDinoDetector] = None
        self._setup_images(image_keys, splits)

    @property
    def class_names(self) -> List[str]:
        return list(self.config.prompts)

    # --- models (lazy) ------------------------------------------------------------------------------------

    @property
    def detector(self) -> GroundingDinoDetector:
        if self._detector is None:
            self._detector = GroundingDinoDetector(self.detector_path, self.device, self.config.box_threshold,
                                                   self.config.text_threshold)
        return self._detector

    @property
    def segmenter(self) -> Sam2Segmenter:
        if self._segmenter is None:
            c = self.config
            settings = self._info["automatic_masks"]  # SAM2AutomaticMaskGenerator's arguments, plus our filter
            automatic = {k: v for k, v in settings.items() if k != "min_new_fraction"} if settings else None
            self._segmenter = Sam2Segmenter(c.sam2_config, self.sam2_path, self.device, c.sam2_overrides, c.seed,
                                            automatic)
        return self._segmenter

    # --- per image ----------------------------------------------------------------------------------------

    def masks(self, image: np.ndarray) -> List[np.ndarray]:
        """The candidate masks in paint order (automatic ones first, then prompted; each group largest first)."""
        c = self.config
        height, width = image.shape[:2]
        boxes, scores = self.detector.detect(image, c.prompts)
        boxes = clean_boxes(boxes, scores, width, height, c.nms_iou, c.max_boxes)
        prompted = [m for m in self.segmenter.masks_for_boxes(image, boxes, c.batch_size) if m.any()]
        automatic: List[np.ndarray] = []
        if c.automatic_masks:
            covered = np.zeros((height, width), bool)
            for m in prompted:
                covered |= m
            for m in self.segmenter.automatic_masks(image):
                area = int(m.sum())
                if area and (m & ~covered).sum() >= c.auto_min_new_fraction * area:
                    automatic.append(m)
        return largest_first(automatic) + largest_first(prompted)

    def _weight_paths(self) -> Dict[str, Optional[Path]]:
        return {**super()._weight_paths(), "detector": self.detector_path}


def largest_first(masks: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Masks sorted by decreasing area (stable: ties keep their order), the paint order that keeps smaller masks
    visible on top of the larger ones they overlap."""
    return sorted(masks, key=lambda m: -int(m.sum()))


def read_weights_sidecar(cache_root: PathLike) -> dict:
    path = Path(cache_root) / WEIGHTS_SIDECAR
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
