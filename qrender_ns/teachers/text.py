"""Text encoders that embed queries into a teacher's feature space, chosen from the cache manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from qrender_ns.teachers.cache import MANIFEST_NAME, TeacherCache
from qrender_ns.teachers.clip import ClipTextEncoder, load_clip_from_info
from qrender_ns.teachers.masks import read_weights_sidecar
from qrender_ns.teachers.synthetic import SyntheticTextEncoder
from qrender_ns.teachers.vocabulary import TextEncoder, normalize_text, vocabulary_error  # noqa: F401  (re-exported)


def load_text_encoder(cache_root_or_manifest: Union[str, Path, TeacherCache], *,
                      clip_checkpoint: Optional[Union[str, Path]] = None, device: str = "cpu",
                      allow_random_init: bool = False) -> TextEncoder:
    """The text encoder matching the teacher that filled a cache (its folder, its manifest.json, or an open
    TeacherCache).

    CLIP teachers (their manifest has a "clip" entry, e.g. grounded-sam2-clip) get their own open_clip model back:
    from clip_checkpoint, else the path the extraction recorded in the cache's weights.json, else
    $QSPLAT_WEIGHTS_DIR / the HF cache; its sha256 must equal the manifest's. A cache made with a randomly
    initialised CLIP (tests) needs allow_random_init=True."""
    cache = cache_root_or_manifest
    if not isinstance(cache, TeacherCache):
        path = Path(cache)
        cache = TeacherCache(path.parent if path.name == MANIFEST_NAME else path)
    if cache.teacher_name == "synthetic":
        return SyntheticTextEncoder(dim=cache.feature_dim)
    clip_info = cache.teacher_info.get("clip")
    if isinstance(clip_info, dict):
        if clip_checkpoint is None:
            recorded = read_weights_sidecar(cache.root).get("clip_checkpoint")
            clip_checkpoint = recorded if recorded and Path(recorded).is_file() else None
        clip = load_clip_from_info(clip_info, clip_checkpoint, device=device, allow_random_init=allow_random_init)
        if clip.dim != cache.feature_dim:
            raise ValueError(f"CLIP {clip_info.get('model')} embeds into {clip.dim}-D, the cache {cache.root} holds "
                             f"{cache.feature_dim}-D features")
        return ClipTextEncoder(clip, name=cache.teacher_name)
    raise NotImplementedError(
        f"No text encoder for teacher '{cache.teacher_name}' (cache {cache.root}): it is neither 'synthetic' nor a "
        "CLIP teacher (e.g. grounded-sam2-clip, whose manifest names its CLIP model); the text side of any other "
        "teacher is not installed.")
