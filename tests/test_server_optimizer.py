"""Server optimisers (FedAvgM, FedAdam) take their step on the round's weighted mean,
the same whether the strategy sees each site's update or, under SecAgg+, the secure
mean in every result; a round with nothing to aggregate is not a step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitins

from common.message_keys import Keys
from server.optimizer import FEDADAM_BETA_2, FEDADAM_TAU, build_strategy, describe
from server.strategy import SiteAwareStrategy

SHAPES = [(3, 4), (4,)]
COUNTS = {"site0": 30, "site1": 50, "site2": 20}


def _arrays(rng, scale=1.0) -> list[np.ndarray]:
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def _res(arrays_or_params, n: int, site: str, refused: str = ""):
    params = arrays_or_params if not isinstance(arrays_or_params, list) \
        else ndarrays_to_parameters(arrays_or_params)
    metrics = {Keys.SITE: site, Keys.REFUSED: refused}
    return SimpleNamespace(cid=site), FitRes(Status(Code.OK, ""), params, n, metrics)


def _mean(updates: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    total = sum(COUNTS[s] for s in updates)
    return [sum(COUNTS[s] / total * u[k].astype(np.float64) for s, u in updates.items())
            for k in range(len(SHAPES))]


def plain_results(updates):
    """The default fit workflow: each site's own update and example count."""
    return [_res(u, COUNTS[s], s) for s, u in updates.items()]


def secagg_results(updates, refusing: str = ""):
    """What SecAggPlusWorkflow.unmask_stage hands aggregate_fit in Flower 1.42: one
    result per site that answered, each with the site's clear num_examples and
    metrics, and all sharing one Parameters object, the dequantised secure mean
    (float64). A refusing site sent a zero update of weight 0."""
    mean = ndarrays_to_parameters(_mean(updates))
    out = [_res(mean, COUNTS[s], s) for s in updates]
    if refusing:
        out.append(_res(mean, 0, refusing, refused="budget spent"))
    return out


def _wrapped(name, lr, momentum, initial, rows: list | None = None):
    """As server/app.py builds it; the recorder's rows (phase, round, rows) go to `rows`."""
    inner = build_strategy(name, lr, momentum,
                           initial_parameters=ndarrays_to_parameters(initial))
    rows = [] if rows is None else rows
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: rows.append(row))
    strategy.initialize_parameters(client_manager=None)
    return strategy


def fedadam_reference(x0, means, eta, beta_1, beta_2=FEDADAM_BETA_2, tau=FEDADAM_TAU):
    """FedAdam by hand, Flower's bias correction with t+1 at step t = 1, 2, ..."""
    x = [a.astype(np.float64) for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    out = []
    for t, mean in enumerate(means, start=1):
        d = [a - b for a, b in zip(mean, x)]
        m = [beta_1 * a + (1 - beta_1) * b for a, b in zip(m, d)]
        v = [beta_2 * a + (1 - beta_2) * b * b for a, b in zip(v, d)]
        eta_t = eta * np.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))
        x = [a + eta_t * b / (np.sqrt(c) + tau) for a, b, c in zip(x, m, v)]
        out.append(x)
    return out


def fedavgm_reference(x0, means, lr, momentum):
    x, mom, out = [a.astype(np.float64) for a in x0], None, []
    for mean in means:
        g = [a - b for a, b in zip(x, mean)]
        mom = g if mom is None else [momentum * a + b for a, b in zip(mom, g)]
        x = [a - lr * b for a, b in zip(x, mom)]
        out.append(x)
    return out


def _rounds(seed=0, n=3):
    rng = np.random.default_rng(seed)
    x0 = _arrays(rng)
    # each round every site moves the adapter by a different, smallish amount
    return x0, [{s: [a + b for a, b in zip(x0, _arrays(rng, 0.05 * (r + 1)))] for s in COUNTS}
                for r in range(n)]


def _assert_close(got, expected):
    for g, e in zip(parameters_to_ndarrays(got), expected):
        assert g.dtype == np.float32  # the global keeps the adapter's dtype
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [plain_results, secagg_results])
def test_fedadam_steps_on_the_weighted_mean_plain_or_secure(shape):
    x0, rounds = _rounds()
    strategy = _wrapped("fedadam", 0.05, 0.9, x0)
    expected = fedadam_reference(x0, [_mean(u) for u in rounds], eta=0.05, beta_1=0.9)
    for r, (updates, want) in enumerate(zip(rounds, expected), start=1):
        got, _ = strategy.aggregate_fit(r, shape(updates), [])
        _assert_close(got, want)
    # and it is a real server step, not the mean FedAvg would have taken
    last_mean = _mean(rounds[-1])
    assert not np.allclose(parameters_to_ndarrays(got)[0], last_mean[0], atol=1e-3)


