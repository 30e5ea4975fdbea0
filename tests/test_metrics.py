"""Metric values on cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import classification_metrics, expected_calibration_error, weighted_mean


def test_metrics_on_a_hand_computed_case():
    # truth 0,0,1,2 ; predicted 0,1,1,2  -> accuracy 3/4
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 0, 1, 2])
    m = classification_metrics(probs, labels, 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # recall per class: 1/2, 1, 1 -> 5/6 ; precision 1, 1/2, 1 ; F1 2/3, 2/3, 1 -> 7/9
    assert m["macro_recall"] == pytest.approx(5 / 6)
    assert m["macro_f1"] == pytest.approx(7 / 9)
    assert 0.5 < m["macro_auroc"] <= 1.0


def test_expected_calibration_error_of_a_confident_wrong_model():
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, np.array([1, 1])) == pytest.approx(0.9)
    assert expected_calibration_error(probs, np.array([0, 0])) == pytest.approx(0.1)


def test_weighted_mean_leaves_out_sites_without_a_value():
    out = weighted_mean([(10, {"acc": 0.5, "auroc": 0.8}), (30, {"acc": 0.9}),
                         (5, {"acc": float("nan"), "name": "x", "ok": True})])
    assert out["acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert out["auroc"] == pytest.approx(0.8)  # not (10*0.8 + 30*0)/40
    assert set(out) == {"acc", "auroc"}


def test_metrics_from_class_counts_equal_the_metrics_from_predictions():
    from common.metrics import class_counts, count_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 300)
    labels[labels == 4] = 3  # class 4 has no records, and is never predicted right
    probs = rng.dirichlet(np.ones(5), 300)
    probs[np.arange(300), labels] += rng.random(300)  # better than chance, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    exact = classification_metrics(probs, labels, 5)
    counts = class_counts(probs.argmax(axis=1), labels, 5)
    assert counts.shape == (3, 5) and counts[1].sum() == 300
    got = count_metrics(counts)
    for name in ("accuracy", "macro_recall", "macro_f1"):
        assert got[name] == pytest.approx(exact[name], abs=1e-12)
    # one record more moves one support, one prediction, at most one true positive
    more = class_counts(np.append(probs.argmax(axis=1), 2), np.append(labels, 2), 5)
    assert np.linalg.norm(more - counts) == pytest.approx(np.sqrt(3))
    # noise can push a small set's counts below zero: the metrics stay defined, in [0, 1]
    noisy = count_metrics(counts - 400)
    assert all(0.0 <= v <= 1.0 for v in noisy.values()) and len(noisy) == 3
