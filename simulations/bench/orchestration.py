"""How much of a round is not the sites' training: Flower's messaging, SecAgg+, the
server's aggregation and the sites' evaluation, read from a run's metrics.jsonl.

server/run_log.py stamps every row with `wall_seconds`, the seconds since the run
started, when the server records it: the `train` rows of round r when the round's
updates arrive (before aggregation), the `evaluate` rows when the sites' validation
results arrive, which ends the round (the console's "round r/R | 201.6s" is that
stamp). Each `train` row carries the site's own `train_seconds`. So, per round:

    round wall    = evaluate stamp(r) - evaluate stamp(r-1)          (round 1 from 0)
    fit wall      = train stamp(r)    - evaluate stamp(r-1)
    server test   = test stamp(r)     - train stamp(r)    (rounds with a test evaluation)
    overhead      = (round wall - slowest site's train_seconds) / round wall
    fit overhead  = (fit wall - slowest site's train_seconds) / fit wall

Round 1 also holds the start-up (the server builds its model and encodes the test
set, Ray starts the site actors, each builds its model and encodes its records), so
the steady-state figure is the mean over rounds 2..R. The last round also holds the
server's evaluation on the test set, shown apart.
"""

from __future__ import annotations

from typing import Iterable

from simulations.bench import targets
from simulations.bench.runner import Bench
from simulations.bench.utility import run_overrides


def round_overheads(rows: Iterable[dict]) -> dict:
    """Per-round walls and overhead shares from metrics.jsonl rows; `missing` names
    what the log did not hold (those rounds are left out of the means)."""
    rows = list(rows)
    rounds = sorted({r["round"] for r in rows if r.get("phase") in ("train", "evaluate")})
    out, missing, previous_end = [], [], 0.0
    for rnd in rounds:
        train = [r for r in rows if r.get("phase") == "train" and r["round"] == rnd]
        evals = [r["wall_seconds"] for r in rows if r.get("phase") == "evaluate"
                 and r["round"] == rnd and r.get("wall_seconds") is not None]
        seconds = [r["train_seconds"] for r in train if r.get("train_seconds") is not None]
        stamps = [r["wall_seconds"] for r in train if r.get("wall_seconds") is not None]
        item: dict = {"round": rnd, "sites_trained": len(seconds)}
        if not evals:
            missing.append(f"round {rnd}: no evaluate rows, so no end-of-round stamp")
        if not seconds:
            missing.append(f"round {rnd}: no site reported train_seconds")
        if evals and seconds:
            end, slowest = max(evals), max(seconds)
            wall = end - previous_end
            item.update({"round_seconds": wall, "slowest_train_seconds": slowest,
                         "overhead": (wall - slowest) / wall if wall > 0 else None})
            if stamps:
                fit = max(stamps) - previous_end
                test = [r["wall_seconds"] for r in rows if r.get("phase") == "test"
                        and r["round"] == rnd and r.get("wall_seconds") is not None]
                tested = max(test) if test else max(stamps)  # the server's test evaluation
                item.update({"fit_seconds": fit, "server_test_seconds": tested - max(stamps),
                             "evaluate_seconds": end - tested,
                             "fit_overhead": (fit - slowest) / fit if fit > 0 else None})
        if evals:
            previous_end = max(evals)
        out.append(item)
    steady = [r for r in out if r["round"] > 1]
    return {"rounds": out, "missing": missing,
            "first_round_overhead": out[0].get("overhead") if out else None,
            "steady_overhead": targets.mean_sd(r.get("overhead") for r in steady),
            "steady_fit_overhead": targets.mean_sd(r.get("fit_overhead") for r in steady),
            "steady_round_seconds": targets.mean_sd(r.get("round_seconds") for r in steady)}


def orchestration(bench: Bench) -> dict:
    """4 sites (the utility section's DP ε=8 run, seed 0, when it ran) and, in full
    mode, 8 sites with otherwise the same settings."""
    from common.config import load_yaml

    sizes = (4,) if bench.quick else (4, 8)
    seed = bench.seeds[0]
    default_sites = load_yaml(bench.config()).simulation.num_sites
    runs = []
    for sites in sizes:
        name, overrides = run_overrides(bench, "dp_eps8", seed)
        if sites != default_sites:  # else: the very run the utility section made
            name = f"orchestration-{sites}sites-seed{seed}"
            overrides = {**overrides, "simulation.num_sites": sites}
        run = bench.simulate(name, overrides)
        item = {"sites": sites, "run_dir": str(run.run_dir), "error": run.error,
                "secure_aggregation": (run.summary.get("secure_aggregation") or {}).get("rounds"),
                # the server's own split of the run's time by phase, when it records one
                "time_split_seconds": run.summary.get("time_split_seconds")}
        if not run.error:
            item.update(round_overheads(run.metrics()))
        runs.append(item)
    return {"runs": runs}
