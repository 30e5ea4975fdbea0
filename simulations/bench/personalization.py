"""Personalisation under strong skew: simulations/configs/strong_skew.yaml (Dirichlet
α=0.1 label skew, lognormal size skew, train.personalize_steps > 0). Per site, the
global and the personalised model on the site's own validation records, as
summary.json["personalization"] holds them, and the ε each has cost the site."""

from __future__ import annotations

from pathlib import Path

from simulations.bench import targets
from simulations.bench.runner import DEFAULT_CONFIG, Bench

STRONG_SKEW = DEFAULT_CONFIG.parent / "strong_skew.yaml"


def personalization(bench: Bench) -> dict:
    rows, errors = [], []
    for seed in bench.seeds:
        run = bench.simulate(f"personalization-seed{seed}", {"data.seed": seed},
                             config=STRONG_SKEW)
        if run.error:
            errors.append({"seed": seed, "run_dir": str(run.run_dir), "error": run.error})
            continue
        rows += site_rows(seed, run.summary, run.metrics())
    done = [r for r in rows if not r.get("refused")]
    return {"config": str(Path(STRONG_SKEW).relative_to(DEFAULT_CONFIG.parents[2])),
            "seeds": list(bench.seeds), "rows": rows, "errors": errors,
            "gain_accuracy_points": targets.mean_sd(
                100 * (r["personal_accuracy"] - r["global_accuracy"]) for r in done
                if r["personal_accuracy"] is not None and r["global_accuracy"] is not None),
            "gain_macro_f1_points": targets.mean_sd(
                100 * (r["personal_macro_f1"] - r["global_macro_f1"]) for r in done
                if r["personal_macro_f1"] is not None and r["global_macro_f1"] is not None)}


def site_rows(seed: int, summary: dict, metrics: list[dict]) -> list[dict]:
    """One row per site: global vs personalised metrics; ε after the federation's last
    round (what the global model cost the site) and after personalising (the total)."""
    out = []
    for site, facts in sorted((summary.get("personalization") or {}).items()):
        g, p = facts.get("global") or {}, facts.get("personalized") or {}
        train = [r.get("epsilon") for r in metrics if r.get("phase") == "train"
                 and r.get("site") == site and r.get("epsilon") is not None]
        out.append({"seed": seed, "site": site,
                    "global_accuracy": g.get("accuracy"), "global_macro_f1": g.get("macro_f1"),
                    "personal_accuracy": p.get("accuracy"),
                    "personal_macro_f1": p.get("macro_f1"),
                    "epsilon_global": max(train, default=None),
                    "epsilon_total": (summary.get("epsilon_per_site") or {}).get(site),
                    "refused": facts.get("refused")})
    return out
