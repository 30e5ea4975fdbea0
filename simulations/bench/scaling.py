"""More hospitals on Flower's Ray simulation: the same run (defaults, fewer rounds) at
4, 16 and 64 simulated sites; wall time per round and peak memory of the whole process
tree (the driver, Ray's raylet and its workers). The data is split among more sites,
so each site has fewer records; every site still takes the configured local steps."""

from __future__ import annotations

from simulations.bench import targets
from simulations.bench.orchestration import round_overheads
from simulations.bench.runner import Bench

FULL_SITES, QUICK_SITES = (4, 16, 64), (4, 8)
ROUNDS = 2


def scaling(bench: Bench) -> dict:
    seed = bench.seeds[0]
    points = []
    for sites in (QUICK_SITES if bench.quick else FULL_SITES):
        run = bench.simulate(f"scaling-{sites}sites-seed{seed}", {
            "simulation.num_sites": sites, "federation.num_rounds": ROUNDS, "data.seed": seed})
        point = {"sites": sites, "run_dir": str(run.run_dir), "error": run.error,
                 "process_seconds": round(run.seconds, 2),
                 "peak_tree_rss_bytes": run.peak_tree_rss,
                 "peak_processes": run.peak_processes}
        if not run.error:
            rounds = round_overheads(run.metrics())["rounds"]
            walls = [r.get("round_seconds") for r in rounds]
            test = run.summary.get("test") or {}
            point.update({"round_seconds": walls,
                          "round_seconds_mean": targets.mean_sd(walls)["mean"],
                          "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1")})
        points.append(point)
    return {"rounds": ROUNDS, "device": bench.device, "ray_address": bench.ray_address,
            "points": points}
