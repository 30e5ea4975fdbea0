"""Robust aggregation: with one of five sites sending a scaled or sign-flipped update,
the weighted mean is dragged far away while trimmed mean, median and Krum stay with
the honest sites; Krum sets its counts per round and falls back to the median when
too few updates arrive. Expected values are computed here with numpy, not read from
the implementation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from common.keys import Keys
from server.optimizer import build_strategy, describe
from server.strategy import SiteAwareStrategy

SHAPES = [(3, 4), (4,)]
COUNTS = {"site0": 40, "site1": 30, "site2": 50, "site3": 20, "site4": 60}
ATTACKER = "site0"
ATTACKS = {"scaled x100": 100.0, "sign-flipped x-100": -100.0}


def _res(arrays: list[np.ndarray], site: str, n: int | None = None):
    metrics = {Keys.SITE: site, Keys.REFUSED: ""}
    return SimpleNamespace(cid=site), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays),
                                             COUNTS[site] if n is None else n, metrics)


def _round(factor: float, seed: int = 0):
    """(global adapter, {site: adapter}): every site moves the global by a shared step
    plus its own small deviation; the attacker sends `factor` times its own move."""
    rng = np.random.default_rng(seed)
    x0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    step = [0.1 * rng.standard_normal(s) for s in SHAPES]
    sites = {}
    for site in COUNTS:
        move = [d + 0.01 * rng.standard_normal(d.shape) for d in step]
        scale = factor if site == ATTACKER else 1.0
        sites[site] = [(x + scale * m).astype(np.float32) for x, m in zip(x0, move)]
    return x0, sites


def _aggregate(rule: str, x0, sites: dict, faulty_share: float = 0.2):
    """One round through the server wrapper, as server/app.py builds it."""
    inner = build_strategy("fedavg", 1.0, 0.0, aggregation=rule, faulty_share=faulty_share,
                           initial_parameters=ndarrays_to_parameters(x0))
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: None)
    strategy.initialize_parameters(client_manager=None)
    params, _ = strategy.aggregate_fit(1, [_res(a, s) for s, a in sites.items()], [])
    return [a.astype(np.float64) for a in parameters_to_ndarrays(params)], inner


def _weighted_mean(sites: dict) -> list[np.ndarray]:
    total = sum(COUNTS[s] for s in sites)
    return [sum(COUNTS[s] / total * a[k].astype(np.float64) for s, a in sites.items())
            for k in range(len(SHAPES))]


def _stack(sites: dict, k: int) -> np.ndarray:
    return np.stack([a[k].astype(np.float64) for a in sites.values()])


def _median(sites: dict) -> list[np.ndarray]:
    return [np.median(_stack(sites, k), axis=0) for k in range(len(SHAPES))]


def _trimmed(sites: dict, cut: int) -> list[np.ndarray]:
    return [np.sort(_stack(sites, k), axis=0)[cut:len(sites) - cut].mean(axis=0)
            for k in range(len(SHAPES))]


def _close(got: list[np.ndarray], want: list[np.ndarray], what: str = "") -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=what)


def _gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("attack", ATTACKS)
def test_one_poisoned_site_drags_the_mean_but_not_the_robust_rules(attack):
    x0, sites = _round(ATTACKS[attack])
    honest = {s: a for s, a in sites.items() if s != ATTACKER}
    target = _weighted_mean(honest)
    # per coordinate, how far the honest sites themselves lie from their mean
    spread = max(float(np.abs(_stack(honest, k) - target[k]).max()) for k in range(len(SHAPES)))
    assert spread < 0.1  # a tight honest cluster, so the tolerance below means something

    mean, _ = _aggregate("mean", x0, sites)
    _close(mean, _weighted_mean(sites))
    assert _gap(mean, target) > 20 * spread  # the attack works on the plain mean

    expected = {"median": _median(sites), "trimmed_mean": _trimmed(sites, cut=1),
                "krum": target}  # multi-Krum keeps n - f = 4: exactly the honest sites
    for rule, want in expected.items():
        got, _ = _aggregate(rule, x0, sites)
        _close(got, want, rule)
        assert _gap(got, target) <= spread + 1e-5, rule
        for k in range(len(SHAPES)):  # inside the honest sites' range, coordinate by coordinate
            assert (got[k] >= _stack(honest, k).min(axis=0) - 1e-5).all(), rule
            assert (got[k] <= _stack(honest, k).max(axis=0) + 1e-5).all(), rule


def test_median_and_trimmed_mean_give_a_claimed_example_count_no_pull():
    """A site claiming 10x the examples moves the weighted mean, not these rules."""
    x0, sites = _round(1.0, seed=4)
    results = [_res(a, s, n=10 * COUNTS[s] if s == "site4" else None) for s, a in sites.items()]
    for rule, want in (("median", _median(sites)), ("trimmed_mean", _trimmed(sites, cut=1))):
        inner = build_strategy("fedavg", 1.0, 0.0, aggregation=rule)
        params, _ = inner.aggregate_fit(1, results, [])
        _close(parameters_to_ndarrays(params), want, rule)


def test_krum_sets_its_counts_from_the_round_and_falls_back_to_the_median(caplog):
    x0, sites = _round(100.0, seed=1)
    # five updates, 20% faulty: f = 1, 5 > 2f + 2, the four closest are averaged
    got, inner = _aggregate("krum", x0, sites)
    assert (inner.num_malicious_clients, inner.num_clients_to_keep) == (1, 4)
    # a site dropped out: four updates, f = floor(0.8) = 0, all four averaged (and logged)
    four = {s: a for s, a in sites.items() if s != "site4"}
    with caplog.at_level(logging.WARNING, logger="fedcare.server"):
        got, inner = _aggregate("krum", x0, four)
    _close(got, _weighted_mean(four))
    assert "no whole site" in caplog.text
    # 40% faulty of five: f = 2 and 5 <= 2f + 2, so Krum's bound fails: the median
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedcare.server"):
        got, inner = _aggregate("krum", x0, sites, faulty_share=0.4)
    _close(got, _median(sites))
    assert "more than 2f + 2 = 6 updates" in caplog.text
    assert describe(inner)["aggregation"] == {"rule": "krum", "faulty_share": 0.4,
                                              "median_steps": 1}


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "krum"])
def test_a_robust_rule_keeps_frozen_arrays_exactly_as_sent(rule):
    """In a head round the LoRA tensors arrive empty; the wrapper fills them from the
    global it sent before the rule sees them, and they come back bit for bit."""
    x0, sites = _round(1.0, seed=2)
    inner = build_strategy("fedavg", 1.0, 0.0, aggregation=rule,
                           initial_parameters=ndarrays_to_parameters(x0))
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: None, frozen=lambda r: [0])
    strategy.initialize_parameters(client_manager=None)
    manager = SimpleNamespace(num_available=lambda: 5, wait_for=lambda *a, **k: True,
                              sample=lambda *a, **k: [])
    strategy.configure_fit(1, ndarrays_to_parameters(x0), manager)
    head_only = {s: [np.zeros((0,), np.float32), a[1]] for s, a in sites.items()}
    params, _ = strategy.aggregate_fit(1, [_res(a, s) for s, a in head_only.items()], [])
    out = parameters_to_ndarrays(params)
    assert np.array_equal(out[0], x0[0])
    assert not np.allclose(out[1], x0[1])


def test_describe_names_the_rule_and_its_parameter():
    assert describe(build_strategy("fedavg", 1.0, 0.0))["aggregation"] == {"rule": "mean"}
    assert describe(build_strategy("fedavg", 1.0, 0.0, aggregation="trimmed_mean",
                                   faulty_share=0.1)) == {
        "name": "fedavg", "learning_rate": 1.0, "momentum": 0.0,
        "aggregation": {"rule": "trimmed_mean", "cut_each_end": 0.1}}
    assert describe(build_strategy("fedavg", 1.0, 0.0, aggregation="median"))[
        "aggregation"] == {"rule": "median"}
    assert describe(build_strategy("fedavg", 1.0, 0.0, aggregation="krum"))[
        "aggregation"] == {"rule": "krum", "faulty_share": 0.2, "median_steps": 0}


def test_builder_refuses_a_robust_rule_it_cannot_apply():
    initial = ndarrays_to_parameters([np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match="needs 'fedavg' \\(got 'fedadam'\\)"):
        build_strategy("fedadam", 0.1, 0.9, aggregation="median", initial_parameters=initial)
    with pytest.raises(ValueError, match="one of mean, trimmed_mean, median, krum.*'mode'"):
        build_strategy("fedavg", 1.0, 0.0, aggregation="mode")
    with pytest.raises(ValueError, match="faulty_share must be in \\[0, 0.5\\) \\(got 0.5\\)"):
        build_strategy("fedavg", 1.0, 0.0, aggregation="krum", faulty_share=0.5)


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "krum"])
def test_every_fedavg_argument_reaches_the_robust_strategy(rule):
    def evaluate_fn(*_):
        return None

    def fit_config(_):
        return {}

    def mean_fn(_):
        return {}

    s = build_strategy("fedavg", 1.0, 0.0, aggregation=rule, fraction_fit=0.5,
                       min_fit_clients=5, min_evaluate_clients=5, min_available_clients=5,
                       initial_parameters=ndarrays_to_parameters([np.zeros(2, np.float32)]),
                       on_fit_config_fn=fit_config, on_evaluate_config_fn=fit_config,
                       evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=mean_fn,
                       evaluate_metrics_aggregation_fn=mean_fn)
    assert (s.fraction_fit, s.min_fit_clients, s.min_available_clients) == (0.5, 5, 5)
    assert s.evaluate_fn is evaluate_fn and s.on_fit_config_fn is fit_config
    assert s.fit_metrics_aggregation_fn is mean_fn is s.evaluate_metrics_aggregation_fn
    assert s.initial_parameters is not None
    if rule == "krum":  # its median fallback aggregates the sites' metrics the same way
        assert s.median.fit_metrics_aggregation_fn is mean_fn
