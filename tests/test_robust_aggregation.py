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

from common.message_keys import Keys
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
            for k in range(len(next(iter(sites.values()))))]


def _stack(sites: dict, k: int) -> np.ndarray:
    return np.stack([a[k].astype(np.float64) for a in sites.values()])


def _median(sites: dict) -> list[np.ndarray]:
    return [np.median(_stack(sites, k), axis=0) for k in range(len(next(iter(sites.values()))))]


def _trimmed(sites: dict, cut: int) -> list[np.ndarray]:
    """Per coordinate: sort the sites' values, drop `cut` at each end, average the rest."""
    return [np.sort(_stack(sites, k), axis=0)[cut:len(sites) - cut].mean(axis=0)
            for k in range(len(next(iter(sites.values()))))]


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


def test_with_noisy_honest_updates_the_coordinate_rules_lean_towards_the_attacker():
    """Why the benchmark's DP runs favour Krum: per coordinate the poisoned value is
    always cut, but so is the honest value at the *other* end, so the trimmed mean and
    the median keep the honest values nearest the attacker. With DP noise the honest
    spread is wide and that lean is large (about 0.3 spreads for 4 honest sites);
    multi-Krum drops the poisoned update whole and averages the four honest ones."""
    rng = np.random.default_rng(5)
    noise = 1.0  # the honest spread, as DP noise makes it
    sites = {s: [(0.1 + noise * rng.standard_normal(2000)).astype(np.float32)]
             for s in COUNTS}
    sites[ATTACKER] = [-100 * sites[ATTACKER][0]]
    results = [_res(a, s) for s, a in sites.items()]
    honest = _weighted_mean({s: a for s, a in sites.items() if s != ATTACKER})[0]
    side = np.sign(sites[ATTACKER][0] - honest)  # where the attacker pulls, per coordinate

    def lean(rule: str) -> float:  # mean shift towards the attacker, in spreads
        params, _ = build_strategy("fedavg", 1.0, 0.0, aggregation=rule).aggregate_fit(
            1, results, [])
        got = parameters_to_ndarrays(params)[0]
        return float(np.mean((got - honest) * side)) / noise

    assert lean("trimmed_mean") > 0.2 and lean("median") > 0.2
    assert lean("krum") == pytest.approx(0.0, abs=1e-6)
    assert lean("mean") > 10  # and the mean is simply dragged


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


# ---- end to end: a real Flower simulation, one of five sites poisoned ----
# (the poisoning mod is the benchmark's: site0 sends global - 50 x its own update)

