"""The one open_clip loader q-splat uses: the teacher's mask embeddings and every text query go through it.

Weights are never downloaded. `load_clip` looks, in this order, for

1. an explicit checkpoint (`--clip-checkpoint PATH`: a file, or a folder holding one of the files below);
2. `$QSPLAT_WEIGHTS_DIR/<hf repo of the tag>/<file>`, e.g. for ViT-B-16 / laion2b_s34b_b88k
   `$QSPLAT_WEIGHTS_DIR/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/open_clip_pytorch_model.bin`;
3. the Hugging Face cache (`~/.cache/huggingface/hub`, or `$HF_HUB_CACHE`), read with no network access,

where <file> is `open_clip_model.safetensors` or `open_clip_pytorch_model.bin` (open_clip's names on the hub).
A missing checkpoint raises `MissingWeightsError` naming every path looked at and the command that fetches
it on a connected machine. A randomly initialised model exists only for tests and benchmarks, and only
when asked for explicitly (`random_init=True`); its info says so, so a cache made with it cannot pass for a
real one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from qrender_ns.teachers.vocabulary import normalize_text

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "laion2b_s34b_b88k"  # the ViT-B/16 LAION-2B weights LangSplat & co. use (512-D)
WEIGHTS_DIR_ENV = "QSPLAT_WEIGHTS_DIR"
CHECKPOINT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

PathLike = Union[str, Path]


class MissingWeightsError(FileNotFoundError):
    """A model checkpoint that is not on this machine (q-splat never downloads one)."""


class TeacherDependencyError(ImportError):
    """A package of the real teachers (open_clip, transformers, sam2) is not installed."""


def require(module: str):
    """Import a teacher dependency, or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TeacherDependencyError(
            f"`{module}` is not installed ({e}). The real teachers need the `teachers` extra: run "
            "`QSPLAT_TEACHERS=1 bash scripts/setup_venv.sh` (see docs/teachers.md).") from None


def require_installed(*modules: str) -> None:
    """Check that teacher dependencies are installed without importing them (a teacher's set-up fails at once,
    before any image, instead of at its first image)."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise TeacherDependencyError(
                f"`{module}` is not installed. The real teachers need the `teachers` extra: run "
                "`QSPLAT_TEACHERS=1 bash scripts/setup_venv.sh` (see docs/teachers.md).")


# ----------------------------------------------------------------------------------------------------
# Files and hashes
# ----------------------------------------------------------------------------------------------------

_SHA_MEMO: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: PathLike) -> str:
    """sha256 of a file, memoised per process by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def weights_dir() -> Optional[Path]:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else None


