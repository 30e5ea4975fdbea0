"""Robustness to one poisoned site: simulations/configs/default.yaml with 5 sites and
secure aggregation off (a robust rule needs every update in the clear), where site0
sends the global adapter plus POISON_FACTOR times its own update. The clean test
metric of the plain mean with and without the attack, and of each robust rule
(federation.aggregation) under the attack; target: a robust rule under attack trails
the mean without attack by at most 2 macro-F1 points, paired by seed. The trimmed mean
is not run: with private sites it is refused at config time (it missed the target by
far, 11.7 points, when it was measured; docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import dataclass

from simulations.bench import targets
from simulations.bench.runner import Bench

POISON_SITE = 0
POISON_FACTOR = -50.0  # sign-flipped and scaled: one site outweighs the other four
SITES = 5
BASE = {"simulation.num_sites": SITES, "federation.min_sites": SITES,
        "federation.secure_aggregation": "off"}
LIMIT_POINTS = 2.0


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    aggregation: str
    attacked: bool


SETUPS = (
    Setup("mean", "mean, no attack", "mean", False),
    Setup("mean_attacked", "mean, 1 of 5 poisoned", "mean", True),
    Setup("median_attacked", "median, 1 of 5 poisoned", "median", True),
    Setup("krum_attacked", "multi-Krum, 1 of 5 poisoned", "krum", True),
)
QUICK = ("mean", "mean_attacked", "krum_attacked")
REFERENCE = "mean"


class PoisonSite:
    """A client mod (innermost, where the reply is still plain): in a training reply of
    site `site`, every tensor the site sent becomes global + factor x (own - global).
    Empty tensors (a head round's LoRA tensors) stay empty."""

    def __init__(self, site: int = POISON_SITE, factor: float = POISON_FACTOR) -> None:
        self.site, self.factor = site, factor

    def __call__(self, msg, context, call_next):
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.compat.common.recorddict_compat import (parameters_to_arrayrecord,
                                                          recorddict_to_fitins,
                                                          recorddict_to_fitres)

        out = call_next(msg, context)
        if (msg.metadata.message_type != "train" or not out.has_content()
                or context.node_config.get("partition-id") != self.site):
            return out
        sent = parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters)
        own = parameters_to_ndarrays(recorddict_to_fitres(out.content, True).parameters)
        bad = [g + self.factor * (u - g) if u.size else u for g, u in zip(sent, own)]
        out.content.array_records["fitres.parameters"] = parameters_to_arrayrecord(
            ndarrays_to_parameters([b.astype(u.dtype) for b, u in zip(bad, own)]),
            keep_input=True)
        return out


def robustness(bench: Bench) -> dict:
    chosen = [s for s in SETUPS if not bench.quick or s.name in QUICK]
    runs: dict[str, list[dict]] = {s.name: [] for s in chosen}
    for seed in bench.seeds:
        for setup in chosen:
            overrides = {**BASE, "federation.aggregation": setup.aggregation, "data.seed": seed}
            attack = {"site": POISON_SITE, "factor": POISON_FACTOR} if setup.attacked else None
            run = bench.simulate(f"robust-{setup.name}-seed{seed}", overrides, attack=attack)
            runs[setup.name].append({"seed": seed, **run.record(),
                                     "aggregation": (run.summary.get("server_optimizer")
                                                     or {}).get("aggregation")})
    configs = [summarize(s, runs[s.name]) for s in chosen]
    return {"device": bench.device, "seeds": list(bench.seeds), "overrides": BASE,
            "poison": {"site": f"site{POISON_SITE}", "factor": POISON_FACTOR},
            "limit_points": LIMIT_POINTS, "configs": configs, "gaps": judge(configs)}


def summarize(setup: Setup, runs: list[dict]) -> dict:
    """Means over seeds and, for every configuration but the reference, its gap to
    the mean without attack (macro-F1 and accuracy points, paired by seed). A robust
    rule under attack is judged against the limit; the attacked mean only shows what
    the attack does."""
    ok = [r for r in runs if not r.get("error")]
    return {"name": setup.name, "label": setup.label, "aggregation": setup.aggregation,
            "attacked": setup.attacked, "runs": runs, "failed": len(runs) - len(ok),
            "accuracy": targets.mean_sd(r["accuracy"] for r in ok),
            "macro_f1": targets.mean_sd(r["macro_f1"] for r in ok),
            "process_seconds": targets.mean_sd(r["process_seconds"] for r in ok)}


def judge(configs: list[dict]) -> list[dict]:
    """Gap of each configuration to the reference, per metric; verdicts for the robust
    rules under attack (the attacked mean is expected to miss)."""
    def by_seed(config: dict, metric: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in config["runs"]
                if not r.get("error") and r.get(metric) is not None}

    reference = next((c for c in configs if c["name"] == REFERENCE), None)
    out = []
    for c in configs:
        if c is reference:
            continue
        gap = {m: (targets.paired_gap_points(by_seed(reference, m), by_seed(c, m))
                   if reference else targets.mean_sd([]))
               for m in ("accuracy", "macro_f1")}
        judged = c["attacked"] and c["aggregation"] != "mean"
        out.append({"name": c["name"], "label": c["label"], "gap_points": gap,
                    "status": (targets.judge_at_most(gap["macro_f1"].get("mean"), LIMIT_POINTS)
                               if judged else "shown, not judged")})
    return out
