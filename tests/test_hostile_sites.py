"""What a faulty or hostile site can send the server, hand-crafted, through the real
strategy, its checkpoint and the real run log: nothing crashes the run, nothing poisons
the average, and every rejection names the site and the reason."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import (Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)

from common.config import Config
from common.message_keys import Keys
from server import checkpoint
from server.optimizer import build_strategy
from server.rounds import NodeFailure
from server.run_log import RunRecorder
from server.strategy import SiteAwareStrategy

SHAPES = [(3, 4), (4,)]


def _strategy(record, optimizer="fedavg", **options):
    initial = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    inner = build_strategy(optimizer, 0.5, 0.9, initial_parameters=ndarrays_to_parameters(initial))
    strategy = SiteAwareStrategy(inner, SHAPES, record, **options)
    strategy.initialize_parameters(client_manager=None)
    return strategy


def _fit(node: str, site: str, value: float = 1.0, n: int = 10, dtype=np.float32, **metrics):
    arrays = [np.full(s, value, dtype=dtype) for s in SHAPES]
    return SimpleNamespace(cid=node), FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
        {Keys.SITE: site, Keys.REFUSED: "", **metrics})


def _rows(record: list, phase: str, round_no: int) -> dict:
    return {r[Keys.SITE]: r for p, got_round, rows in record if (p, got_round) == (phase, round_no)
            for r in rows}


def _global(params) -> float:
    return float(parameters_to_ndarrays(params)[1][0])


@pytest.mark.parametrize("metrics, why", [
    ({Keys.EPSILON: "lots"}, "metric 'epsilon' has a str out of type or range"),
    ({Keys.EPSILON: -1.0}, "metric 'epsilon' has a float out of type or range"),
    ({Keys.EPSILON: 1e308}, "metric 'epsilon' has a float out of type or range"),
    ({Keys.EPSILON: math.nan}, "metric 'epsilon' has a float out of type or range"),
    ({Keys.SAMPLE_RATE: 2.0}, "metric 'sample_rate' has a float out of type or range"),
    ({Keys.STEPS: True}, "metric 'steps' has a bool out of type or range"),
    ({"train_loss": 0.1}, "metric 'train_loss' is not one a site sends"),
    ({Keys.LEDGER: b"\x00"}, "metric 'ledger' has a bytes out of type or range"),
])
def test_metrics_out_of_type_or_range_reject_the_reply_and_leave_no_trace(metrics, why):
    record: list = []
    strategy = _strategy(lambda *row: record.append(row))
    params, _ = strategy.aggregate_fit(1, [_fit("1", "site-a", 1.0), _fit("2", "site-b", 1.0),
                                           _fit("3", "site-c", 1e3, **metrics)], [])
    rows = _rows(record, "train", 1)
    assert rows["site-c"] == {Keys.SITE: "site-c", "status": f"rejected: {why}"}
    assert _global(params) == pytest.approx(1.0)  # its update never reached the mean


@pytest.mark.parametrize("arrays, why", [
    ([np.full((3, 4), 1.0), np.array(["a", "b", "c", "d"])], "tensor 1 has dtype <U1"),
    ([np.full((3, 4), 1.0), np.full((5,), 1.0)], "tensor 1 has shape (5,), expected (4,)"),
    ([np.full((3, 4), 1.0)], "1 tensors, expected 2"),
    ([np.full((3, 4), 1e300), np.full((4,), 1.0)], "tensor 0 has NaN or infinite values"),
])
def test_updates_are_checked_by_dtype_shape_and_value_before_any_cast(arrays, why):
    record: list = []
    strategy = _strategy(lambda *row: record.append(row))
    bad = _fit("3", "site-c")
    bad[1].parameters = ndarrays_to_parameters(arrays)
    params, _ = strategy.aggregate_fit(1, [_fit("1", "site-a"), _fit("2", "site-b"), bad], [])
    assert _rows(record, "train", 1)["site-c"]["status"].startswith(f"rejected: {why}")
    assert _global(params) == pytest.approx(1.0)


def test_a_claimed_weight_counts_at_most_the_declared_cap():
    record: list = []
    strategy = _strategy(lambda *row: record.append(row), max_weight=100)
    params, _ = strategy.aggregate_fit(1, [_fit("1", "site-a", 1.0, n=100),
                                           _fit("2", "site-b", 3.0, n=10_000_000)], [])
    assert _global(params) == pytest.approx(2.0)  # 100 : 100, not 100 : 10 million
    params, _ = strategy.aggregate_fit(2, [_fit("1", "site-a", 1.0, n=100),
                                           _fit("2", "site-b", 3.0, n=-5)], [])
    assert _rows(record, "train", 2)["site-b"]["status"] == \
        "rejected: num_examples -5 is not a positive count"


def test_norm_bounding_scales_a_long_update_down_to_the_bound():
    strategy = _strategy(lambda *row: None, norm_bound=1.0)
    manager = SimpleNamespace(num_available=lambda: 2, wait_for=lambda *a, **k: True,
                              sample=lambda *a, **k: [])
    start = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    strategy.configure_fit(1, ndarrays_to_parameters(start), manager)
    honest, scaled = _fit("1", "site-a", 0.01), _fit("2", "site-b", -50.0)
    params, _ = strategy.aggregate_fit(1, [honest, scaled], [])
    got = parameters_to_ndarrays(params)
    # site-b's change (16 values of -50, norm 200) counts with norm 1: each -1/4
    assert got[1] == pytest.approx(np.full((4,), (0.01 - 0.25) / 2), abs=1e-6)


def test_a_round_with_too_few_accepted_updates_is_skipped_and_named():
    record: list = []
    strategy = _strategy(lambda *row: record.append(row), min_sites=2, min_completion=0.6)
    strategy.asked[1] = {"1", "2", "3", "4"}  # as configure_fit records it
    failures = [NodeFailure(3, "site failure 'data'; ... reference 0a1b2c3d")]
    got = strategy.aggregate_fit(1, [_fit("1", "site-a"), _fit("2", "site-b")], failures)
    assert got == (None, {}) and strategy.steps == 0
    assert strategy.outcomes[1] == "skipped: 2 accepted update(s), 3 needed"
    rows = _rows(record, "train", 1)
    assert rows["node-3"]["status"] == "failed: site failure 'data'; ... reference 0a1b2c3d"
    assert rows["node-4"]["status"] == "failed: no answer within federation.round_timeout"
    # a node that answered before is named by its site in a later failure
    strategy.asked[2] = {"1", "2", "3"}
    strategy.aggregate_fit(2, [_fit("1", "site-a"), _fit("3", "site-c")],
                           [NodeFailure(2, "no answer within federation.round_timeout (9s)")])
    assert strategy.outcomes[2] == "aggregated"
    assert _rows(record, "train", 2)["site-b"]["status"].startswith("failed: no answer")


def test_under_secure_aggregation_a_rejected_sender_voids_the_sum():
    """SecAgg+ unmasks before the strategy sees anything: an update it rejects is
    already inside the sum, so the round is not aggregated at all."""
    record: list = []
    strategy = _strategy(lambda *row: record.append(row), secure=lambda r: True)
    mean = ndarrays_to_parameters([np.full(s, 2.0, np.float32) for s in SHAPES])
    results = [_fit("1", "site-a"), _fit("2", "site-b"), _fit("3", "site-a")]  # 3: impostor
    for _, res in results:
        res.parameters = mean
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert strategy.outcomes[1] == "skipped: 1 rejected update(s) are inside the secure sum"


def test_hostile_replies_reach_the_run_log_and_summary_without_crashing_it(tmp_path):
    recorder = RunRecorder(tmp_path / "run", Config(), out=open("/dev/null", "w"))
    strategy = _strategy(recorder.record)
    # a ledger the server can read back, whose figures are absurd: the auditor's finding
    ledger = json.dumps({"seq": 1, "hash": "a" * 64, "epsilon": 1e308,
                         "epsilon_budget": -3}) + "\n"
    strategy.aggregate_fit(1, [_fit("1", "site-a", epsilon=2.0, ledger=ledger,
                                    ledger_head="1:" + "a" * 64),
                               _fit("2", "../../etc", epsilon=1.0),
                               _fit("3", "site-b", epsilon="NaN")], [])
    strategy.aggregate_evaluate(1, [
        (SimpleNamespace(cid="1"), EvaluateRes(Status(Code.OK, ""), math.nan, 10**12,
                                               {Keys.SITE: "site-a", "accuracy": 0.5})),
        (SimpleNamespace(cid="3"), EvaluateRes(Status(Code.OK, ""), math.nan, 5,
                                               {Keys.SITE: "site-b", "accuracy": 7.0}))],
        [NodeFailure(2, "no answer within federation.round_timeout (1s)")])
    summary = recorder.summary({}, {})
    problems = summary["problems_per_site"]
    assert problems["node-2"][0]["status"].startswith("rejected: site name '../../etc'")
    assert problems["site-b"][0]["status"] == \
        "rejected: metric 'epsilon' has a str out of type or range"
    assert problems["site-a"] == [{"round": 1, "phase": "evaluate", "status":
                                   "rejected: num_examples 1000000000000 is not a count"}]
    assert not (tmp_path / "run" / "etc.jsonl").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sites"]


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam"])
def test_a_strategy_restored_from_its_checkpoint_steps_as_if_never_stopped(tmp_path, optimizer):
    rng = np.random.default_rng(0)
    rounds = [[_fit(str(i), f"site-{i}", float(rng.normal())) for i in range(3)]
              for _ in range(3)]
    straight = _strategy(lambda *row: None, optimizer)
    expected = [straight.aggregate_fit(r, results, [])[0] for r, results in
                enumerate(rounds, start=1)]
    first = _strategy(lambda *row: None, optimizer)
    params, _ = first.aggregate_fit(1, rounds[0], [])
    checkpoint.save(tmp_path, checkpoint.capture(1, "run-x", parameters_to_ndarrays(params),
                                                 first))
    saved = checkpoint.load(tmp_path)
    assert saved.round == 1 and saved.owners == {"site-0": "0", "site-1": "1", "site-2": "2"}
    again = _strategy(lambda *row: None, optimizer)
    checkpoint.restore(saved, again)
    for r in (2, 3):
        got = again.aggregate_fit(r, rounds[r - 1], [])[0]
        for g, e in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(expected[r - 1])):
            np.testing.assert_array_equal(g, e)
    # an impostor of a name bound before the stop is still an impostor after it, while
    # the node that holds the name is connected; a name whose node is gone (a restarted
    # simulation has new node ids) binds again
    record: list = []
    again.record = lambda *row: record.append(row)
    again.aggregate_fit(4, [_fit("9", "site-0")], [])
    assert _rows(record, "train", 4)["node-9"]["status"].startswith("rejected: site name")
    live = {"0": None, "1": None, "9": None}  # node 2 (site-2) is gone; 12 is new
    manager = SimpleNamespace(all=lambda: live, num_available=lambda: 3,
                              wait_for=lambda *a, **k: True, sample=lambda *a, **k: [])
    again.restored = True
    again.configure_fit(5, params, manager)
    again.aggregate_fit(5, [_fit("12", "site-2"), _fit("9", "site-0")], [])
    rows = _rows(record, "train", 5)
    assert rows["site-2"]["status"] == "accepted"
    assert rows["node-9"]["status"].startswith("rejected: site name 'site-0' belongs to node 0")
