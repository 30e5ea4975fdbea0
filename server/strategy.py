"""Aggregation of adapter updates: a Flower strategy (FedAvg, FedAvgM, FedAdam), wrapped.

`SiteAwareStrategy` wraps any `flwr.server.strategy.Strategy` and adds what a
hospital federation needs around it: a site's name is bound to the Flower node that
first used it (an impostor, a renamed node or a name that is not one plain name is
rejected and filed under `node-<id>`); an update is checked before it can touch the
average (shape, finite values in the dtype the adapter keeps, plausible example count)
and rejected whole if bad;
refusals are kept out of the average but recorded; every site's metrics reach the
run's recorder. It works the same under SecAgg+, where the inner strategy only
ever receives the secure sum.

A round with nothing to aggregate leaves the global adapter and the inner strategy
untouched. Server optimisers count their steps by the `server_round` they are given
(FedAvgM starts its momentum at 1, FedAdam corrects its bias by it), so the inner
strategy is given the number of the step it takes, not the round's. The global
adapter keeps the dtypes it started with (Flower's optimisers and SecAgg+ return
float64, twice the bytes on the wire).

Arrays that no site may change in a round (`frozen(round)`: the LoRA tensors of a
head round) arrive empty (shape (0,)) and are kept exactly as they were sent, before
the inner strategy sees the results and after it returns: no bytes are spent on
them, and neither SecAgg+'s quantisation nor float averaging can nudge them (a
site's cached encoder features would go stale).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, Sequence

import numpy as np
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common.keys import Keys
from common.names import check_name

log = logging.getLogger("fedcare.server")

SiteRows = Callable[[str, int, list[dict]], None]  # (phase, round, rows)


class SiteAwareStrategy(Strategy):
    def __init__(self, inner: Strategy, shapes: Sequence[tuple[int, ...]],
                 record: SiteRows, max_examples: int = 10_000_000,
                 frozen: Callable[[int], Sequence[int]] = lambda _round: ()) -> None:
        if not shapes:
            raise ValueError("shapes must list the adapter tensors (got none); "
                             "without them no update can be checked")
        self.inner = inner
        self.shapes = [tuple(s) for s in shapes]
        self.record = record
        self.max_examples = max_examples
        self.steps = 0  # server steps taken: rounds whose aggregate moved the adapter
        self.dtypes: list[np.dtype] | None = None
        self.frozen = frozen
        self.clock = PhaseClock()
        self.sent: dict[int, list[np.ndarray]] = {}  # round -> the global adapter sent
        self.owners: dict[str, str] = {}  # site name -> the node id that first used it
        self.names: dict[str, str] = {}   # node id -> the site name it first used

    def __repr__(self) -> str:
        return f"SiteAwareStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        initial = self.inner.initialize_parameters(client_manager)
        if initial is not None:
            self.dtypes = [a.dtype for a in parameters_to_ndarrays(initial)]
        return initial

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.clock.begin("fit" if server_round > 1 else "first_fit")
        if self.frozen(server_round):
            self.sent = {server_round: parameters_to_ndarrays(parameters)}
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def _keep_frozen(self, server_round: int, parameters: Parameters) -> Parameters:
        frozen = self.frozen(server_round)
        if not frozen:
            return parameters
        sent, arrays = self.sent[server_round], parameters_to_ndarrays(parameters)
        for i in frozen:
            arrays[i] = sent[i].astype(arrays[i].dtype)
        return ndarrays_to_parameters(arrays)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        self.clock.begin("site_evaluate")
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def evaluate(self, server_round: int, parameters: Parameters):
        self.clock.begin("server_evaluate")
        try:
            return self.inner.evaluate(server_round, parameters)
        finally:
            self.clock.end()

    def identify(self, proxy: ClientProxy, metrics: dict) -> tuple[str, str]:
        """(the name the run log files the reply under, '' or why it is not accepted).
        A site's name is bound to its Flower node id at first contact: a second node
        claiming it, a node changing its name, or a name that is not one plain name
        (it would become a file name) is rejected, and filed under `node-<id>`."""
        node, claimed = str(proxy.cid), metrics.get(Keys.SITE)
        try:
            check_name("site name", claimed)
        except ValueError:
            return f"node-{node}", f"site name {str(claimed)[:40]!r} is not a plain name"
        owner, named = self.owners.get(claimed, node), self.names.get(node, claimed)
        if owner != node:
            return f"node-{node}", f"site name {claimed!r} belongs to node {owner}"
        if named != claimed:
            return f"node-{node}", f"node {node} answered as {named!r} before"
        self.owners[claimed], self.names[node] = node, claimed
        return claimed, ""

    def _row(self, proxy: ClientProxy, metrics: dict, **extra) -> tuple[dict, str]:
        """The run log's row of a reply, and '' or why its sender is not accepted (then
        what it claims, ledger included, is not kept)."""
        name, problem = self.identify(proxy, metrics)
        row = {**metrics, **extra, Keys.SITE: name}
        if problem:
            for key in (Keys.LEDGER, Keys.LEDGER_HEAD, Keys.SITE_PUBLIC_KEY):
                row.pop(key, None)
            row["status"] = f"rejected: {problem}"
            log.warning("update from node %s rejected: %s", proxy.cid, problem)
        return row, problem

    def check_update(self, res: FitRes, server_round: int = 0) -> str:
        """'' if the update may be averaged, else why not."""
        if not 0 < res.num_examples <= self.max_examples:
            return f"num_examples {res.num_examples} outside (0, {self.max_examples}]"
        arrays = parameters_to_ndarrays(res.parameters)
        if len(arrays) != len(self.shapes):
            return f"{len(arrays)} tensors, expected {len(self.shapes)}"
        frozen = set(self.frozen(server_round))
        for i, (a, shape) in enumerate(zip(arrays, self.shapes)):
            expected = (0,) if i in frozen else shape
            if a.shape != expected:
                return f"tensor {i} has shape {a.shape}, expected {expected}"
            kept = a if self.dtypes is None else a.astype(self.dtypes[i])  # as it would be kept
            if not np.isfinite(a).all() or not np.isfinite(kept).all():
                return f"tensor {i} has NaN or infinite values (or overflows {kept.dtype})"
        return ""

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.clock.end()
        accepted, rows = [], []
        for proxy, res in results:
            row, unknown = self._row(proxy, dict(res.metrics), num_examples=res.num_examples)
            if unknown:
                pass  # its row says why; nothing it sent is used
            elif row.get(Keys.REFUSED):
                row["status"] = "refused"
            else:
                problem = self.check_update(res, server_round)
                row["status"] = f"rejected: {problem}" if problem else "accepted"
                if problem:
                    log.warning("round %s: update of %s rejected: %s",
                                server_round, row[Keys.SITE], problem)
                else:
                    res.parameters = self._keep_frozen(server_round, res.parameters)
                    accepted.append((proxy, res))
            rows.append(row)
        rows += [{Keys.SITE: "?", "status": f"failed: {failure_reason(f)}"} for f in failures]
        self.record("train", server_round, rows)
        if not accepted:
            log.warning("round %s: no update to aggregate; the global adapter is unchanged",
                        server_round)
            return None, {}
        parameters, metrics = self.inner.aggregate_fit(self.steps + 1, accepted, [])
        if parameters is None:
            return None, metrics
        self.steps += 1
        parameters = self._keep_frozen(server_round, parameters)
        if self.dtypes is not None:
            arrays = parameters_to_ndarrays(parameters)
            parameters = ndarrays_to_parameters(
                [a.astype(d, copy=False) for a, d in zip(arrays, self.dtypes)])
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        self.clock.end()
        rows = []
        weighted = []  # a site that keeps its evaluation to itself sends a weight of 0
        for proxy, res in results:
            row, problem = self._row(proxy, dict(res.metrics), loss=res.loss,
                                     num_examples=res.num_examples)
            rows.append(row)
            if not problem and res.num_examples > 0:
                weighted.append((proxy, res))
        self.record("evaluate", server_round, rows)
        if not weighted:
            return None, {}
        return self.inner.aggregate_evaluate(server_round, weighted, failures)


SITE_FAILURE = re.compile(r"site failure '[a-z-]+'.*?reference [0-9a-f]+")


def failure_reason(failure) -> str:
    """What a failed site said: its failure code and reference (client/releases.py), or
    the start of whatever Flower reported."""
    error = failure.args[0] if isinstance(failure, Exception) and failure.args else None
    text = f"{getattr(error, 'reason', '')} {failure!r}"  # Flower's Error: code, reason
    found = SITE_FAILURE.search(text)
    return found.group(0) if found else repr(failure)[:300]


class PhaseClock:
    """Seconds the server spent in each phase of the rounds: the first fit (which
    includes the sites' start-up: model, tokens, features), later fits, its own test
    evaluation and the sites' evaluation. `started` is when the first phase began."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started: float | None = None
        self._open: tuple[str, float] | None = None

    def begin(self, phase: str) -> None:
        now = time.perf_counter()
        self.started = now if self.started is None else self.started
        self._open = (phase, now)

    def end(self) -> None:
        if self._open is not None:
            phase, since = self._open
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - since
            self._open = None
