"""More hospitals on Flower's Ray simulation: the same run (defaults, fewer rounds) at
4, 16 and 64 simulated sites; wall time per round, peak memory of the whole process
tree (the driver, Ray's raylet and its workers) and the ε each site spent. The data is
split among more sites, so each site has fewer records; every site still takes the
configured local steps, so the work per round grows with the sites.

A steady round (rounds 2..R) is timed without the server's test evaluation, which the
last round holds and which does not grow with the sites. Target: the steady round's
seconds per site no larger at the most sites than at the fewest (per-round wall
growing no faster than linearly in sites, on the same cores)."""

from __future__ import annotations

import os
import time

from simulations.bench import targets
from simulations.bench.orchestration import actor_slots, round_overheads, site_fit_seconds
from simulations.bench.runner import Bench

FULL_SITES, QUICK_SITES = (4, 16, 64), (4, 8)
ROUNDS = 3
SHARING_REPEATS = 2


def steady_seconds(rounds: list[dict]) -> float | None:
    """Mean seconds of rounds 2..R without the server's test evaluation."""
    return targets.mean_sd(r["round_seconds"] - (r.get("server_test_seconds") or 0.0)
                           for r in rounds if r["round"] > 1
                           and r.get("round_seconds") is not None)["mean"]


def linear_growth(points: list[dict]) -> dict:
    """Seconds per site of a steady round at the most sites over that at the fewest:
    at most 1 when the wall grows no faster than linearly."""
    done = [p for p in points if p.get("steady_seconds_per_site") is not None]
    if len(done) < 2:
        return {"ratio": None, "status": targets.NOT_RUN}
    first, last = min(done, key=lambda p: p["sites"]), max(done, key=lambda p: p["sites"])
    ratio = last["steady_seconds_per_site"] / first["steady_seconds_per_site"]
    return {"ratio": ratio, "from_sites": first["sites"], "to_sites": last["sites"],
            "status": targets.judge_at_most(ratio, 1.0)}


def _best(repeats: int, work) -> float:
    """The shortest of `repeats` timings of `work()` (seconds): the least-disturbed one."""
    best = float("inf")
    for _ in range(repeats):
        begun = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - begun)
    return best


def sharing_costs(sizes, repeats: int = SHARING_REPEATS) -> list[dict]:
    """SecAgg+'s secret sharing in one round at each number of sites, Flower's own
    (flwr.common.secure_aggregation.crypto.shamir) beside common/shamir.py, timed in
    turn on one core: each site splits its mask seed and its private key into one share
    per site (fedcare's num_shares=1.0), the server recombines every site's seed from
    all the shares (as Flower's unmask stage passes them). Flower's per-seed cost is
    the same for every site, so it is timed once and multiplied; fedcare's is timed
    over all the sites, its Lagrange coefficients computed afresh."""
    from flwr.common.secure_aggregation.crypto import shamir as flower
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    from common import shamir
    from common.config import FederationConfig

    key, seed = private_key_to_bytes(generate_key_pairs()[0]), os.urandom(32)
    rows = []
    for n in sizes:
        t = max(2, round(FederationConfig().secagg_threshold * n))  # as Flower's setup
        row: dict = {"sites": n, "threshold": t}
        for name, impl in (("flower", flower), ("fedcare", shamir)):
            row[f"{name}_split_seconds_per_site"] = _best(repeats, lambda: (
                impl.create_shares(seed, t, n), impl.create_shares(key, t, n)))
            shares = [impl.create_shares(os.urandom(32), t, n) for _ in range(n)]
            if impl is shamir:
                def combine_all():
                    shamir._lagrange_at_zero.cache_clear()
                    for owner in shares:
                        shamir.combine_shares(owner)
                row[f"{name}_combine_seconds"] = _best(repeats, combine_all)
            else:
                row[f"{name}_combine_seconds"] = n * _best(
                    repeats, lambda: flower.combine_shares(shares[0]))
            row[f"{name}_round_seconds"] = (n * row[f"{name}_split_seconds_per_site"]
                                            + row[f"{name}_combine_seconds"])
        row["ratio"] = row["flower_round_seconds"] / row["fedcare_round_seconds"]
        rows.append(row)
    return rows


def scaling(bench: Bench) -> dict:
    seed, slots = bench.seeds[0], actor_slots(bench)
    points = []
    for sites in (QUICK_SITES if bench.quick else FULL_SITES):
        run = bench.simulate(f"scaling-{sites}sites-seed{seed}", {
            "simulation.num_sites": sites, "federation.num_rounds": ROUNDS, "data.seed": seed})
        point = {"sites": sites, "run_dir": str(run.run_dir), "error": run.error,
                 "process_seconds": round(run.seconds, 2),
                 "peak_tree_rss_bytes": run.peak_tree_rss,
                 "peak_processes": run.peak_processes}
        if not run.error:
            rounds = round_overheads(run.metrics(), site_fit_seconds(run.run_dir), slots)
            steady = steady_seconds(rounds["rounds"])
            test = run.summary.get("test") or {}
            eps = [v for v in (run.summary.get("epsilon_per_site") or {}).values()
                   if v is not None]
            point.update({"round_seconds": [r.get("round_seconds") for r in rounds["rounds"]],
                          "steady_seconds": steady,
                          "steady_seconds_per_site": steady / sites if steady else None,
                          "steady_overhead_beyond_packed":
                              rounds["steady_overhead_beyond_packed"]["mean"],
                          "epsilon_min": min(eps, default=None),
                          "epsilon_max": max(eps, default=None),
                          "sites_with_epsilon": len(eps),
                          "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1")})
        points.append(point)
    sizes = QUICK_SITES if bench.quick else FULL_SITES
    return {"rounds": ROUNDS, "device": bench.device, "ray_address": bench.ray_address,
            "slots": slots, "points": points, "linear_growth": linear_growth(points),
            "secagg_sharing": sharing_costs(sizes)}
