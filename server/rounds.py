"""The rounds of a run: Flower's legacy loop, with what weeks over flaky networks need.

Flower's `DefaultWorkflow` waits for every site without a limit, files an error reply
without the node it came from, and always starts at round 1. `Rounds` is the same loop
(fit, the server's own test evaluation, the sites' evaluation) with:

- a per-round timeout: a site that has not answered by then is recorded as failed by
  name, and the round goes on with the others (the strategy decides whether enough
  updates came to aggregate; a round with too few is skipped, not fatal);
- failures that keep their node, so the run log names the site;
- a start round and a start adapter, so a run can resume from its checkpoint, and a
  hook after every round that writes that checkpoint.

SecAgg+ rounds run Flower's own `SecAggPlusWorkflow`, given the same timeout.
"""

from __future__ import annotations

import timeit
from logging import INFO
from typing import Callable

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Message
from flwr.app.message_type import MessageType
from flwr.common import Code
from flwr.server import Grid, LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (default_centralized_evaluation_workflow,
                                                    default_init_params_workflow)
from flwr.common.logger import log


class NodeFailure(Exception):
    """A site's failed reply, or its silence, with the node it came from."""

    def __init__(self, node_id: int, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id


def exchange(grid: Grid, context: LegacyContext, instructions, message_type: str,
             to_content, from_content, timeout: float) -> tuple[list, list]:
    """Send each (proxy, instruction), wait at most `timeout` seconds; the replies that
    came with an OK status, and a NodeFailure (or (proxy, result)) for each other."""
    round_no = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
    proxies = {proxy.node_id: proxy for proxy, _ in instructions}
    messages = list(grid.send_and_receive(
        [Message(content=to_content(ins, True), dst_node_id=proxy.node_id,
                 message_type=message_type, group_id=str(round_no))
         for proxy, ins in instructions], timeout=timeout))
    results, failures, answered = [], [], set()
    for msg in messages:
        node = msg.metadata.src_node_id
        answered.add(node)
        if not msg.has_content():
            failures.append(NodeFailure(node, str(getattr(msg.error, "reason", msg.error))))
            continue
        res = from_content(msg.content)
        (results if res.status.code == Code.OK else failures).append((proxies[node], res))
    failures += [NodeFailure(node, f"no answer within federation.round_timeout "
                                   f"({timeout:g}s)") for node in proxies if node not in answered]
    log(INFO, "round %s %s: %s replies, %s failures", round_no, message_type, len(results),
        len(failures))
    return results, failures


def _instructions(context: LegacyContext, configure) -> tuple[int, list]:
    """The current round and what the strategy's `configure` (fit or evaluate) asks of
    which sites, given the global adapter."""
    round_no = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
    parameters = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return round_no, configure(round_no, parameters, context.client_manager)


class PlainFit:
    """A fit round in the clear, with a timeout (seconds, by round)."""

    def __init__(self, timeout: Callable[[int], float]) -> None:
        self.timeout = timeout

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        round_no, instructions = _instructions(context, context.strategy.configure_fit)
        if not instructions:
            return
        results, failures = exchange(
            grid, context, instructions, MessageType.TRAIN, compat.fitins_to_recorddict,
            lambda content: compat.recorddict_to_fitres(content, False),
            self.timeout(round_no))
        aggregated, metrics = context.strategy.aggregate_fit(round_no, results, failures)
        if aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = \
                compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=round_no,
                                                        metrics=metrics)


def site_evaluate(timeout: Callable[[int], float]):
    """The sites' evaluation of the global adapter, with a timeout (seconds, by round)."""

    def workflow(grid: Grid, context: LegacyContext) -> None:
        round_no, instructions = _instructions(context, context.strategy.configure_evaluate)
        if not instructions:
            return
        results, failures = exchange(
            grid, context, instructions, MessageType.EVALUATE,
            compat.evaluateins_to_recorddict, compat.recorddict_to_evaluateres,
            timeout(round_no))
        context.strategy.aggregate_evaluate(round_no, results, failures)

    return workflow


class Rounds:
    """Rounds `first`..`last`: fit (`fit`: plain or SecAgg+), the server's test
    evaluation, the sites' evaluation, then `after_round(round)`. `initial`: the
    adapter to start from (a checkpoint's), else the strategy's."""

    def __init__(self, fit, evaluate, first: int, last: int,
                 after_round: Callable[[int, LegacyContext], None],
                 initial=None) -> None:
        self.fit, self.evaluate = fit, evaluate
        self.first, self.last = first, last
        self.after_round, self.initial = after_round, initial

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, stop, registered = start_update_client_manager_thread(
            grid, context.client_manager)
        try:
            registered.wait()
            if self.initial is None:
                default_init_params_workflow(grid, context)
            else:
                context.state.array_records[MAIN_PARAMS_RECORD] = \
                    compat.parameters_to_arrayrecord(self.initial, True)
            config = ConfigRecord()
            config[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            for round_no in range(self.first, self.last + 1):
                log(INFO, "[ROUND %s]", round_no)
                config[Key.CURRENT_ROUND] = round_no
                self.fit(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate(grid, context)
                self.after_round(round_no, context)
        finally:
            stop.set()
            thread.join()