def hf_cached_file(repo_id: str, filename: str) -> Optional[Path]:
    """A file of a hub repo if it is in the local HF cache (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def hf_cache_hint(repo_id: str, filename: str = "") -> str:
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = "~/.cache/huggingface/hub"
    return f"{cache}/models--{repo_id.replace('/', '--')}/snapshots/*/{filename}"


# ----------------------------------------------------------------------------------------------------
# Resolving the checkpoint
# ----------------------------------------------------------------------------------------------------


def pretrained_cfg(model_name: str, pretrained: str) -> dict:
    open_clip = require("open_clip")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model_name!r} (known: {tags}); "
                         "pass --clip-checkpoint PATH for other weights")
    return cfg


def hf_repo_of(model_name: str, pretrained: str) -> Optional[str]:
    """The hub repo open_clip would download the tag from ('laion/CLIP-ViT-B-16-laion2B-s34B-b88K')."""
    return pretrained_cfg(model_name, pretrained).get("hf_hub", "").strip("/") or None


def resolve_clip_checkpoint(model_name: str = DEFAULT_MODEL, pretrained: Optional[str] = DEFAULT_PRETRAINED,
                            checkpoint: Optional[PathLike] = None) -> Path:
    """The local checkpoint file for (model, tag), or MissingWeightsError listing where it was looked for."""
    looked: List[str] = []
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if checkpoint.is_file():
            return checkpoint
        candidates = [checkpoint / f for f in CHECKPOINT_FILES] if checkpoint.is_dir() else []
        for path in candidates:
            if path.is_file():
                return path
        looked += [str(p) for p in candidates] or [str(checkpoint)]
        raise MissingWeightsError(_missing_clip_message(model_name, pretrained, looked, explicit=True))
    if not pretrained:
        raise ValueError("load_clip needs a pretrained tag or a checkpoint path (or random_init=True in tests)")
    repo = hf_repo_of(model_name, pretrained)
    root = weights_dir()
    if repo and root is not None:
        for name in CHECKPOINT_FILES:
            path = root / repo / name
            if path.is_file():
                return path
            looked.append(str(path))
    elif root is None:
        looked.append(f"${WEIGHTS_DIR_ENV}/{repo or '<repo>'}/{CHECKPOINT_FILES[1]} (${WEIGHTS_DIR_ENV} is unset)")
    if repo:
        for name in CHECKPOINT_FILES:
            found = hf_cached_file(repo, name)
            if found is not None:
                return found
            looked.append(hf_cache_hint(repo, name))
    raise MissingWeightsError(_missing_clip_message(model_name, pretrained, looked, explicit=False))


def _missing_clip_message(model_name: str, pretrained: Optional[str], looked: Sequence[str], explicit: bool) -> str:
    """One line: what is missing, every path looked at, how to fetch it."""
    message = (f"No open_clip checkpoint for {model_name} / {pretrained or '(explicit file)'} on this machine "
               f"(q-splat never downloads weights); looked for {', '.join(looked)}")
    repo = None
    if pretrained:
        try:
            repo = hf_repo_of(model_name, pretrained)
        except ValueError:
            repo = None
    if repo:
        message += (f"; fetch it on a connected machine (`hf download {repo} {CHECKPOINT_FILES[1]} --local-dir "
                    f"\"${WEIGHTS_DIR_ENV}/{repo}\"`), then set {WEIGHTS_DIR_ENV} or pass --clip-checkpoint PATH.")
    elif not explicit:
        message += "; pass --clip-checkpoint PATH to an open_clip checkpoint file."
    else:
        message += "."
    return message


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def _register_model_cfg(model_name: str, model_cfg: dict) -> None:
    """Make a custom architecture (tests: a tiny CLIP) known to open_clip under model_name."""
    open_clip = require("open_clip")
    if open_clip.get_model_config(model_name) == model_cfg:
        return
    folder = Path(tempfile.mkdtemp(prefix="qsplat-open-clip-cfg-"))
    (folder / f"{model_name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(folder / f"{model_name}.json")
    if open_clip.get_model_config(model_name) != model_cfg:
        raise ValueError(f"could not register the open_clip config {model_name!r}")


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer and image normalisation; encodes texts and image crops."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    info: dict  # JSON: model, pretrained, checkpoint_sha256 (or random_init) -- recorded in teacher manifests
    checkpoint: Optional[Path] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [T, dim] (float32, CPU)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    def preprocess(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB crops [h, w, 3] (any sizes) -> normalised batch [N, 3, S, S]: each is zero-padded to a
        centred square, then resized (bicubic, antialiased) -- what open_clip's resize + centre crop gives
        for a square input, without cutting the object."""
        batch = []
        for crop in crops:
            h, w = crop.shape[:2]
            side = max(h, w, 1)
            square = np.zeros((side, side, 3), dtype=np.uint8)
            top, left = (side - h) // 2, (side - w) // 2
            square[top:top + h, left:left + w] = crop
            x = torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                                antialias=True, align_corners=False).clamp_(0, 1)
            batch.append(x[0])
        if not batch:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        x = torch.stack(batch)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def encode_images(self, crops: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings [N, dim] (float32, CPU) of uint8 RGB crops, batch_size at a time."""
        out = []
        for start in range(0, len(crops), max(1, batch_size)):
            x = self.preprocess(crops[start:start + batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def describe_clip(model_name: str = DEFAULT_MODEL, pretrained: Optional[str] = DEFAULT_PRETRAINED,
                  checkpoint: Optional[PathLike] = None, *, random_init: bool = False, model_cfg: Optional[dict] = None,
                  seed: int = 0) -> Tuple[dict, Optional[Path]]:
    """(info, checkpoint path) of the CLIP `load_clip` would build, without building it: resolves and hashes
    the checkpoint (MissingWeightsError when absent). The info is what teacher manifests record."""
    open_clip = require("open_clip")
    if model_cfg is not None:
        _register_model_cfg(model_name, model_cfg)
    arch = open_clip.get_model_config(model_name)
    if arch is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models())}")
    info: dict = {"model": model_name, "dim": int(arch["embed_dim"])}
    path: Optional[Path] = None
    if random_init:
        info.update(pretrained=None, random_init=True, seed=int(seed))
    else:
        path = resolve_clip_checkpoint(model_name, pretrained, checkpoint)
        info.update(pretrained=pretrained, checkpoint_file=path.name, checkpoint_sha256=file_sha256(path))
    if model_cfg is not None:
        info["model_cfg"] = model_cfg
    return info, path


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: Optional[str] = DEFAULT_PRETRAINED,
              checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu", *,
              random_init: bool = False, model_cfg: Optional[dict] = None, seed: int = 0) -> ClipModel:
    """open_clip `model_name` with local weights (see the module docstring for where they are looked for).

    random_init=True (tests and benchmarks only) builds the architecture with seeded random weights and no
    checkpoint; model_cfg registers a custom architecture (an open_clip model-config dict) under model_name."""
    open_clip = require("open_clip")
    device = torch.device(device)
    info, path = describe_clip(model_name, pretrained, checkpoint, random_init=random_init, model_cfg=model_cfg,
                               seed=seed)
    kwargs: dict = {}
    if path is not None and pretrained:
        tag_cfg = pretrained_cfg(model_name, pretrained)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=str(path) if path else None, device="cpu",
                                       pretrained_text=False, **kwargs)
    model = model.to(device).eval()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipModel(model=model, tokenizer=open_clip.get_tokenizer(model_name), image_size=int(size), mean=mean,
                     std=std, info=info, checkpoint=path, device=device)


def load_clip_from_info(info: dict, checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                        allow_random_init: bool = False) -> ClipModel:
    """The CLIP a teacher manifest describes (its "clip" entry), with the same weights (sha256 checked)."""
    if info.get("random_init"):
        if not allow_random_init:
            raise ValueError(
                f"This teacher cache was made with a randomly initialised CLIP ({info.get('model')}, test-only): its "
                "embeddings mean nothing. Re-run `qsplat extract-features` with real weights, or pass "
                "allow_random_init=True (tests; in ns-train/ns-eval: --pipeline.model.allow-random-text-encoder True).")
        return load_clip(info["model"], None, device=device, random_init=True, model_cfg=info.get("model_cfg"),
                         seed=int(info.get("seed", 0)))
    clip = load_clip(info["model"], info.get("pretrained"), checkpoint, device=device, model_cfg=info.get("model_cfg"))
    if clip.info["checkpoint_sha256"] != info.get("checkpoint_sha256"):
        raise ValueError(
            f"CLIP checkpoint {clip.checkpoint} (sha256 {clip.info['checkpoint_sha256'][:12]}...) is not the one the "
            f"teacher cache was made with (sha256 {str(info.get('checkpoint_sha256'))[:12]}..., file "
            f"{info.get('checkpoint_file')}): text queries would not match the cached features. Pass the original "
            "checkpoint, or re-run `qsplat extract-features --overwrite`.")
    return clip


class ClipTextEncoder:
    """The TextEncoder of CLIP teachers: encode(texts) -> L2-normalised [T, dim] from the teacher's own CLIP."""

    def __init__(self, clip: ClipModel, name: str):
        self.clip = clip
        self.name = name
        self.dim = clip.dim

    def encode(self, texts: List[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        return self.clip.encode_text([normalize_text(t) for t in texts])
