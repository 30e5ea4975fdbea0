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
