"""GLUE metrics from model outputs: accuracy, F1, Matthews, Pearson/Spearman.

Keys match the names the Hugging Face GLUE metric uses (``accuracy``, ``f1``,
``matthews_correlation``, ``pearson``, ``spearmanr``), plus ``combined_score``, the mean of
the two numbers GLUE reports for MRPC, QQP and STS-B.

Degenerate inputs: a constant prediction has no correlation with anything, so Matthews,
Pearson and Spearman report 0.0 for it instead of NaN (NaN would poison best-checkpoint
comparisons; 0.0 is what a constant predictor deserves). Non-finite predictions are a
diverged model and raise ``NumericalError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stackcomp.data.glue import TaskSpec, get_task
from stackcomp.errors import DataError, NumericalError


def _array(values: Any, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu().numpy()
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what}: cannot be read as an array ({e})") from None


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y).statistic)


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics (``task.metrics``) for ``predictions`` against ``labels``.

    predictions: logits (N, C) for classification (integer class ids (N,) are accepted too),
    scores (N,) or (N, 1) for regression. labels: (N,) class ids or scores.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    preds = _array(predictions, "predictions")
    y = _array(labels, "labels").reshape(-1)
    if len(preds) != len(y):
        raise DataError(f"{spec.name}: {len(preds)} predictions for {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{spec.name}: no examples to score")
    if np.issubdtype(preds.dtype, np.floating) and not np.isfinite(preds).all():
        bad = int((~np.isfinite(preds)).sum())
        raise NumericalError(f"{spec.name}: {bad} predictions are NaN or infinite; the model output diverged")
    out: dict[str, float] = {}
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise DataError(f"{spec.name} is a regression task: expected predictions of shape (N,) or (N, 1), "
                            f"got {preds.shape}")
        x, y = preds.astype(np.float64), y.astype(np.float64)
        out["pearson"] = _correlation(pearsonr, x, y)
        out["spearmanr"] = _correlation(spearmanr, x, y)
        out["combined_score"] = (out["pearson"] + out["spearmanr"]) / 2
        return out
    if preds.ndim == 2:
        if preds.shape[1] != spec.num_labels:
            raise DataError(f"{spec.name} has {spec.num_labels} labels; predictions have shape {preds.shape}")
        classes = preds.argmax(axis=1)
    elif preds.ndim == 1 and np.issubdtype(preds.dtype, np.integer):
        classes = preds
    else:
        raise DataError(f"{spec.name}: expected logits (N, {spec.num_labels}) or integer class ids (N,), "
                        f"got {preds.dtype} {preds.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise DataError(f"{spec.name}: labels must be class ids, got non-integer values")
        y = y.astype(np.int64)
    if (y < 0).any() or (y >= spec.num_labels).any():
        raise DataError(f"{spec.name}: labels outside 0..{spec.num_labels - 1} "
                        "(test splits have label -1: they cannot be scored)")
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(y, classes))
        elif name == "f1":
            out[name] = float(f1_score(y, classes, average="binary", pos_label=1, zero_division=0.0))
        elif name == "matthews_correlation":
            constant = np.ptp(classes) == 0 or np.ptp(y) == 0
            out[name] = 0.0 if constant else float(matthews_corrcoef(y, classes))
    if "combined_score" in spec.metrics:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out
