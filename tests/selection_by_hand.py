"""The default 3D selection rule recomputed independently (numpy, brute-force neighbours) for the tests of its
consumers: `qsplat query`, eval-scannet's 3D selection and the opengaussian-3d protocol."""

import numpy as np
import torch

KNN = 32  # the default of qrender_ns.features.selection and of every verb's --selection-knn
_NEIGHBOURS: dict = {}  # the last brute-force search: a test asks many texts of the same Gaussians
_SMOOTHED: dict = {}  # the last smoothed features (they do not depend on the text)


def _nearest(xyz: np.ndarray, k: int) -> np.ndarray:
    """[G, k] indices of each point's k nearest points (itself included), by brute force over all pairs (float64
    |a|^2 + |b|^2 - 2 a.b, 2048 rows at a time; not the k-d tree the product uses)."""
    key = (xyz.shape, k, hash(xyz.tobytes()))
    if key not in _NEIGHBOURS:
        x = torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float64))
        sq = (x * x).sum(1)
        out = np.empty((len(xyz), k), dtype=np.int64)
        for start in range(0, len(xyz), 2048):
            d2 = sq[start:start + 2048, None] + sq[None, :] - 2 * x[start:start + 2048] @ x.T
            out[start:start + 2048] = torch.topk(d2, k, dim=1, largest=False).indices.numpy()
        _NEIGHBOURS.clear()
        _NEIGHBOURS[key] = out
    return _NEIGHBOURS[key]


def _smoothed(feats: np.ndarray, weight: np.ndarray, xyz: np.ndarray, knn: int) -> np.ndarray:
    """[G, D]: the sum of the unit features of each Gaussian's knn nearest (itself included), each weighted by its
    supervision weight (1024 Gaussians at a time: no [G, knn, D] array)."""
    key = (knn, hash(feats.tobytes()), hash(weight.tobytes()), hash(xyz.tobytes()))
    if key not in _SMOOTHED:
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300) * weight[:, None]
        nearest = _nearest(xyz, min(knn, len(xyz)))
        out = np.empty_like(unit)
        for start in range(0, len(unit), 1024):
            out[start:start + 1024] = unit[nearest[start:start + 1024]].sum(1)
        _SMOOTHED.clear()
        _SMOOTHED[key] = out
    return _SMOOTHED[key]


def wins_by_hand(model, text: str, knn: int = KNN) -> np.ndarray:
    """[G] bool: the Gaussian's own feature is non-zero, and its feature smoothed over its `knn` nearest Gaussians
    (itself included; unit features weighted by the supervision weight accumulated in training, zero for never-
    supervised Gaussians) has a larger cosine with `text` than with every other vocabulary word and canonical
    negative."""
    was_training = model.training
    model.eval()  # never-supervised Gaussians read as zero features outside training
    with torch.no_grad():
        feats = model.gaussian_features.detach().numpy().astype(np.float64)
        weight = (model.feature_weight * model.feature_supervised).numpy().astype(np.float64)
        xyz = model.means.detach().numpy().astype(np.float64)
        words = [w for w in dict.fromkeys([*model.class_names, *model.config.relevancy_negatives]) if w != text]
        emb = model.text_encoder.encode([text, *words]).numpy().astype(np.float64)
    model.train(was_training)
    own = np.abs(feats).max(1) > 0
    if knn:
        feats = _smoothed(feats, weight, xyz, knn)
    cos = feats @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
    return (cos[:, 0] > cos[:, 1:].max(1)) & (np.abs(feats).max(1) > 0) & own
