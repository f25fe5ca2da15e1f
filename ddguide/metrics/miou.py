"""Mean intersection over union of class masks: the one mIoU of heads (``val_miou``), the oracles and the
benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np


def miou(pred: Any, target: Any, num_classes: int) -> float:
    """Mean over classes of intersection / union, pooled over every pixel given (arrays or tensors of class ids,
    any shape) and counting only the classes present in the prediction or the target."""
    pred, target = _ids(pred), _ids(target)
    inter = np.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    area_p = np.bincount(pred, minlength=num_classes)[:num_classes]
    area_t = np.bincount(target, minlength=num_classes)[:num_classes]
    union = area_p + area_t - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def _ids(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().cpu().numpy()
    return np.asarray(values).ravel().astype(np.int64)
