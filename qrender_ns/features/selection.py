"""Which Gaussians a text query selects: the one rule of `qsplat query`, the opengaussian-3d protocol and
eval-scannet's 3D selection metrics.

- "wins" (the default, no threshold): a Gaussian belongs to query q when its feature is non-zero (a training
  pixel reached it) and cos(f, e_q) is larger than cos(f, e_c) for every competitor c: the run's vocabulary (the
  teacher's class / prompt list recorded with the run: `model.class_names`, from the generated scene's
  gt/scene.json or the teacher cache's class_names, e.g. the grounded-sam2 prompts) and the canonical negatives,
  the query itself removed from them (after normalize_text).
  With `knn` > 0 (the default, 32) the cosines are those of each Gaussian's *smoothed* feature: the sum of the
  unit features of its `knn` nearest Gaussians in 3D (itself included), each weighted by the supervision it
  received (`model.gaussian_confidence`: the Q-Render blending weight the contrastive loss gave it over
  training). A wall Gaussian seen in a few pixels behind a lamp scores as its wall neighbours, not as the lamp
  (issue 30 item 4; k and the weighting were chosen on validation rooms 21-22, docs/evaluation.md). Only
  Gaussians whose own feature is non-zero are selected.
- "absolute" (the old rule, kept for comparison): LERF's relevancy against the canonical negatives > threshold
  (raw features, no smoothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qrender_ns.features.relevancy import relevancy
from qrender_ns.teachers.vocabulary import normalize_text

SelectionMode = Literal["wins", "absolute"]
SELECTION_MODES = ("wins", "absolute")
DEFAULT_THRESHOLD = 0.55
DEFAULT_KNN = 32  # chosen on validation rooms 21-22 (docs/evaluation.md); 0 = no smoothing


@dataclass
class SelectionRule:
    """How a text query selects Gaussians."""

    mode: SelectionMode = "wins"
    """wins: the query beats the run's vocabulary and the canonical negatives (no threshold); absolute: LERF
    relevancy against the canonical negatives above `threshold` (the old rule)."""
    threshold: float = DEFAULT_THRESHOLD
    """absolute only: the relevancy a Gaussian must exceed."""
    knn: int = DEFAULT_KNN
    """wins only: smooth each Gaussian's feature over its knn nearest Gaussians, weighted by their supervision
    (0 = each Gaussian's own feature)."""

    def check(self) -> None:
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"selection rule must be one of {', '.join(SELECTION_MODES)}, got {self.mode!r}")
        if isinstance(self.knn, bool) or not isinstance(self.knn, int) or self.knn < 0:
            raise ValueError(f"the selection's kNN smoothing needs a neighbour count >= 0 (0 = off), got {self.knn!r}")
        if self.mode == "absolute" and not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise ValueError(f"the absolute selection needs a finite relevancy threshold, got {self.threshold!r}")

    def describe(self) -> str:
        if self.mode == "absolute":
            return f"absolute: relevancy vs the canonical negatives > {self.threshold:g}"
        text = "wins: the query's cosine beats every other vocabulary prompt and canonical negative (no threshold)"
        if self.knn:
            text += f"; features smoothed over the {self.knn} nearest Gaussians, weighted by their supervision"
        return text


def competitor_texts(query: str, vocabulary: Sequence[str], negatives: Sequence[str]) -> List[str]:
    """The texts the query must beat: vocabulary then negatives, normalised, de-duplicated, the query removed."""
    own = normalize_text(query)
    out: List[str] = []
    for text in (*vocabulary, *negatives):
        norm = normalize_text(text)
        if norm and norm != own and norm not in out:
            out.append(norm)
    if not out:
        raise ValueError(f"the 'wins' selection of '{own}' has nothing to win against: the run records no other "
                         "class/prompt and no canonical negative (use --selection absolute, or train with a vocabulary)")
    return out


def smoothed_features(features: Tensor, means: Tensor, confidence: Tensor, knn: int, chunk: int = 4096) -> Tensor:
    """[G, D]: f'_i = sum over the `knn` nearest Gaussians j of i (by their centres `means` [G, 3], i itself
    included) of confidence[j] * f_j / |f_j| (zero features add nothing). A row is zero where no neighbour has
    a non-zero feature with positive confidence."""
    from scipy.spatial import cKDTree

    num = features.shape[0]
    k = min(int(knn), num)
    if k <= 1 or num == 0:
        return features
    xyz = means.detach().reshape(num, 3).double().cpu().numpy()
    _, neighbours = cKDTree(xyz).query(xyz, k=k, workers=-1)
    neighbours = torch.as_tensor(neighbours, device=features.device).reshape(num, k)
    unit = F.normalize(features.detach().float(), dim=-1) * confidence.detach().float().reshape(num, 1).to(features.device)
    out = torch.empty(num, features.shape[1], dtype=torch.float32, device=features.device)
    for start in range(0, num, chunk):
        out[start:start + chunk] = unit[neighbours[start:start + chunk]].sum(1)
    return out.to(features.dtype)