@pytest.mark.parametrize("shape", [plain_results, secagg_results])
def test_fedavgm_steps_on_the_weighted_mean_plain_or_secure(shape):
    x0, rounds = _rounds(seed=1)
    strategy = _wrapped("fedavgm", 0.7, 0.9, x0)
    expected = fedavgm_reference(x0, [_mean(u) for u in rounds], lr=0.7, momentum=0.9)
    for r, (updates, want) in enumerate(zip(rounds, expected), start=1):
        got, _ = strategy.aggregate_fit(r, shape(updates), [])
        _assert_close(got, want)


def test_fedavg_under_secagg_is_the_secure_mean():
    x0, rounds = _rounds(seed=2, n=1)
    strategy = _wrapped("fedavg", 1.0, 0.9, x0)
    got, _ = strategy.aggregate_fit(1, secagg_results(rounds[0]), [])
    _assert_close(got, _mean(rounds[0]))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_round_with_nothing_to_aggregate_is_not_a_server_step(name):
    """Round 1: every site refuses. FedAvgM would assert on a missing momentum in round
    2 and FedAdam would correct its bias for the wrong step if the round counted."""
    x0, rounds = _rounds(seed=3, n=2)
    rows = []
    strategy = _wrapped(name, 0.5, 0.9, x0, rows)
    refused = [_res(x0, 0, s, refused="budget spent") for s in COUNTS]
    assert strategy.aggregate_fit(1, refused, []) == (None, {})
    means = [_mean(u) for u in rounds]
    reference = (fedadam_reference(x0, means, eta=0.5, beta_1=0.9) if name == "fedadam"
                 else fedavgm_reference(x0, means, lr=0.5, momentum=0.9))
    got, _ = strategy.aggregate_fit(2, secagg_results(rounds[0], refusing="site9"), [])
    _assert_close(got, reference[0])
    # a NaN update in the clear is rejected whole and leaves the optimiser's state alone
    bad = plain_results(rounds[1])
    bad[0][1].parameters = ndarrays_to_parameters([np.full(s, np.nan, np.float32)
                                                   for s in SHAPES])
    got, _ = strategy.aggregate_fit(3, bad, [])
    survivors = {s: u for s, u in rounds[1].items() if s != "site0"}
    reference = (fedadam_reference(x0, [means[0], _mean(survivors)], eta=0.5, beta_1=0.9)
                 if name == "fedadam" else
                 fedavgm_reference(x0, [means[0], _mean(survivors)], lr=0.5, momentum=0.9))
    _assert_close(got, reference[1])
    status = {(r, row[Keys.SITE]): row["status"] for _, r, rows_ in rows for row in rows_}
    assert status[(1, "site0")] == "refused" and status[(2, "site9")] == "refused"
    assert status[(3, "site0")].startswith("rejected: tensor 0 has NaN")
    assert strategy.steps == 2


@pytest.mark.parametrize("name, rule", [("fedavg", "mean"), ("fedavgm", "mean"),
                                        ("fedadam", "mean"), ("fedavg", "trimmed_mean"),
                                        ("fedavg", "median"), ("fedavg", "krum")])
def test_every_fedavg_argument_reaches_the_strategy(name, rule):
    def evaluate_fn(*_):
        return None

    def fit_config(_):
        return {}

    def mean_fn(_):
        return {}

    s = build_strategy(name, 0.1, 0.5, aggregation=rule, fraction_fit=0.5, fraction_evaluate=1.0,
                       min_fit_clients=3, min_evaluate_clients=3, min_available_clients=3,
                       initial_parameters=ndarrays_to_parameters([np.zeros(2, np.float32)]),
                       on_fit_config_fn=fit_config, on_evaluate_config_fn=fit_config,
                       evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=mean_fn,
                       evaluate_metrics_aggregation_fn=mean_fn)
    assert (s.fraction_fit, s.min_fit_clients, s.min_available_clients) == (0.5, 3, 3)
    assert s.evaluate_fn is evaluate_fn and s.on_fit_config_fn is fit_config
    assert s.fit_metrics_aggregation_fn is mean_fn is s.evaluate_metrics_aggregation_fn
    assert s.initial_parameters is not None
    if rule == "krum":  # its median fallback aggregates the sites' metrics the same way
        assert s.median.fit_metrics_aggregation_fn is mean_fn
    if rule != "mean":
        return
    mean = {"rule": "mean"}
    assert describe(s) == {
        "fedavg": {"name": "fedavg", "learning_rate": 1.0, "momentum": 0.0, "aggregation": mean},
        "fedavgm": {"name": "fedavgm", "learning_rate": 0.1, "momentum": 0.5,
                    "aggregation": mean},
        "fedadam": {"name": "fedadam", "learning_rate": 0.1, "momentum": 0.5,
                    "beta_2": FEDADAM_BETA_2, "tau": FEDADAM_TAU, "aggregation": mean}}[name]


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="one of fedavg, fedavgm, fedadam.*'sgd'"):
        build_strategy("sgd", 1.0, 0.0)
    with pytest.raises(ValueError, match="'fedadam' needs initial_parameters"):
        build_strategy("fedadam", 0.1, 0.9)


