"""LoRA after the head, at equal ε: simulations/configs/lora.yaml (default.yaml's head
rounds, then DP LoRA rounds) beside the head-only default (utility's `dp_eps8` run, the
same simulation), both at ε = 8 per site; seeds are data.seed. The LoRA run evaluates the
global model on the test set after every round (the server's own data: no site pays for
it), so the section reads, within one run, what the head rounds reached and what the
LoRA rounds made of it.

Target, paired by seed: the LoRA rounds do not lose what the head rounds reached (the
last round's macro-F1 at least the last head round's). Shown: lora.yaml against the
head-only recipe, whose head rounds had a little more of the budget."""

from __future__ import annotations

from simulations.bench import targets
from simulations.bench.runner import DEFAULT_CONFIG, Bench
from simulations.bench.utility import run_overrides

LORA = DEFAULT_CONFIG.parent / "lora.yaml"
HEAD_ONLY = "dp_eps8"           # utility's setup: default.yaml at ε = 8
LIMIT_POINTS = 0.0              # the LoRA rounds may lose no macro-F1 point


def lora(bench: Bench) -> dict:
    from common.config import load_yaml

    train = load_yaml(bench.config(LORA)).train
    runs: dict[str, list[dict]] = {"head_only": [], "lora": []}
    for seed in bench.seeds:  # seeds outside: load drift hits both recipes
        name, overrides = run_overrides(bench, HEAD_ONLY, seed)
        runs["head_only"].append({"seed": seed, **bench.simulate(name, overrides).record()})
        run = bench.simulate(f"lora-seed{seed}", {"data.seed": seed,
                                                  "federation.evaluate_test_every": 1},
                             config=LORA)
        runs["lora"].append({"seed": seed, **run.record(),
                             **head_round_metrics(run.metrics(), train.head_rounds)})
    return {"device": bench.device, "seeds": list(bench.seeds),
            "head_rounds": train.head_rounds, "lora": {
                "learning_rate": train.learning_rate, "local_steps": train.local_steps,
                "batch_size": train.batch_size},
            "configs": {k: summarize(v) for k, v in runs.items()},
            "comparisons": compare(runs)}


def head_round_metrics(metrics: list[dict], head_rounds: int) -> dict:
    """The global model's test metrics after the last head round, and every round's
    test macro-F1 (metrics.jsonl's test rows)."""
    tests = sorted((r for r in metrics if r.get("phase") == "test"), key=lambda r: r["round"])
    by_round = {r["round"]: r for r in tests}  # a resumed run's round tested again: the last
    last_head = by_round.get(head_rounds, {})
    return {"head_accuracy": last_head.get("accuracy"), "head_macro_f1": last_head.get("macro_f1"),
            "macro_f1_by_round": {n: r.get("macro_f1") for n, r in by_round.items()}}


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r.get("error")]
    return {"runs": runs, "failed": len(runs) - len(ok),
            **{key: targets.mean_sd(r.get(key) for r in ok) for key in (
                "accuracy", "macro_f1", "head_accuracy", "head_macro_f1", "epsilon_max",
                "process_seconds")}}


def compare(runs: dict[str, list[dict]]) -> list[dict]:
    """Macro-F1 points, reference − other, paired by seed: the LoRA rounds against the
    run's own head rounds (judged), and lora.yaml against the head-only recipe (shown)."""
    def by_seed(rows, key):
        return {r["seed"]: r.get(key) for r in rows if not r.get("error")}

    kept = targets.paired_gap_points(by_seed(runs["lora"], "head_macro_f1"),
                                     by_seed(runs["lora"], "macro_f1"))
    beside = targets.paired_gap_points(by_seed(runs["head_only"], "macro_f1"),
                                       by_seed(runs["lora"], "macro_f1"))
    return [{"name": "LoRA rounds vs the run's last head round", "gap_points": kept,
             "limit_points": LIMIT_POINTS,
             "status": targets.judge_at_most(kept.get("mean"), LIMIT_POINTS)},
            {"name": "lora.yaml vs the head-only default (ε=8)", "gap_points": beside,
             "limit_points": None,
             "status": "shown, not judged" if beside.get("n") else targets.NOT_RUN}]
