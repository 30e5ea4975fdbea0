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
import math
import re
import time
from typing import Callable, Sequence

import numpy as np
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common.message_keys import Keys
from common.names import check_name
from server.inputs import (bound_norm, check_arrays, check_ledger, check_metrics,
                           check_weight, decode_arrays)

log = logging.getLogger("fedcare.server")

SiteRows = Callable[[str, int, list[dict]], None]  # (phase, round, rows)


class SiteAwareStrategy(Strategy):
    def __init__(self, inner: Strategy, shapes: Sequence[tuple[int, ...]],
                 record: SiteRows, max_weight: int = 10_000_000,
                 frozen: Callable[[int], Sequence[int]] = lambda _round: (),
                 norm_bound: float = 0.0, min_sites: int = 1, min_completion: float = 0.0,
                 secure: Callable[[int], bool] = lambda _round: False) -> None:
        if not shapes:
            raise ValueError("shapes must list the adapter tensors (got none); "
                             "without them no update can be checked")
        self.inner = inner
        self.shapes = [tuple(s) for s in shapes]
        self.record = record
        self.max_weight, self.norm_bound = max_weight, norm_bound
        self.min_sites, self.min_completion = min_sites, min_completion
        self.secure = secure
        self.steps = 0  # server steps taken: rounds whose aggregate moved the adapter
        self.dtypes: list[np.dtype] | None = None
        self.frozen = frozen
        self.clock = PhaseClock()
        self.sent: dict[int, list[np.ndarray]] = {}  # round -> the global adapter sent
        self.asked: dict[int, set[str]] = {}  # round -> the nodes asked to train
        self.outcomes: dict[int, str] = {}  # round -> "aggregated" or "skipped: why"
        self.owners: dict[str, str] = {}  # site name -> the node id that first used it
        self.names: dict[str, str] = {}   # node id -> the site name it first used
        self.restored = False  # bindings from a checkpoint: kept for the nodes still here
        # (round, site, global sent, update received) for every reply with arrays, as the
        # server saw it: how `fedcare audit empirical` scores its gradient canaries
        self.observe: Callable[[int, str, list, list], None] | None = None

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
        self._forget_gone_nodes(client_manager)
        self.sent = {server_round: parameters_to_ndarrays(parameters)}
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self.asked[server_round] = {str(proxy.cid) for proxy, _ in instructions}
        return instructions

    def _forget_gone_nodes(self, client_manager: ClientManager) -> None:
        """After a resume, a name stays bound to its node only if that node is still
        connected: a restarted simulation, or a SuperNode registered again, has new node
        ids, and its sites must be able to answer under their names."""
        if not self.restored:
            return
        self.restored = False
        live = {str(cid) for cid in client_manager.all()}
        gone = {node for node in self.names if node not in live}
        for node in gone:
            self.owners.pop(self.names.pop(node), None)
        if gone:
            log.info("resumed: %s site name(s) bound to nodes no longer connected are "
                     "free to bind again", len(gone))

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

    def _row(self, phase: str, proxy: ClientProxy, metrics: dict,
             num_examples) -> tuple[dict, str]:
        """The run log's row of a reply, and '' or why it is not accepted: its sender's
        name is not its own, or its metrics are not what a site sends. Nothing else
        of a rejected reply is kept (its ledger, its values)."""
        name, problem = self.identify(proxy, metrics)
        problem = problem or check_metrics(phase, metrics) or check_ledger(
            metrics.get(Keys.LEDGER), metrics.get(Keys.LEDGER_HEAD))
        if problem:
            log.warning("%s reply of node %s (%s) rejected: %s", phase, proxy.cid, name,
                        problem)
            return {Keys.SITE: name, "status": f"rejected: {problem}"}, problem
        return {**metrics, "num_examples": num_examples, Keys.SITE: name}, ""

    def _failed(self, phase: str, server_round: int, failures: list, answered: set[str],
                asked: set[str]) -> list[dict]:
        """A row per site that failed or did not answer, under the name its node used."""
        # Flower's SecAgg+ lists a failed reply twice, and without its node
        failures = list({(_node_of(f), failure_reason(f)): f for f in failures}.values())
        rows, named = [], {_node_of(f) for f in failures}
        silent = sorted(asked - answered - named)
        anonymous = [f for f in failures if _node_of(f) is None]  # SecAgg+ keeps no node
        for failure in failures:
            node = _node_of(failure)
            if node is None and len(silent) == len(anonymous) == 1:
                node = silent.pop()  # the one node asked that did not answer: this one
            rows.append({Keys.SITE: self._name_of(node),
                         "status": f"failed: {failure_reason(failure)}"})
        for node in silent:
            rows.append({Keys.SITE: self._name_of(node),
                         "status": "failed: no answer within federation.round_timeout"})
        for row in rows:
            log.warning("round %s: %s of %s %s", server_round, phase, row[Keys.SITE],
                        row["status"])
        return rows

    def _name_of(self, node: str | None) -> str:
        return "?" if node is None else self.names.get(node, f"node-{node}")

    def required(self, server_round: int, answered: int) -> int:
        """Accepted updates a round needs: federation.min_sites, and min_completion of
        the sites asked."""
        asked = len(self.asked.get(server_round, ())) or answered
        return max(self.min_sites, math.ceil(self.min_completion * asked - 1e-9))

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.clock.end()
        secure = self.secure(server_round)
        accepted, rows, rejected = [], [], 0
        for proxy, res in results:
            arrays, unread = decode_arrays(res.parameters.tensors, self.shapes)
            if self.observe is not None and arrays is not None:
                self.observe(server_round, str(dict(res.metrics).get(Keys.SITE, "")),
                             self.sent.get(server_round, []), arrays)
            row, problem = self._row("train", proxy, dict(res.metrics), res.num_examples)
            if not problem and row.get(Keys.REFUSED):
                row["status"] = "refused"
            elif not problem:
                problem = unread or self.check_update(res, arrays, server_round, secure)
                row["status"] = f"rejected: {problem}" if problem else "accepted"
                if problem:
                    log.warning("round %s: update of %s rejected: %s",
                                server_round, row[Keys.SITE], problem)
                else:
                    accepted.append((proxy, res))
            rejected += bool(problem)
            rows.append(row)
        asked = self.asked.get(server_round, set())
        rows += self._failed("train", server_round, failures,
                             {str(p.cid) for p, _ in results}, asked)
        self.record("train", server_round, rows)
        need = self.required(server_round, len(results))
        if secure and rejected:  # inside the secure sum already: the sum is not used
            why = f"{rejected} rejected update(s) are inside the secure sum"
        elif len(accepted) < need:
            why = f"{len(accepted)} accepted update(s), {need} needed"
        else:
            why = ""
        if why:
            self.outcomes[server_round] = f"skipped: {why}"
            log.warning("round %s skipped (%s); the global adapter is unchanged",
                        server_round, why)
            return None, {}
        parameters, metrics = self.inner.aggregate_fit(self.steps + 1, accepted, [])
        if parameters is None:
            self.outcomes[server_round] = "skipped: the aggregation rule returned nothing"
            return None, metrics
        self.steps += 1
        self.outcomes[server_round] = "aggregated"
        parameters = self._keep_frozen(server_round, parameters)
        if self.dtypes is not None:
            arrays = parameters_to_ndarrays(parameters)
            parameters = ndarrays_to_parameters(
                [a.astype(d, copy=False) for a, d in zip(arrays, self.dtypes)])
        return parameters, metrics

    def check_update(self, res: FitRes, arrays: list[np.ndarray], server_round: int = 0,
                     secure: bool = False) -> str:
        """'' if the update (`arrays`, as read from `res`) may be averaged (then `res`
        holds it as it will be: frozen tensors filled in, its weight capped, its change
        norm-bounded), else why not. Under SecAgg+ `res` holds the secure mean: the
        checks are the aggregate's."""
        weight, problem = check_weight(res.num_examples, self.max_weight)
        problem = problem or check_arrays(arrays, self.shapes, self.dtypes,
                                          set(self.frozen(server_round)))
        if problem:
            return problem
        res.num_examples = weight
        if self.dtypes is not None and any(a.dtype.kind != "f" for a in arrays):
            # an integer tensor as the adapter keeps it: Flower's in-place FedAvg scales
            # it by its share cast to an integer, i.e. by 0
            res.parameters = ndarrays_to_parameters(
                [a if a.dtype.kind == "f" else a.astype(d) for a, d in zip(arrays, self.dtypes)])
        res.parameters = self._keep_frozen(server_round, res.parameters)
        sent = self.sent.get(server_round)
        if self.norm_bound > 0 and sent is not None:
            bounded, norm = bound_norm(parameters_to_ndarrays(res.parameters), sent,
                                       self.norm_bound)
            if norm > self.norm_bound:
                res.parameters = ndarrays_to_parameters(bounded)
                log.info("round %s: an update of norm %.3g was bounded to %.3g",
                         server_round, norm, self.norm_bound)
        return ""

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        self.clock.end()
        rows = []
        weighted = []  # a site that keeps its evaluation to itself sends a weight of 0
        for proxy, res in results:
            row, problem = self._row("evaluate", proxy, dict(res.metrics), res.num_examples)
            if not problem and not (isinstance(res.num_examples, int)
                                    and not isinstance(res.num_examples, bool)
                                    and 0 <= res.num_examples <= self.max_weight):
                problem = f"num_examples {str(res.num_examples)[:20]} is not a count"
                row = {Keys.SITE: row[Keys.SITE], "status": f"rejected: {problem}"}
            rows.append(row)
            if not problem and res.num_examples > 0:
                res.loss = math.nan  # a site sends no loss: nothing there is used
                weighted.append((proxy, res))
        rows += self._failed("evaluate", server_round, failures,
                             {str(p.cid) for p, _ in results}, set())
        self.record("evaluate", server_round, rows)
        if not weighted:
            return None, {}
        return self.inner.aggregate_evaluate(server_round, weighted, [])


def _node_of(failure) -> str | None:
    """The node a failure came from, where it is known."""
    if isinstance(failure, tuple):  # (proxy, result with a non-OK status)
        return str(failure[0].cid)
    node = getattr(failure, "node_id", None)
    return None if node is None else str(node)


SITE_FAILURE = re.compile(r"site failure '[a-z-]+'.*?reference [0-9a-f]+")


def failure_reason(failure) -> str:
    """What a failed site said: its failure code and reference (client/releases.py), or
    the start of whatever Flower reported."""
    error = failure.args[0] if isinstance(failure, Exception) and failure.args else None
    if isinstance(failure, tuple):  # (proxy, result): the status says why
        return f"status {failure[1].status.code.name}: {failure[1].status.message[:200]}"
    text = f"{getattr(error, 'reason', '')} {failure}"  # Flower's Error: code, reason
    found = SITE_FAILURE.search(text)
    return found.group(0) if found else str(failure)[:300]


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
