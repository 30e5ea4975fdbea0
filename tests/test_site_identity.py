"""What the server takes from a site: a name bound to the node that first used it,
and an update that stays finite in the dtype the global adapter keeps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

from common.message_keys import Keys
from server.optimizer import build_strategy
from server.strategy import SiteAwareStrategy

SHAPES = [(3, 4), (4,)]


def _strategy(rows: list):
    initial = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    inner = build_strategy("fedavg", 1.0, 0.9, initial_parameters=ndarrays_to_parameters(initial))
    strategy = SiteAwareStrategy(inner, SHAPES, lambda *row: rows.append(row))
    strategy.initialize_parameters(client_manager=None)
    return strategy


def _fit(node: str, site, value: float = 1.0, dtype=np.float32, n: int = 10):
    arrays = [np.full(s, value, dtype=dtype) for s in SHAPES]
    ledger = '{"seq": 0, "hash": "%s"}\n' % ("ab" * 32)  # one entry, and its head
    metrics = {Keys.SITE: site, Keys.REFUSED: "", Keys.LEDGER: ledger,
               Keys.LEDGER_HEAD: "0:" + "ab" * 32}
    return SimpleNamespace(cid=node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays),
                                             n, metrics)


def _status(rows, round_no: int) -> dict:
    (phase, got_round, got), = [r for r in rows if r[1] == round_no]
    return {r[Keys.SITE]: r["status"] for r in got}


def test_a_site_name_is_bound_to_the_node_that_first_used_it():
    rows: list = []
    strategy = _strategy(rows)
    params, _ = strategy.aggregate_fit(1, [_fit("11", "site-a", 1.0), _fit("12", "site-b", 3.0)], [])
    assert _status(rows, 1) == {"site-a": "accepted", "site-b": "accepted"}
    # round 2: node 13 claims site-a's name, node 12 renames itself, a name tries a path
    params, _ = strategy.aggregate_fit(2, [_fit("11", "site-a", 2.0), _fit("13", "site-a", 1e6),
                                           _fit("12", "site-c", 1e6), _fit("14", "../x", 1e6)], [])
    status = _status(rows, 2)
    assert status["site-a"] == "accepted"
    assert status["node-13"] == "rejected: site name 'site-a' belongs to node 11"
    assert status["node-12"] == "rejected: node 12 answered as 'site-b' before"
    assert status["node-14"].startswith("rejected: site name '../x' is not a plain name")
    from flwr.common import parameters_to_ndarrays
    assert all(np.allclose(a, 2.0) for a in parameters_to_ndarrays(params))  # site-a alone
    # nothing a rejected sender claims (its ledger, its head) reaches the run log
    (_, _, got), = [r for r in rows if r[1] == 2]
    assert all(Keys.LEDGER not in r for r in got if r[Keys.SITE].startswith("node-"))
    # an impostor's evaluation is filed under its node too, and left out of the mean
    impostor = (SimpleNamespace(cid="13"),
                EvaluateRes(Status(Code.OK, ""), float("nan"), 50,
                            {Keys.SITE: "site-a", "accuracy": 1.0}))
    honest = (SimpleNamespace(cid="11"),
              EvaluateRes(Status(Code.OK, ""), float("nan"), 10,
                          {Keys.SITE: "site-a", "accuracy": 0.5}))
    strategy.aggregate_evaluate(2, [honest, impostor], [])
    (_, _, evaluated), = [r for r in rows if r[0] == "evaluate"]
    assert {r[Keys.SITE] for r in evaluated} == {"site-a", "node-13"}


def test_an_update_that_overflows_the_kept_dtype_is_rejected():
    rows: list = []
    strategy = _strategy(rows)
    params, _ = strategy.aggregate_fit(1, [_fit("11", "site-a", 1e300, dtype=np.float64),
                                           _fit("12", "site-b", 1.0)], [])
    status = _status(rows, 1)
    assert status["site-a"].startswith("rejected: tensor 0 has NaN or infinite values")
    from flwr.common import parameters_to_ndarrays
    assert all(np.isfinite(a).all() and np.allclose(a, 1.0) for a in parameters_to_ndarrays(params))
