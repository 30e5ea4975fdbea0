"""What the model reaches at equal compute: the same rounds, local steps and batch for
every configuration, each a full Flower simulation from simulations/configs/default.yaml
with only the overrides its comparison needs; seeds are data.seed (the held-out split
and the partition)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from simulations.bench import targets
from simulations.bench.runner import DEFAULT_CONFIG, Bench


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    overrides: dict


# The server optimiser under test. FedAdam rather than FedAvgM: its per-coordinate
# normalisation makes the server step independent of the scale of the averaged update,
# which differs between the LoRA tensors and the head and moves whenever the local
# learning rate or the noise is re-tuned; FedAvgM steps in proportion to the update and,
# over the few rounds the defaults run, its momentum barely builds (1, 1.9, 2.7, 3.4 x),
# so it stays close to FedAvg. η = 0.05 with Reddi et al.'s τ = 1e-3 (server/optimizer.py).
SERVER_OPTIMIZER = {"federation.server_optimizer": "fedadam",
                    "federation.server_learning_rate": 0.05}


def setups(base: Path = DEFAULT_CONFIG) -> list[Setup]:
    """Every configuration of the section, in table order; sizes derive from `base`."""
    from common.config import load_yaml

    cfg = load_yaml(base)
    sim, train = cfg.simulation, cfg.train
    # the pooled site gets the CPUs the federation's sites share, so walls compare too
    pooled_cpus = max(1, min(os.cpu_count() or 1, int(sim.num_sites * sim.cpus_per_site)))
    pooled = {"simulation.num_sites": 1, "data.partition": "iid", "federation.min_sites": 1,
              "privacy.enabled": False, "simulation.cpus_per_site": pooled_cpus}
    return [
        # equal compute per site: the same rounds, steps and batch as one federated site
        Setup("pooled", "pooled non-private (1 site, all data, IID), same batch", pooled),
        # equal compute per round: the same steps over the records all sites' batches
        # hold together (what simulations/configs/pooled.yaml calls equal compute)
        Setup("pooled_allbatch", f"pooled non-private, batch × {sim.num_sites} sites", {
            **pooled, "train.batch_size": train.batch_size * sim.num_sites,
            "train.head_batch_size": train.head_batch_size * sim.num_sites}),
        Setup("fed_nonprivate", "federated non-private", {"privacy.enabled": False}),
        Setup("dp_eps1", "federated DP ε=1 (no validation counts, count noise 20)", {
            # at the default count noise (5) the planned counts (the size, one evaluation a
            # round, the personalised one) alone cost more than ε=1: every site refuses
            "privacy.target_epsilon": 1.0, "site.release_evaluation": False,
            "privacy.count_noise": 20.0}),
        Setup("dp_eps3", "federated DP ε=3", {"privacy.target_epsilon": 3.0}),
        Setup("dp_eps8", "federated DP ε=8", {"privacy.target_epsilon": 8.0}),
        Setup("dp_eps8_fedadam", "federated DP ε=8, server FedAdam η=0.05",
              {"privacy.target_epsilon": 8.0, **SERVER_OPTIMIZER}),
    ]


QUICK = ("fed_nonprivate", "dp_eps8")


def run_overrides(bench: Bench, name: str, seed: int) -> tuple[str, dict]:
    """(run folder name, overrides) of configuration `name` at `seed`: one definition,
    so another section asking for the same run gets the same simulation back."""
    setup = next(s for s in setups(bench.config()) if s.name == name)
    return f"{name}-seed{seed}", {**setup.overrides, "data.seed": seed}


def utility(bench: Bench) -> dict:
    chosen = [s for s in setups(bench.config()) if not bench.quick or s.name in QUICK]
    per_setup: dict[str, list[dict]] = {s.name: [] for s in chosen}
    for seed in bench.seeds:  # seeds outside, setups inside: load drift hits every setup
        for setup in chosen:
            name, overrides = run_overrides(bench, setup.name, seed)
            run = bench.simulate(name, overrides)
            per_setup[setup.name].append({"seed": seed, **run.record()})
    configs = [summarize(s, per_setup[s.name]) for s in chosen]
    return {"device": bench.device, "seeds": list(bench.seeds), "configs": configs,
            "gaps": gaps(configs), "server_optimizer": SERVER_OPTIMIZER}


def summarize(setup: Setup, runs: list[dict]) -> dict:
    ok = [r for r in runs if not r.get("error")]
    return {"name": setup.name, "label": setup.label, "overrides": setup.overrides,
            "runs": runs,
            "accuracy": targets.mean_sd(r["accuracy"] for r in ok),
            "macro_f1": targets.mean_sd(r["macro_f1"] for r in ok),
            "process_seconds": targets.mean_sd(r["process_seconds"] for r in ok),
            "site_feature_seconds": targets.mean_sd(r.get("site_feature_seconds") for r in ok),
            "epsilon_max": targets.mean_sd(r["epsilon_max"] for r in ok),
            "failed": len(runs) - len(ok)}


def gaps(configs: list[dict]) -> list[dict]:
    """Every target gap whose two configurations ran, judged; the others 'not run'."""
    by_name = {c["name"]: {r["seed"]: r["macro_f1"] for r in c["runs"]
                           if not r.get("error") and r.get("macro_f1") is not None}
               for c in configs}
    out = []
    for t in targets.GAP_TARGETS:
        gap = (targets.paired_gap_points(by_name[t.reference], by_name[t.other])
               if t.reference in by_name and t.other in by_name else targets.mean_sd([]))
        out.append({"name": t.name, "reference": t.reference, "other": t.other,
                    "limit_points": t.limit_points, "gap_points": gap,
                    "status": targets.judge_gap(gap, t)})
    return out
