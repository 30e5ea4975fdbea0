"""Server optimisers: how a round's average moves the global adapter.

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
"""

from __future__ import annotations

from flwr.server.strategy import FedAdam, FedAvg, FedAvgM

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
# FedAdam's adaptivity τ: Reddi et al.'s default. Flower's 1e-9 turns every coordinate's
# step into ±η·0.74 in round 1, however small its Δ (a DP-noised LoRA update mostly is).
FEDADAM_TAU = 1e-3
FEDADAM_BETA_2 = 0.99  # Flower's default
# FedOpt's eta_l (client learning rate) is stored by Flower but used nowhere; not set.


def build_strategy(name: str, learning_rate: float, momentum: float,
                   aggregation: str = "mean", faulty_share: float = 0.2,
                   **fedavg_args) -> FedAvg:
    """The inner strategy for `name`. `learning_rate` is FedAvgM's server learning rate
    or FedAdam's η; `momentum` is FedAvgM's momentum or FedAdam's β1; both are unused
    by fedavg. `fedavg_args` are FedAvg's own arguments, passed through unchanged."""
    if aggregation != "mean":
        raise ValueError(f"aggregation {aggregation!r} is not built yet")
    if name not in OPTIMIZERS:
        raise ValueError(f"server optimiser must be one of {', '.join(OPTIMIZERS)} "
                         f"(got {name!r})")
    if name != "fedavg" and fedavg_args.get("initial_parameters") is None:
        raise ValueError(f"server optimiser {name!r} needs initial_parameters: it steps "
                         "from the global adapter it keeps, not from the clients'")
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=learning_rate, server_momentum=momentum,
                       **fedavg_args)
    if name == "fedadam":
        return FedAdam(eta=learning_rate, beta_1=momentum, beta_2=FEDADAM_BETA_2,
                       tau=FEDADAM_TAU, **fedavg_args)
    return FedAvg(**fedavg_args)


def describe(strategy: FedAvg) -> dict:
    """What the run's summary records: the optimiser as it was built."""
    if isinstance(strategy, FedAdam):
        return {"name": "fedadam", "learning_rate": strategy.eta,
                "momentum": strategy.beta_1, "beta_2": strategy.beta_2, "tau": strategy.tau}
    if isinstance(strategy, FedAvgM):
        return {"name": "fedavgm", "learning_rate": strategy.server_learning_rate,
                "momentum": strategy.server_momentum}
    return {"name": "fedavg", "learning_rate": 1.0, "momentum": 0.0}
