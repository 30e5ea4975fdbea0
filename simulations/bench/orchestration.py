"""How much of a round is not the sites' training: Flower's messaging, SecAgg+, the
server's aggregation and the sites' evaluation, read from a run's metrics.jsonl and
its sites' own logs.

server/run_log.py stamps every row with `wall_seconds`, the seconds since the run
started, when the server records it: the `train` rows of round r when the round's
updates arrive (before aggregation), the `evaluate` rows when the sites' validation
results arrive, which ends the round (the console's "round r/R | 201.6s" is that
stamp). A site's fit time stays at the site: each simulated site writes it in its
`site.log` ("round r: trained ... in 1.23 s (kept here)", simulations/site_logs.py),
which the researcher owns. So, per round:

    round wall    = evaluate stamp(r) - evaluate stamp(r-1)          (round 1 from 0)
    fit wall      = train stamp(r)    - evaluate stamp(r-1)
    server test   = test stamp(r)     - train stamp(r)    (rounds with a test evaluation)
    overhead      = (round wall - slowest site's fit) / round wall
    fit overhead  = (fit wall - slowest site's fit) / fit wall
    packed        = max(slowest site's fit, sum of the sites' fits / actor slots)
    beyond packed = (round wall - server test - packed) / (round wall - server test)

With more sites than the machine has actor slots (cores / simulation.cpus_per_site),
the sites train in waves, so even a perfect scheduler's round lasts `packed`: the
share beyond it is what messaging, SecAgg+, the server and the sites' evaluation add.

Round 1 also holds the start-up (the server builds its model and encodes the test
set, Ray starts the site actors, each builds its model and encodes its records), so
the steady-state figure is the mean over rounds 2..R. The last round also holds the
server's evaluation on the test set (every federation.evaluate_test_every rounds): a
measurement the researcher schedules, not orchestration, so it is shown apart and left
out of the share beyond packed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from simulations.bench import targets
from simulations.bench.runner import Bench
from simulations.bench.utility import run_overrides

# a steady round's share beyond its sites' training, packed on the cores (issue target)
ORCHESTRATION_LIMIT = 0.25


def site_fit_seconds(run_dir: Path) -> dict[int, dict[str, float]]:
    """{round: {site: seconds of its fit}} from the simulated sites' own logs."""
    from simulations.site_logs import read_logs

    out: dict[int, dict[str, float]] = {}
    for name, log in read_logs(Path(run_dir) / "site_state").items():
        for rnd, seconds in log.fit_seconds.items():
            out.setdefault(rnd, {})[name] = seconds
    return out


def round_overheads(rows: Iterable[dict], fits: Mapping[int, Mapping[str, float]],
                    slots: int | None = None) -> dict:
    """Per-round walls and overhead shares from metrics.jsonl rows and the sites' fit
    seconds per round (`site_fit_seconds`); `slots`: how many sites can train at once.
    `missing` names what the logs did not hold (those rounds are left out of the means)."""
    rows = list(rows)
    rounds = sorted({r["round"] for r in rows if r.get("phase") in ("train", "evaluate")})
    out, missing, previous_end = [], [], 0.0
    for rnd in rounds:
        train = [r for r in rows if r.get("phase") == "train" and r["round"] == rnd]
        evals = [r["wall_seconds"] for r in rows if r.get("phase") == "evaluate"
                 and r["round"] == rnd and r.get("wall_seconds") is not None]
        seconds = list(fits.get(rnd, {}).values())
        stamps = [r["wall_seconds"] for r in train if r.get("wall_seconds") is not None]
        item: dict = {"round": rnd, "sites_trained": len(seconds)}
        if not evals:
            missing.append(f"round {rnd}: no evaluate rows, so no end-of-round stamp")
        if not seconds:
            missing.append(f"round {rnd}: no site logged its fit time")
        if evals and seconds:
            end, slowest = max(evals), max(seconds)
            packed = max(slowest, sum(seconds) / min(slots, len(seconds))) if slots else None
            wall = end - previous_end
            item.update({"round_seconds": wall, "slowest_train_seconds": slowest,
                         "sum_train_seconds": sum(seconds), "packed_train_seconds": packed,
                         "overhead": (wall - slowest) / wall if wall > 0 else None})
            tested_for = 0.0
            if stamps:
                fit = max(stamps) - previous_end
                test = [r["wall_seconds"] for r in rows if r.get("phase") == "test"
                        and r["round"] == rnd and r.get("wall_seconds") is not None]
                tested = max(test) if test else max(stamps)  # the server's test evaluation
                tested_for = tested - max(stamps)
                item.update({"fit_seconds": fit, "server_test_seconds": tested_for,
                             "evaluate_seconds": end - tested,
                             "fit_overhead": (fit - slowest) / fit if fit > 0 else None})
            work = wall - tested_for  # the round without the scheduled test evaluation
            item["overhead_beyond_packed"] = ((work - packed) / work
                                              if packed is not None and work > 0 else None)
        if evals:
            previous_end = max(evals)
        out.append(item)
    steady = [r for r in out if r["round"] > 1]
    return {"rounds": out, "missing": missing, "slots": slots,
            "first_round_overhead": out[0].get("overhead") if out else None,
            "steady_overhead": targets.mean_sd(r.get("overhead") for r in steady),
            "steady_fit_overhead": targets.mean_sd(r.get("fit_overhead") for r in steady),
            "steady_overhead_beyond_packed": targets.mean_sd(
                r.get("overhead_beyond_packed") for r in steady),
            "steady_round_seconds": targets.mean_sd(r.get("round_seconds") for r in steady)}


def actor_slots(bench: Bench) -> int | None:
    """How many simulated sites train at once on this machine: Ray's CPUs (all of the
    machine's, simulations/run.py) over simulation.cpus_per_site; unknown on a cluster."""
    from common.config import load_yaml

    if bench.ray_address:
        return None
    per_site = load_yaml(bench.config()).simulation.cpus_per_site
    return max(1, int((os.cpu_count() or 1) // per_site))


def orchestration(bench: Bench) -> dict:
    """4 sites (the utility section's DP ε=8 run, seed 0, when it ran) and, in full
    mode, 8 sites with otherwise the same settings."""
    from common.config import load_yaml

    sizes = (4,) if bench.quick else (4, 8)
    seed = bench.seeds[0]
    default_sites = load_yaml(bench.config()).simulation.num_sites
    runs, slots = [], actor_slots(bench)
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
            item.update(round_overheads(run.metrics(), site_fit_seconds(run.run_dir), slots))
            item["target"] = targets.judge_at_most(
                item["steady_overhead_beyond_packed"]["mean"], ORCHESTRATION_LIMIT)
        runs.append(item)
    return {"runs": runs, "slots": slots, "limit": ORCHESTRATION_LIMIT}