class CaptureHonest:
    """Innermost mod: keeps the global each site was sent and the plain update it sends
    before any poisoning (npz files: the sites run in Ray actors)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        from flwr.compat.common.recorddict_compat import recorddict_to_fitins, recorddict_to_fitres

        out = call_next(msg, context)
        if msg.metadata.message_type == "train":
            site = f"site{context.node_config['partition-id']}"
            res = recorddict_to_fitres(out.content, True)
            np.savez(self.folder / f"sent-{site}.npz",
                     *parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters))
            np.savez(self.folder / f"{site}.npz", *parameters_to_ndarrays(res.parameters))
            (self.folder / f"{site}.json").write_text(json.dumps({"n": res.num_examples}))
        return out


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.slow
def test_one_poisoned_site_of_five_leaves_the_trimmed_mean_within_two_points(tiny_model, tmp_path):
    """One real run with the attack and the trimmed mean. In a single round the run
    without the attack would average exactly the updates the sites trained here, so the
    no-attack and the attacked mean are computed from the captured updates and tested
    on the same records, instead of paying each run's start-up again (and comparing
    across different training draws). A head round (cached features, a convex head,
    full batches) makes the honest updates settle, so two points is a fair bound."""
    from common.data import held_out
    from common.evaluation import encode, evaluate
    import torch

    from common.model import build_model, load_tokenizer, set_adapter_arrays
    from simulations.bench.robustness import POISON_FACTOR as POISON, PoisonSite
    from simulations.run import simulate
    from tests.conftest import LABELS, tiny_config, write_records
    from tests.test_secure_aggregation import _global_adapter

    sites = [f"site{i}" for i in range(5)]
    files = {"sites": [write_records(tmp_path / f"s{i}.csv", 400, seed=i) for i in range(5)],
             "test": write_records(tmp_path / "test.csv", 400, seed=99)}
    capture = tmp_path / "capture"
    capture.mkdir()
    cfg = tiny_config(tiny_model, files, privacy={"enabled": False},
                      train={"head_rounds": 1, "head_steps": 60, "head_learning_rate": 0.05,
                             "head_batch_size": 400},
                      federation={"num_rounds": 1, "min_sites": 5, "secure_aggregation": "off",
                                  "aggregation": "trimmed_mean"},
                      simulation={"num_sites": 5})
    run = simulate(cfg, tmp_path / "run",
                   client_mods=[PoisonSite(0, POISON), CaptureHonest(capture)])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["server_optimizer"]["aggregation"] == {"rule": "trimmed_mean",
                                                          "cut_each_end": 0.2}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # every update was accepted: the rule, not a rejection, kept the poison out
    assert {r["site"]: r["status"] for r in rows if r["phase"] == "train"} == {
        s: "accepted" for s in sites}

    sent = _load(capture / "sent-site0.npz")
    honest = {s: [u if u.size else g for u, g in zip(_load(capture / f"{s}.npz"), sent)]
              for s in sites}  # a head round sends the LoRA tensors empty: the global's
    weight = {s: json.loads((capture / f"{s}.json").read_text())["n"] for s in sites}
    poisoned = dict(honest, site0=[g + POISON * (u - g) for g, u in zip(sent, honest["site0"])])

    def mean(updates):
        total = sum(weight.values())
        return [sum(weight[s] / total * u[k].astype(np.float64) for s, u in updates.items())
                for k in range(len(sent))]

    got = _global_adapter(run, tiny_model)
    _close(got, _trimmed(poisoned, cut=1))  # FedTrimmedAvg on the wire, as by hand
    assert np.array_equal(got[0], sent[0])  # the LoRA tensors stayed as they were

    _, test = held_out(cfg.data)
    model = build_model(str(tiny_model), len(LABELS), cfg.lora, cfg.model.pooling)
    data = encode(test, load_tokenizer(str(tiny_model)), cfg.model.max_length)

    def accuracy(arrays) -> float:
        set_adapter_arrays(model, [a.astype(np.float32) for a in arrays])
        return evaluate(model, data, len(LABELS), torch.device("cpu"))["accuracy"]

    clean, attacked, robust = accuracy(mean(honest)), accuracy(mean(poisoned)), accuracy(got)
    assert robust == pytest.approx(summary["test"]["accuracy"])  # the server's own figure
    assert clean > 0.8  # the honest federation learned the task
    assert attacked < clean - 0.3  # the attack breaks the plain mean
    assert abs(robust - clean) <= 0.02, (clean, attacked, robust)


# ---- the benchmark's robustness section, on hand-made run records ----

def test_bench_judges_robust_rules_against_the_mean_without_attack(tmp_path):
    from simulations.bench import report, targets
    from simulations.bench.robustness import SETUPS, judge, summarize

    def runs(*f1s, error=None):
        return [{"seed": k, "accuracy": f1 + 0.05, "macro_f1": f1, "process_seconds": 200.0,
                 "error": error} for k, f1 in enumerate(f1s)]

    by_name = {s.name: s for s in SETUPS}
    configs = [summarize(by_name["mean"], runs(0.70, 0.72)),
               summarize(by_name["mean_attacked"], runs(0.05, 0.03)),
               summarize(by_name["median_attacked"], runs(0.66, 0.70)),        # 4, 2 below
               summarize(by_name["krum_attacked"], runs(0.69, 0.70))]           # 1, 2 below
    gaps = {g["name"]: g for g in judge(configs)}
    assert "mean" not in gaps  # the reference
    assert gaps["krum_attacked"]["gap_points"]["macro_f1"]["mean"] == pytest.approx(1.5)
    assert gaps["krum_attacked"]["status"] == targets.MET
    assert gaps["median_attacked"]["gap_points"]["macro_f1"]["mean"] == pytest.approx(3.0)
    assert gaps["median_attacked"]["status"] == targets.MISSED
    assert gaps["mean_attacked"]["gap_points"]["accuracy"]["mean"] == pytest.approx(67.0)
    assert gaps["mean_attacked"]["status"] == "shown, not judged"
    failed = [configs[0], summarize(by_name["krum_attacked"], runs(0.5, 0.5, error="exit 1"))]
    assert judge(failed)[0]["status"] == targets.NOT_RUN  # every run failed

    section = {"device": "cpu", "seeds": [0, 1], "overrides": {"simulation.num_sites": 5},
               "poison": {"site": "site0", "factor": -50.0}, "limit_points": 2.0,
               "configs": configs, "gaps": judge(configs)}
    text = "\n".join(report.render_robustness(section))
    assert "site0 sends global + -50 × its update" in text
    row = next(line for line in text.splitlines() if line.startswith("| median, 1 of 5"))
    assert "| 3.0 ± 1.4 |" in row and "| **missed** |" in row
    assert next(line for line in text.splitlines()
                if line.startswith("| mean, no attack")).count("reference") == 1
    report.write({"sections": {"robustness": section}}, tmp_path)
    assert (tmp_path / "robustness.png").stat().st_size > 0
