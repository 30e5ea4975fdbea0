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

from simulations.bench import targets
from simulations.bench.orchestration import actor_slots, round_overheads, site_fit_seconds
from simulations.bench.runner import Bench

FULL_SITES, QUICK_SITES = (4, 16, 64), (4, 8)
ROUNDS = 3


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
    return {"rounds": ROUNDS, "device": bench.device, "ray_address": bench.ray_address,
            "slots": slots, "points": points, "linear_growth": linear_growth(points)}
