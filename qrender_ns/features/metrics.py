"""Metrics shared by ns-eval (the model) and train-gsnet's evaluation."""

from __future__ import annotations

from torch import Tensor


def mean_class_iou(prediction: Tensor, truth: Tensor) -> float:
    """Mean IoU over the classes present in `truth` (0 = none, not a class); NaN when none is present."""
    ious = []
    for cls in truth.unique():
        if int(cls) == 0:
            continue
        pred_c, true_c = prediction == cls, truth == cls
        ious.append(float((pred_c & true_c).sum()) / float((pred_c | true_c).sum()))
    return sum(ious) / len(ious) if ious else float("nan")
