"""Classification metrics over predicted probabilities: one function, plain floats."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, recall_score, roc_auc_score


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int,
                           ece_bins: int = 15) -> dict[str, float]:
    """accuracy, macro recall / F1 over all classes, macro one-vs-rest AUROC over the
    classes present (a class with no positive or no negative has no AUROC), and the
    expected calibration error of the top-1 probability.

    probs: (N, C) rows summing to 1; labels: (N,) ints in [0, C).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("metrics need at least one example")
    pred = probs.argmax(axis=1)
    classes = list(range(num_classes))
    present = [c for c in classes if 0 < (labels == c).sum() < len(labels)]
    auroc = float("nan")
    if present:
        onehot = labels[:, None] == np.asarray(present)[None, :]
        auroc = float(roc_auc_score(onehot, probs[:, present], average="macro"))
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_recall": float(recall_score(labels, pred, labels=classes, average="macro",
                                           zero_division=0)),
        "macro_f1": float(f1_score(labels, pred, labels=classes, average="macro",
                                   zero_division=0)),
        "macro_auroc": auroc,
        "ece": expected_calibration_error(probs, labels, ece_bins),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Σ_b (|b|/N) |accuracy(b) - confidence(b)| over equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def weighted_mean(pairs) -> dict[str, float]:
    """Example-weighted mean of every numeric value in `pairs` of (n, {name: value}).
    A site that lacks a value (e.g. no AUROC when it saw one class) is left out of
    that value's mean rather than counted as 0."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, values in pairs:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + n * float(value)
                weights[key] = weights.get(key, 0.0) + n
    return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}


def class_counts(pred: np.ndarray, labels: np.ndarray, num_classes: int,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """(3, C): per class, the true positives, the records (support) and the predictions.
    Adding or removing one record moves one support, one prediction and at most one
    true positive by 1: L2 sensitivity √3. With `weights` (each record's, ≥ 0), the
    weighted counts: a group of records whose weights sum to at most 1 moves each of
    the three rows by at most 1 in L1, hence in L2, so the group's sensitivity is √3."""
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    hit = pred == labels
    return np.stack([np.bincount(labels[hit], weights=w[hit], minlength=num_classes),
                     np.bincount(labels, weights=w, minlength=num_classes),
                     np.bincount(pred, weights=w, minlength=num_classes)]).astype(np.float64)


def count_metrics(counts: np.ndarray) -> dict[str, float]:
    """accuracy, macro recall and macro F1 over all classes from class_counts, exact or
    noisy, as classification_metrics computes them (a class with no records or no
    predictions scores 0). Noisy counts are used as they are (unbiased) where they are
    summed, floored at 0 inside a ratio, and a noisy total below 1 counts as 1."""
    tp, support, predicted = np.asarray(counts, dtype=np.float64)
    total = max(support.sum(), 1.0)
    tp_c, support_c, predicted_c = (np.clip(v, 0.0, None) for v in (tp, support, predicted))
    recall = np.divide(np.minimum(tp_c, support_c), support_c, out=np.zeros_like(tp),
                       where=support_c >= 1)
    precision = np.divide(np.minimum(tp_c, predicted_c), predicted_c, out=np.zeros_like(tp),
                          where=predicted_c >= 1)
    denom = recall + precision
    f1 = np.divide(2 * recall * precision, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"accuracy": float(np.clip(tp.sum() / total, 0.0, 1.0)),
            "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean())}
