"""The default 3D selection rule recomputed independently (numpy, brute-force neighbours) for the tests of its
consumers: `qsplat query`, eval-scannet's 3D selection and the opengaussian-3d protocol."""

import numpy as np
import torch

KNN = 32  # the default of qrender_ns.features.selection and of every verb's --selection-knn
_NEIGHBOURS: dict = {}  # the last brute-force search: a test asks many texts of the same Gaussians


def _nearest(xyz: np.ndarray, k: int) -> np.ndarray:
    """[G, k] indices of each point's k nearest points (itself included), by brute force over all pairs."""
    key = (xyz.shape, k, hash(xyz.tobytes()))
    if key not in _NEIGHBOURS:
        out = np.empty((len(xyz), k), dtype=np.int64)
        for start in range(0, len(xyz), 256):  # 256 x G distances at a time
            d2 = ((xyz[start:start + 256, None, :] - xyz[None, :, :]) ** 2).sum(-1)
            out[start:start + 256] = np.argpartition(d2, k - 1, axis=1)[:, :k]
        _NEIGHBOURS.clear()
        _NEIGHBOURS[key] = out
    return _NEIGHBOURS[key]


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
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300) * weight[:, None]
        nearest = _nearest(xyz, min(knn, len(xyz)))
        feats = unit[nearest].sum(1)
    cos = feats @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
    return (cos[:, 0] > cos[:, 1:].max(1)) & (np.abs(feats).max(1) > 0) & own