# ---- end to end: a real Flower simulation, SecAgg+ on, FedAdam ----

class CaptureGlobal:
    """A mod inside SecAgg+: keeps the global adapter each site is sent to train from."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        content = msg.content
        if msg.metadata.message_type == "train" and "fitins.parameters" in content.array_records:
            arrays = parameters_to_ndarrays(recorddict_to_fitins(content, True).parameters)
            site = f"site{context.node_config['partition-id']}"
            np.savez(self.folder / f"global-{site}.npz", *arrays)
        return call_next(msg, context)


@pytest.mark.slow
def test_fedadam_under_secagg_takes_the_server_step_on_the_secure_mean(tiny_model, tmp_path):
    from simulations.run import simulate
    from tests.conftest import tiny_config
    from tests.test_secure_aggregation import (MAX_WEIGHT, CaptureUpdates, _files,
                                               _global_adapter, _tolerance, _weighted_mean)

    sites = ["site0", "site1", "site2"]
    capture = tmp_path / "capture"
    capture.mkdir()
    eta, beta_1 = 0.05, 0.9
    cfg = tiny_config(tiny_model, _files(tmp_path, 3),
                      federation={"num_rounds": 1, "min_sites": 3,
                                  "secure_aggregation": "on", "secagg_max_weight": MAX_WEIGHT,
                                  "server_optimizer": "fedadam",
                                  "server_learning_rate": eta, "server_momentum": beta_1},
                      simulation={"num_sites": 3})
    run = simulate(cfg, tmp_path / "run",
                   client_mods=[CaptureGlobal(capture), CaptureUpdates(capture)])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["secure_aggregation"]["rounds"] == {"1": True}
    assert summary["server_optimizer"] == {"name": "fedadam", "learning_rate": eta,
                                           "momentum": beta_1, "beta_2": FEDADAM_BETA_2,
                                           "tau": FEDADAM_TAU, "aggregation": {"rule": "mean"}}

    with np.load(capture / "global-site0.npz", allow_pickle=False) as data:
        x0 = [data[f"arr_{i}"] for i in range(len(data.files))]
    mean = _weighted_mean(capture, sites)
    [expected] = fedadam_reference(x0, [mean], eta=eta, beta_1=beta_1)
    # the secure mean is off by at most `tol` per value; FedAdam's step
    # c·Δ/(b|Δ|+τ) with c = η·√(1-β2²)/(1-β1²)·(1-β1) moves by at most c/τ per unit of Δ
    c = eta * np.sqrt(1 - FEDADAM_BETA_2 ** 2) / (1 - beta_1 ** 2) * (1 - beta_1)
    tol = c / FEDADAM_TAU * _tolerance(capture, sites) + 1e-6  # + float32 rounding
    got = _global_adapter(run, tiny_model)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=tol, rtol=0)
    moved = max(float(np.abs(g - m).max()) for g, m in zip(got, mean))
    assert moved > 100 * tol  # FedAdam's step, visibly not FedAvg's mean


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
@pytest.mark.parametrize("shape", [plain_results, secagg_results])
def test_arrays_frozen_in_a_round_come_back_exactly_as_sent(name, shape):
    """A head round must not move the LoRA tensors: quantisation and float averaging
    would nudge them, and every site's cached encoder features would go stale."""
    rng = np.random.default_rng(3)
    initial = _arrays(rng)
    inner = build_strategy(name, 0.05, 0.9, initial_parameters=ndarrays_to_parameters(initial))
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: None,
                                 frozen=lambda r: [0] if r == 1 else [])
    strategy.initialize_parameters(client_manager=None)
    manager = SimpleNamespace(num_available=lambda: 3, wait_for=lambda *a, **k: True,
                              sample=lambda *a, **k: [])
    strategy.configure_fit(1, ndarrays_to_parameters(initial), manager)
    updates = {s: [np.zeros((0,), np.float32), _arrays(rng)[1]] for s in COUNTS}
    params, _ = strategy.aggregate_fit(1, shape(updates), [])
    out = parameters_to_ndarrays(params)
    assert np.array_equal(out[0], initial[0])  # bit for bit
    assert not np.allclose(out[1], initial[1])  # the head moved
    strategy.configure_fit(2, params, manager)  # round 2 freezes nothing: a full update
    full = {s: [initial[0] + 1e-2 * rng.standard_normal(SHAPES[0]).astype(np.float32),
                u[1]] for s, u in updates.items()}
    params, _ = strategy.aggregate_fit(2, shape(full), [])
    assert not np.array_equal(parameters_to_ndarrays(params)[0], initial[0])
    rows: list = []
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: rows.append(row),
                                 frozen=lambda r: [0] if r == 3 else [])
    strategy.configure_fit(3, params, manager)
    strategy.aggregate_fit(3, plain_results(full), [])  # a full tensor where none belongs
    assert {r["status"] for r in rows[-1][2]} == {
        "rejected: tensor 0 has shape (3, 4), expected (0,)"}