def selection_features(model, knn: int) -> Tuple[Tensor, Tensor]:
    """(features the 'wins' rule compares [G, D], Gaussians it may select [G] bool: non-zero own feature). With
    knn > 0 the features are smoothed_features over the model's Gaussians weighted by model.gaussian_confidence;
    cached on the model for its current Gaussians (a query session or an evaluation asks many texts)."""
    with torch.no_grad():
        features = model.gaussian_features.detach()
        own = features.abs().amax(-1) > 0
        if not knn:
            return features, own
        # keyed on the stored parameters, not on `features` (a fresh upcast / masked copy at every call)
        params = getattr(model, "gauss_params", None)
        table = params[FEATURE_PARAM] if params is not None and FEATURE_PARAM in params else features
        key = (int(knn), features.shape[0], model.means.data_ptr(), model.means._version, table.data_ptr(),
               table._version, bool(getattr(model, "training", False)))
        cached = getattr(model, "_selection_features_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], own
        smooth = smoothed_features(features, model.means, model.gaussian_confidence, knn)
        model._selection_features_cache = (key, smooth)
        return smooth, own


def wins_mask(features: Tensor, query: Tensor, competitors: Tensor, chunk: int = 262_144,
              allowed: Optional[Tensor] = None) -> Tensor:
    """[G] bool: non-zero feature and cos(f, query) > max_j cos(f, competitors[j]) (features [G, D], query [D],
    competitors [J, D], J >= 1), and `allowed` [G] bool where given."""
    if competitors.ndim != 2 or competitors.shape[0] == 0:
        raise ValueError("the 'wins' selection needs at least one competitor embedding")
    q = F.normalize(query.to(features), dim=-1)
    c = F.normalize(competitors.to(features), dim=-1)
    out = []
    for start in range(0, features.shape[0], chunk):
        rows = features[start:start + chunk]
        f = F.normalize(rows, dim=-1)
        out.append((f @ q > (f @ c.T).amax(-1)) & (rows.abs().amax(-1) > 0))
    mask = torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=features.device)
    return mask if allowed is None else mask & allowed.to(mask.device)


CHUNK_ROWS = 262_144
FEATURE_PARAM = "clip_features"  # the table head's parameter (method/model.py; this layer cannot import it)


def feature_chunks(model, chunk: int = CHUNK_ROWS) -> Iterator[Tuple[int, Tensor]]:
    """(start, float32 [<= chunk, D]) blocks of the model's per-Gaussian features, in order: the model's own
    `gaussian_feature_chunks` where it has one (the table head upcasts and masks one block at a time: no [N, D]
    float32 copy), else slices of `gaussian_features`."""
    chunks = getattr(model, "gaussian_feature_chunks", None)
    if chunks is not None:
        yield from chunks(chunk)
        return
    features = model.gaussian_features.detach()
    for start in range(0, features.shape[0], chunk):
        yield start, features[start:start + chunk].float()


def _chunked(model, fn, chunk: int) -> Tensor:
    with torch.no_grad():
        out = [fn(rows) for _, rows in feature_chunks(model, chunk)]
    return torch.cat(out) if out else torch.zeros(0)


def gaussian_relevancy(model, text: str, chunk: int = CHUNK_ROWS) -> Tensor:
    """[G] LERF relevancy of every Gaussian's feature to `text` against the canonical negatives (the old rule's
    score; also written into the query PLY). Block by block (`feature_chunks`)."""
    with torch.no_grad():
        embeddings = model.text_encoder.encode([text, *model.config.relevancy_negatives]).float()
    return _chunked(model, lambda rows: relevancy(rows, embeddings[0].to(rows), embeddings[1:].to(rows)), chunk)


def select_by_rule(model, text: str, rule: SelectionRule, chunk: int = CHUNK_ROWS) -> Tensor:
    """[G] bool: the Gaussians `text` selects under `rule` (no opacity cut). Block by block (`feature_chunks`)."""
    rule.check()
    if rule.mode == "absolute":
        return gaussian_relevancy(model, text, chunk) > rule.threshold
    competitors = competitor_texts(text, model.class_names, model.config.relevancy_negatives)
    with torch.no_grad():
        embeddings = model.text_encoder.encode([text, *competitors]).float()
    if not rule.knn:  # each Gaussian's own feature: block by block, no [N, D] float32 copy
        return _chunked(model, lambda rows: wins_mask(rows, embeddings[0].to(rows), embeddings[1:].to(rows), chunk),
                        chunk).bool()
    features, own = selection_features(model, rule.knn)  # the smoothing reads every neighbour: one [N, D] copy
    with torch.no_grad():
        return wins_mask(features, embeddings[0].to(features), embeddings[1:].to(features), allowed=own)
