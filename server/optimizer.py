"""Server optimisers and aggregation rules: how a round's updates move the global adapter.

Flower's own legacy strategies, chosen by name (Reddi et al. 2021, "Adaptive
Federated Optimization"). With x the global adapter and Δ = mean(updates) - x:

    fedavg   x <- x + Δ
    fedavgm  g <- x - mean;  m <- g (first step), m <- β m + g (later);  x <- x - lr m
    fedadam  m <- β1 m + (1-β1) Δ;  v <- β2 v + (1-β2) Δ²
             x <- x + η √(1-β2^(t+1)) / (1-β1^(t+1)) · m / (√v + τ)

(t is the step number Flower's FedAdam receives as `server_round`; it corrects the
bias with t+1.) Each acts only on the weighted mean of the round's updates, so it
works unchanged under SecAgg+, whose workflow hands the strategy the secure mean in
every result. The server's step count must advance only when a step is taken:
`SiteAwareStrategy` passes the step number, not the round, to the inner strategy.

Robust rules (fedavg only, updates in the clear): instead of the weighted mean, the
round's n accepted updates are combined by one of Flower's own rules. The server
wrapper fills every array before they see the results, and all updates start from the
same global adapter, so a rule over adapters is the same rule over updates.

    trimmed_mean  FedTrimmedAvg(beta = faulty_share): per coordinate, drop the
                  floor(beta n) lowest and highest values, average the rest (unweighted);
                  with beta 0.2, a round of fewer than 5 updates drops nothing
    median        FedMedian: the per-coordinate median (unweighted)
    krum          Krum (Blanchard et al. 2017), multi-Krum: f = floor(faulty_share n)
                  sites assumed faulty; each update is scored by its squared distances
                  to its n - f - 2 nearest others, and the n - f best are averaged by
                  example count. Krum's bound needs n > 2f + 2: a round with fewer
                  updates takes the median instead, and says so in the log.

The unweighted rules give a site's claimed example count no extra pull; Krum's
average of the kept updates trusts it as far as the wrapper lets it.
"""

from __future__ import annotations

import logging
import math

from flwr.common import FitRes, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum

log = logging.getLogger("fedcare.server")

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
AGGREGATIONS = ("mean", "trimmed_mean", "median", "krum")
# FedAdam's adaptivity τ: Reddi et al.'s default. Flower's 1e-9 turns every coordinate's
# step into ±η·0.74 in round 1, however small its Δ (a DP-noised LoRA update mostly is).
FEDADAM_TAU = 1e-3
FEDADAM_BETA_2 = 0.99  # Flower's default
# FedOpt's eta_l (client learning rate) is stored by Flower but used nowhere; not set.


def build_strategy(name: str, learning_rate: float, momentum: float,
                   aggregation: str = "mean", faulty_share: float = 0.2,
                   **fedavg_args) -> FedAvg:
    """The inner strategy for `name` and `aggregation`. `learning_rate` is FedAvgM's
    server learning rate or FedAdam's η; `momentum` is FedAvgM's momentum or FedAdam's
    β1; both are unused by fedavg. `faulty_share` is trimmed_mean's cut at each end or
    krum's share of faulty sites. `fedavg_args` are FedAvg's own arguments, passed
    through unchanged."""
    if name not in OPTIMIZERS:
        raise ValueError(f"server optimiser must be one of {', '.join(OPTIMIZERS)} "
                         f"(got {name!r})")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)} "
                         f"(got {aggregation!r})")
    if aggregation != "mean":
        if name != "fedavg":
            raise ValueError(f"aggregation {aggregation!r} replaces the mean a server "
                             f"optimiser steps on: it needs 'fedavg' (got {name!r})")
        if not 0 <= faulty_share < 0.5:
            raise ValueError(f"faulty_share must be in [0, 0.5) (got {faulty_share}); "
                             "a rule cannot outvote half the sites")
    if name != "fedavg" and fedavg_args.get("initial_parameters") is None:
        raise ValueError(f"server optimiser {name!r} needs initial_parameters: it steps "
                         "from the global adapter it keeps, not from the clients'")
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=learning_rate, server_momentum=momentum,
                       **fedavg_args)
    if name == "fedadam":
        return FedAdam(eta=learning_rate, beta_1=momentum, beta_2=FEDADAM_BETA_2,
                       tau=FEDADAM_TAU, **fedavg_args)
    if aggregation == "trimmed_mean":
        return FedTrimmedAvg(beta=faulty_share, **fedavg_args)
    if aggregation == "median":
        return FedMedian(**fedavg_args)
    if aggregation == "krum":
        return ShareKrum(faulty_share=faulty_share, **fedavg_args)
    return FedAvg(**fedavg_args)


def faulty_sites(share: float, n: int) -> int:
    """floor(share · n), the sites assumed faulty among n (0.2 · 5 is one, not 0.99...)."""
    return math.floor(share * n + 1e-9)


class ShareKrum(Krum):
    """Flower's Krum with its counts set each round from the updates it is given:
    f = floor(faulty_share · n) and the n - f best kept (multi-Krum). A fixed count
    would be wrong as soon as a site drops out or is rejected. With n <= 2f + 2 the
    round takes FedMedian's per-coordinate median; `median_steps` counts those."""

    def __init__(self, *, faulty_share: float, **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        self.faulty_share = faulty_share
        self.median = FedMedian(fit_metrics_aggregation_fn=self.fit_metrics_aggregation_fn)
        self.median_steps = 0

    def __repr__(self) -> str:
        return f"ShareKrum(faulty_share={self.faulty_share})"

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        n = len(results)
        f = faulty_sites(self.faulty_share, n)
        if n <= 2 * f + 2:
            log.warning("krum needs more than 2f + 2 = %d updates (f = %d faulty of %d); "
                        "this step takes the per-coordinate median instead", 2 * f + 2, f, n)
            self.median_steps += 1
            return self.median.aggregate_fit(server_round, results, failures)
        if f == 0:
            log.warning("krum: faulty_share %s of %d updates is no whole site, so all %d "
                        "are averaged", self.faulty_share, n, n)
        self.num_malicious_clients, self.num_clients_to_keep = f, n - f
        return super().aggregate_fit(server_round, results, failures)


def describe(strategy: FedAvg) -> dict:
    """What the run's summary records: the optimiser and the aggregation rule as they
    were built (and, for krum, how many steps fell back to the median)."""
    if isinstance(strategy, FedAdam):
        return {"name": "fedadam", "learning_rate": strategy.eta,
                "momentum": strategy.beta_1, "beta_2": strategy.beta_2, "tau": strategy.tau,
                "aggregation": {"rule": "mean"}}
    if isinstance(strategy, FedAvgM):
        return {"name": "fedavgm", "learning_rate": strategy.server_learning_rate,
                "momentum": strategy.server_momentum, "aggregation": {"rule": "mean"}}
    if isinstance(strategy, FedTrimmedAvg):
        rule = {"rule": "trimmed_mean", "cut_each_end": strategy.beta}
    elif isinstance(strategy, FedMedian):
        rule = {"rule": "median"}
    elif isinstance(strategy, ShareKrum):
        rule = {"rule": "krum", "faulty_share": strategy.faulty_share,
                "median_steps": strategy.median_steps}
    else:
        rule = {"rule": "mean"}
    return {"name": "fedavg", "learning_rate": 1.0, "momentum": 0.0, "aggregation": rule}
