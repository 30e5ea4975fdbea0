"""results.json -> results.md (one Markdown file of tables, headed by the machine)
and one PNG + SVG plot per section. Only reads the results dict: the tests feed it
hand-made results.

Size: each benchmark section's table and its plot, side by side; read one section
at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench.targets import MET, MISSED

SECTION_TITLES = {
    "utility": "1. Utility at equal compute",
    "dp-cost": "2. DP cost per step",
    "bytes": "3. Bytes per site per round",
    "accounting": "4. Accounting: claimed ε vs PLD and RDP",
    "orchestration": "5. Orchestration overhead",
    "scaling": "6. Scaling on Flower's Ray simulation",
    "personalization": "7. Personalisation under strong skew",
    "robustness": "8. Robustness to one poisoned site",
    "patients": "9. Patient-level privacy",
    "lora": "10. LoRA after the head",
}


# -- formatting ----------------------------------------------------------------------
def num(x, digits: int = 3, scale: float = 1.0) -> str:
    return "—" if x is None else f"{x * scale:.{digits}f}"


def pm(stat: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± sd' of a targets.mean_sd dict; the mean alone for one value."""
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("n", 0) > 1:
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}"


def seconds(stat: dict | None) -> str:
    """A step time: seconds, or milliseconds below one second."""
    if not stat or stat.get("mean") is None:
        return "—"
    if stat["mean"] < 1.0:
        return pm(stat, 1, 1000.0) + " ms"
    return pm(stat, 2) + " s"


def gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def mark(status: str) -> str:
    """met / **missed** / not run, as the tables show a verdict."""
    return {MET: "met", MISSED: "**missed**"}.get(status, status or "—")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# -- the Markdown file ---------------------------------------------------------------
def render(results: dict) -> str:
    lines = header(results)
    for key, title in SECTION_TITLES.items():
        if key in results.get("sections", {}):
            section = results["sections"][key]
            ran = (f"Ran in {num(section.get('seconds'), 0)} s on commit "
                   f"{section.get('commit') or '?'}.")
            lines += ["", f"## {title}", "", ran, ""]
            lines += RENDERERS[key](section)
    if results.get("errors"):
        lines += ["", "## Sections that failed", ""]
        lines += [f"- {name}: `{why.splitlines()[-1] if why else ''}`"
                  for name, why in results["errors"].items()]
    return "\n".join(lines) + "\n"


def header(results: dict) -> list[str]:
    m = results.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    device = m.get("device", "?")
    device_text = f"{device} ({m.get('device_name')})" if m.get("device_name") else device
    commit = (m.get("git_commit") or "?") + (" + uncommitted changes" if m.get("git_dirty")
                                             else "")
    rows = [
        ["date", results.get("started", "?")],
        ["mode", results.get("mode", "?")],
        ["command", f"`{results.get('command', '')}`"],
        ["CPU", m.get("cpu", "?")],
        ["cores", f"{m.get('logical_cores', '?')} logical, "
                  f"{m.get('physical_cores', '?')} physical"],
        ["RAM", gib(m.get("ram_bytes"))],
        ["torch threads", f"{m.get('torch_threads', '?')} in the DP-cost processes; each "
                          "simulated site uses simulation.cpus_per_site"],
        ["device", device_text],
        ["load average at start", " / ".join(str(x) for x in m.get("load_average", []))],
        ["software", f"Python {m.get('python', '?')}; {versions}"],
        ["commit", commit],
        ["configs", ", ".join(f"`config/{name}`" for name in results.get("configs", {}))
         + " (resolved at the start; every run starts from them)"
         if results.get("configs") else "—"],
        ["bench wall time", f"{num(results.get('wall_seconds'), 0)} s"
                            + (" (of the last start)" if results.get("resumed") else "")],
        *([["resumed", ", ".join(results["resumed"])
            + " (`--resume`: each section names the commit it ran on)"]]
          if results.get("resumed") else []),
    ]
    return [f"# fedcare benchmark ({results.get('mode', '?')})", "",
            *table(["", ""], rows)]


def render_utility(s: dict) -> list[str]:
    seeds = ", ".join(str(x) for x in s.get("seeds", []))
    ref = next((c for c in s["configs"] if c["name"] == "fed_nonprivate"), None)
    ref_f1 = (ref or {}).get("macro_f1", {}).get("mean")
    rows = []
    for c in s["configs"]:
        f1 = c["macro_f1"].get("mean")
        delta = None if f1 is None or ref_f1 is None else 100 * (ref_f1 - f1)
        overrides = ", ".join(f"{k}={v}" for k, v in c["overrides"].items()) or "—"
        rows.append([c["label"], overrides,
                     f"{c['accuracy'].get('n', 0)}" + (f" ({c['failed']} failed)"
                                                       if c.get("failed") else ""),
                     pm(c["accuracy"]), pm(c["macro_f1"]), num(delta, 1),
                     pm(c.get("epsilon_max"), 2), pm(c["process_seconds"], 0),
                     pm(c.get("site_feature_seconds"), 0)])
    out = [f"Seeds (data.seed): {seeds}; device {s.get('device')}. Every run is "
           "simulations/configs/default.yaml plus the overrides shown, so all take the same "
           "rounds, local steps and batch. Test set: the held-out ICD-10 categories. "
           "A site computes its pooled features once per bench for the same records "
           "(simulation.feature_cache_dir): the first run over a seed's sites pays that "
           "pass, later ones load it; the last column is what each run's sites spent on it, "
           "summed over sites.", "",
           *table(["configuration", "overrides", "runs", "test accuracy", "test macro-F1",
                   "F1 points below fed. non-private", "ε (largest site)", "wall s / run",
                   "site feature s / run"],
                  rows), "",
           *table(["target", "gap (macro-F1 points, paired by seed)", "limit", "result"],
                  [[g["name"], pm(g["gap_points"], 1), f"≤ {g['limit_points']:g}",
                    mark(g["status"])] for g in s["gaps"]])]
    return out


def render_dp_cost(s: dict) -> list[str]:
    rows = []
    for sh in s["shapes"]:
        mem = sh.get("memory_measure", "peak_rss_bytes")
        rows.append([sh["label"], seconds(sh["dp"]["step_seconds"]),
                     seconds(sh["plain"]["step_seconds"]),
                     f"{num(sh['dp']['rows_per_step'], 0)} / {num(sh['plain']['rows_per_step'], 0)}",
                     num(sh["time_ratio"], 3) + "×",
                     gib((sh["dp"][mem] or {}).get("mean")),
                     gib((sh["plain"][mem] or {}).get("mean")),
                     num(sh["memory_ratio"], 3) + "×",
                     f"{mark(sh['time_status'])} / {mark(sh['memory_status'])}"])
    first = (s.get("shapes") or [{}])[0]
    memory_name = ("torch.cuda.max_memory_allocated"
                   if first.get("memory_measure") == "peak_cuda_bytes"
                   else "peak RSS (ru_maxrss) of the process")
    return [f"Device {s.get('device')}, {first.get('threads', '?')} torch threads; "
            f"{s.get('repetitions')} fresh processes per mode, {s.get('warmup_steps')} "
            f"warm-up + {s.get('timed_steps')} timed steps each, DP and plain interleaved. "
            "The time ratio compares seconds per nominal batch (Poisson batches vary in "
            f"size); memory is {memory_name}. Target: ≤ {s.get('limit_ratio', 1.1):g}× in both.",
            "", *table(["shape", "DP step", "plain step", "rows/step DP / plain",
                        "time DP/plain", "DP peak", "plain peak", "memory DP/plain",
                        "result (time / memory)"], rows)]


def render_bytes(s: dict) -> list[str]:
    rows = [[u["kind"], f"{u['params']:,}", f"{u['bytes']:,}", f"{u['percent']:.3f}%",
             mark(u["status"])] for u in s["updates"]]
    rows += [[f"{r['run']}: as sent (largest; mean {r['mean_bytes']:,.0f} B)", "—",
              f"{r['bytes']:,}", f"{r['percent']:.3f}%", mark(r["status"])]
             for r in s.get("recorded", [])]
    return [f"Full model: {s['model_params']:,} parameters = {s['model_bytes']:,} bytes in "
            f"fp32. LoRA r={s['lora']['r']} on {', '.join(s['lora']['target_modules'])}; the "
            f"defaults run {s.get('head_rounds')} head round(s) of "
            f"{s.get('num_rounds')}. Target: ≤ {s['limit_percent']:g}% of the model.", "",
            *table(["update", "params", "bytes", "of the fp32 model", "result"], rows)]


def render_accounting(s: dict) -> list[str]:
    rows = [[r.get("source", "grid"), num(r.get("sigma"), 3), num(r.get("q"), 4),
             r.get("steps"), f"{r['delta']:g}", num(r["prv"], 4), num(r["pld"], 4),
             num(r["rdp"], 4), num(r.get("prv_over_pld"), 4), num(r.get("rdp_over_pld"), 3),
             mark(r["status"])] for r in s["rows"]]
    worst, worst1 = s.get("worst_relative_deviation"), s.get("worst_relative_deviation_eps_ge_1")
    return [f"Claimed ε is fedcare's accountant (Opacus PRV, eps_upper); PLD and RDP are "
            f"dp-accounting ({s.get('method')}). Target: claimed within "
            f"{100 * s['limit_relative']:g}% of PLD. Mechanisms with RDP ε > "
            f"{s.get('max_epsilon'):g} are left out ({len(s.get('skipped_over_max_epsilon', []))}).",
            "",
            f"- all rows: worst |PRV/PLD − 1| = {num(worst, 4, 100)}% → "
            f"**{mark(s['status']).strip('*')}** ({s.get('met_rows')}/{s.get('judged_rows')} "
            "rows within 1%)",
            f"- rows with ε ≥ 1: worst = {num(worst1, 4, 100)}% → "
            f"**{mark(s['status_eps_ge_1']).strip('*')}** (below ε = 1 PRV's stated absolute "
            "error of 0.01 alone can exceed 1%)", "",
            *table(["source", "σ", "q", "steps", "δ", "claimed (PRV)", "PLD", "RDP",
                    "PRV/PLD", "RDP/PLD", "result"], rows)]


def render_orchestration(s: dict) -> list[str]:
    rows, summary = [], []
    for run in s["runs"]:
        if run.get("error"):
            summary.append([run["sites"], "run failed", "—", "—", "—", "—", "—"])
            continue
        for r in run.get("rounds", []):
            rows.append([run["sites"], r["round"], num(r.get("round_seconds"), 1),
                         num(r.get("fit_seconds"), 1), num(r.get("server_test_seconds"), 1),
                         num(r.get("evaluate_seconds"), 1),
                         num(r.get("slowest_train_seconds"), 2),
                         num(r.get("sum_train_seconds"), 2),
                         num(r.get("packed_train_seconds"), 2),
                         num(r.get("overhead"), 1, 100) + "%",
                         num(r.get("overhead_beyond_packed"), 1, 100) + "%"])
        summary.append([run["sites"], pm(run.get("steady_round_seconds"), 1),
                        pm(run.get("steady_overhead"), 1, 100) + "%",
                        pm(run.get("steady_fit_overhead"), 1, 100) + "%",
                        pm(run.get("steady_overhead_beyond_packed"), 1, 100) + "%",
                        mark(run.get("target", "")),
                        num(run.get("first_round_overhead"), 1, 100) + "%"])
    missing = [f"- {run['sites']} sites: {m}" for run in s["runs"] for m in run.get("missing", [])]
    splits = [f"- {run['sites']} sites: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.0f} s" for k, v in run["time_split_seconds"].items())
        for run in s["runs"] if run.get("time_split_seconds")]
    slots = s.get("slots")
    return ["A site's fit: its own time for a round's training, accounting and ledger "
            "(its site.log). overhead = (round wall − slowest site's fit) / round wall; fit "
            "overhead uses the training phase only (up to the moment the updates reach the "
            "server). packed = max(slowest fit, sum of fits / "
            f"{slots if slots else '?'} actor slots): the shortest a round of these fits "
            "could take on this machine's cores, since more sites than slots train in waves; "
            "beyond packed = (round wall − server test − packed) / (round wall − server "
            "test) is what messaging, SecAgg+, the server's checks and aggregation and the "
            "sites' evaluation add (the server's test evaluation, every "
            "federation.evaluate_test_every rounds, is a measurement, shown apart). "
            "Target: beyond packed ≤ "
            f"{100 * s.get('limit', 0.25):.0f}% in steady rounds. Round 1 includes "
            "start-up (Ray, models, tokenising, the sites' pooled features).", "",
            *table(["sites", "steady round s (rounds ≥ 2)", "steady overhead",
                    "steady fit overhead", "steady beyond packed", "target",
                    "round-1 overhead"], summary), "",
            *table(["sites", "round", "round s", "fit s", "server test s", "site evaluate s",
                    "slowest fit s", "sum of fits s", "packed s", "overhead",
                    "beyond packed"], rows),
            *(["", "The server's own split of each run's time (summary.json):", *splits]
              if splits else []),
            *([""] + ["Not in the logs:"] + missing if missing else [])]


def render_scaling(s: dict) -> list[str]:
    rows = []
    for p in s["points"]:
        if p.get("error"):
            rows.append([p["sites"], "failed", "—", "—", "—", gib(p.get("peak_tree_rss_bytes")),
                         "—", "—", num(p.get("process_seconds"), 0),
                         p["error"].splitlines()[0][:80]])
            continue
        eps = (f"{num(p.get('epsilon_min'), 2)}–{num(p.get('epsilon_max'), 2)} "
               f"({p.get('sites_with_epsilon')} sites)")
        rows.append([p["sites"], num(p.get("steady_seconds"), 1),
                     num(p.get("steady_seconds_per_site"), 2),
                     ", ".join(num(x, 1) for x in p.get("round_seconds", [])),
                     num(p.get("steady_overhead_beyond_packed"), 1, 100) + "%",
                     gib(p.get("peak_tree_rss_bytes")), p.get("peak_processes"), eps,
                     num(p.get("process_seconds"), 0),
                     f"{num(p.get('accuracy'))} / {num(p.get('macro_f1'))}"])
    where = f"Ray cluster at {s['ray_address']}" if s.get("ray_address") else "local Ray"
    growth = s.get("linear_growth") or {}
    verdict = (f"steady seconds per site at {growth.get('to_sites')} sites / at "
               f"{growth.get('from_sites')}: {num(growth.get('ratio'), 2)} → "
               f"{mark(growth.get('status', ''))}" if growth.get("ratio") is not None
               else "not run (fewer than two sizes measured)")
    return [f"{s.get('rounds')} rounds, defaults otherwise; {where}, device "
            f"{s.get('device')}, {s.get('slots') or '?'} actor slots. A steady round: rounds "
            "≥ 2 without the server's test evaluation (the last round's). Peak memory: sum of "
            "RSS over the process tree (driver, raylet, workers), sampled every 0.5 s; shared "
            "pages count once per process. ε: the least and most a site spent (per unit).", "",
            f"Target, per-round wall growing no faster than linearly in sites: {verdict}.", "",
            *table(["sites", "steady s/round", "steady s/round per site", "per round s",
                    "steady beyond packed", "peak memory (tree)", "processes", "ε per site",
                    "wall s", "test accuracy / macro-F1"], rows),
            *render_sharing(s.get("secagg_sharing") or [])]


def render_sharing(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return ["", "SecAgg+ secret sharing in one round, timed side by side on one core: every "
            "site splits its mask seed and private key into one share per site, the server "
            "recombines every seed from all the shares. Flower's: its own "
            "flwr.common.secure_aggregation.crypto.shamir; fedcare's: common/shamir.py, "
            "which the sites and the server run. Round s = sites × split + combine (the "
            "sites split in parallel when they are hospitals; in a simulation they share "
            "the actor slots).", "",
            *table(["sites", "threshold", "split per site s (Flower / fedcare)",
                    "combine all seeds s (Flower / fedcare)",
                    "round s (Flower / fedcare)", "Flower / fedcare"],
                   [[r["sites"], r["threshold"],
                     f"{num(r['flower_split_seconds_per_site'], 4)} / "
                     f"{num(r['fedcare_split_seconds_per_site'], 4)}",
                     f"{num(r['flower_combine_seconds'], 3)} / "
                     f"{num(r['fedcare_combine_seconds'], 3)}",
                     f"{num(r['flower_round_seconds'], 2)} / {num(r['fedcare_round_seconds'], 2)}",
                     f"{num(r['ratio'], 0)}×"] for r in rows])]


def render_personalization(s: dict) -> list[str]:
    rows = [[r["seed"], r["site"], num(r["global_accuracy"]), num(r["personal_accuracy"]),
             num(r["global_macro_f1"]), num(r["personal_macro_f1"]),
             num(r["epsilon_global"], 2), num(r["epsilon_total"], 2),
             (r.get("refused") or "")[:60]] for r in s["rows"]]
    errors = [f"- seed {e['seed']}: {e['error'].splitlines()[0]}" for e in s.get("errors", [])]
    return [f"Config {s.get('config')}, seeds {', '.join(map(str, s.get('seeds', [])))}; "
            "metrics on each site's own validation records. ε global: after the last "
            "federated round; ε total: after personalising (what the site was charged).", "",
            f"Mean gain from personalising: accuracy {pm(s.get('gain_accuracy_points'), 1)} "
            f"points, macro-F1 {pm(s.get('gain_macro_f1_points'), 1)} points.", "",
            *table(["seed", "site", "global acc", "personal acc", "global F1", "personal F1",
                    "ε global", "ε total", "refused"], rows),
            *([""] + errors if errors else [])]


def render_robustness(s: dict) -> list[str]:
    overrides = ", ".join(f"{k}={v}" for k, v in s.get("overrides", {}).items())
    poison = s.get("poison", {})
    gaps = {g["name"]: g for g in s.get("gaps", [])}
    rows = []
    for c in s["configs"]:
        g = gaps.get(c["name"])
        rows.append([c["label"], f"{c['accuracy'].get('n', 0)}"
                     + (f" ({c['failed']} failed)" if c.get("failed") else ""),
                     pm(c["accuracy"]), pm(c["macro_f1"]),
                     pm(g["gap_points"]["accuracy"], 1) if g else "—",
                     pm(g["gap_points"]["macro_f1"], 1) if g else "—",
                     mark(g["status"]) if g else "reference", pm(c["process_seconds"], 0)])
    return [f"Seeds (data.seed): {', '.join(map(str, s.get('seeds', [])))}; device "
            f"{s.get('device')}. simulations/configs/default.yaml with {overrides}; "
            f"{poison.get('site')} sends global + {poison.get('factor'):g} × its update. "
            "Gaps: points below the mean without attack, paired by seed; a robust rule "
            f"under attack meets the target at ≤ {s.get('limit_points', 2):g} macro-F1 points.",
            "",
            *table(["configuration", "runs", "test accuracy", "test macro-F1",
                    "accuracy points below", "F1 points below", "result", "wall s / run"],
                   rows)]


def render_patients(s: dict) -> list[str]:
    ref = next((c for c in s["configs"] if c["name"] == "record_eps8"), None)
    ref_f1 = (ref or {}).get("macro_f1", {}).get("mean")
    rows = []
    for c in s["configs"]:
        f1 = c["macro_f1"].get("mean")
        below = None if f1 is None or ref_f1 is None else 100 * (ref_f1 - f1)
        rows.append([c["label"], c["guarantee"], f"{c['accuracy'].get('n', 0)}"
                     + (f" ({c['failed']} failed)" if c.get("failed") else ""),
                     pm(c["accuracy"]), pm(c["macro_f1"]), num(below, 1),
                     pm(c.get("sigma"), 2), pm(c.get("q"), 3), pm(c["process_seconds"], 0)])
    def limit(g):
        return ("—" if g["limit_points"] is None else
                f"{'≤' if g['rule'] == 'at_most' else '≥'} {g['limit_points']:g}")
    return [f"Seeds (data.seed: split, partition and synthetic patients): "
            f"{', '.join(map(str, s.get('seeds', [])))}; device {s.get('device')}. Every run "
            "is simulations/configs/patients.yaml plus its overrides; the promise per "
            f"patient is ε={s.get('epsilon', 8):g}, δ={s.get('delta', 1e-5):g} per site. "
            "σ: the largest noise multiplier a site trained with; q: its sampling rate "
            "(of patients for ULS, of notes otherwise).", "",
            *table(["configuration", "promise", "runs", "test accuracy", "test macro-F1",
                    "F1 points below record ε=8", "σ", "q", "wall s / run"], rows), "",
            *table(["comparison", "points (macro-F1, reference − other, paired by seed)",
                    "limit", "result"],
                   [[g["name"], pm(g["gap_points"], 1), limit(g), mark(g["status"])]
                    for g in s["comparisons"]])]


def render_lora(s: dict) -> list[str]:
    lora, head = s["configs"]["lora"], s["configs"]["head_only"]
    rows = [["head-only default (`dp_eps8`)", f"{head['accuracy'].get('n', 0)}", "—", "—",
             pm(head["accuracy"]), pm(head["macro_f1"]), pm(head["epsilon_max"], 2),
             pm(head["process_seconds"], 0)],
            ["lora.yaml", f"{lora['accuracy'].get('n', 0)}", pm(lora["head_accuracy"]),
             pm(lora["head_macro_f1"]), pm(lora["accuracy"]), pm(lora["macro_f1"]),
             pm(lora["epsilon_max"], 2), pm(lora["process_seconds"], 0)]]
    per_run = [[r["seed"], ", ".join(f"{num(f1)}" for _, f1 in sorted(
        (r.get("macro_f1_by_round") or {}).items(), key=lambda kv: int(kv[0])))]
        for r in lora["runs"] if not r.get("error")]
    t = s.get("lora", {})
    return [f"Seeds (data.seed): {', '.join(map(str, s.get('seeds', [])))}; device "
            f"{s.get('device')}. simulations/configs/lora.yaml: {s.get('head_rounds')} head "
            f"rounds, then LoRA rounds of {t.get('local_steps')} DP-SGD steps at an expected "
            f"{t.get('batch_size')} notes, Adam lr {t.get('learning_rate'):g}; ε = 8 per site "
            "for both recipes. The LoRA run is tested after every round; \"after the head "
            "rounds\" is its last head round.", "",
            *table(["recipe", "runs", "after the head rounds: accuracy",
                    "after the head rounds: macro-F1", "final accuracy", "final macro-F1",
                    "ε per site (max)", "wall s / run"], rows), "",
            *table(["comparison", "points (macro-F1, reference − other, paired by seed)",
                    "limit", "result"],
                   [[g["name"], pm(g["gap_points"], 1),
                     "—" if g["limit_points"] is None else f"≤ {g['limit_points']:g}",
                     mark(g["status"])] for g in s["comparisons"]]), "",
            *table(["seed", "lora.yaml test macro-F1 after each round"], per_run)]


RENDERERS = {"utility": render_utility, "dp-cost": render_dp_cost, "bytes": render_bytes,
             "accounting": render_accounting, "orchestration": render_orchestration,
             "scaling": render_scaling, "personalization": render_personalization,
             "robustness": render_robustness, "patients": render_patients,
             "lora": render_lora}


# -- plots ---------------------------------------------------------------------------
def plot_all(results: dict, out: Path) -> list[Path]:
    """One figure per section that has one, as PNG and SVG; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, section in results.get("sections", {}).items():
        draw = PLOTS.get(key)
        if draw is None:
            continue
        fig = draw(plt, section)
        if fig is None:
            continue
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = Path(out) / f"{key}.{ext}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


def _bars(ax, labels, means, sds, color=None):
    ax.bar(range(len(labels)), means, yerr=sds, capsize=3, color=color)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)


def plot_utility(plt, s):
    configs = [c for c in s["configs"] if c["macro_f1"].get("mean") is not None]
    if not configs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("accuracy", "macro_f1")):
        _bars(ax, [c["name"] for c in configs], [c[metric]["mean"] for c in configs],
              [c[metric]["sd"] for c in configs])
        ax.set_ylabel(f"test {metric.replace('_', '-')}")
        ax.set_ylim(0, 1)
    fig.suptitle(f"Utility at equal compute (seeds {s.get('seeds')})")
    return fig


def plot_dp_cost(plt, s):
    fig, (ratio, absolute) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [sh["shape"] for sh in s["shapes"]]
    xs = range(len(labels))
    width = 0.38
    for k, (key, name) in enumerate((("time_ratio", "time"), ("memory_ratio", "peak memory"))):
        ratio.bar([i + (k - 0.5) * width for i in xs],
                  [sh.get(key) or 0 for sh in s["shapes"]], width, label=name)
    ratio.axhline(s.get("limit_ratio", 1.1), color="k", ls="--", lw=1, label="target")
    ratio.set_title("DP / plain")
    for k, mode in enumerate(("plain", "dp")):
        absolute.bar([i + (k - 0.5) * width for i in xs],
                     [sh[mode]["seconds_per_nominal_batch"]["mean"] or 0 for sh in s["shapes"]],
                     width, label=mode)
    absolute.set_yscale("log")
    absolute.set_title("seconds per step (nominal batch)")
    for ax in (ratio, absolute):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.legend(fontsize=8)
    return fig


def plot_accounting(plt, s):
    rows = [r for r in s["rows"] if r.get("prv_over_pld") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["pld"] for r in rows], [r["prv_over_pld"] for r in rows], label="PRV / PLD")
    ax.scatter([r["pld"] for r in rows], [r["rdp_over_pld"] for r in rows], marker="x",
               label="RDP / PLD")
    ax.axhspan(1 - s["limit_relative"], 1 + s["limit_relative"], alpha=0.2, color="green",
               label="±1% target")
    ax.set_xscale("log")
    ax.set_xlabel("ε by PLD")
    ax.set_ylabel("ratio to PLD")
    ax.legend()
    return fig


def plot_orchestration(plt, s):
    runs = [r for r in s["runs"] if r.get("rounds")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rounds = [r for r in run["rounds"] if r.get("round_seconds") is not None]
        xs = [r["round"] for r in rounds]
        train = [r.get("packed_train_seconds") or r["slowest_train_seconds"] for r in rounds]
        rest = [r["round_seconds"] - t for r, t in zip(rounds, train)]
        ax.bar(xs, train, label="the sites' fits, packed on the cores")
        ax.bar(xs, rest, bottom=train, label="everything else")
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.set_title(f"{run['sites']} sites")
        ax.legend(fontsize=8)
    return fig


def plot_scaling(plt, s):
    points = [p for p in s["points"] if not p.get("error") and p.get("steady_seconds")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    sites = [p["sites"] for p in points]
    ax.plot(sites, [p["steady_seconds"] for p in points], "o-", label="s / steady round")
    first = points[0]
    ax.plot(sites, [first["steady_seconds"] * n / first["sites"] for n in sites], ":",
            color="C0", label="linear in sites")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simulated sites")
    ax.set_ylabel("seconds per round")
    twin = ax.twinx()
    twin.plot(sites, [p["peak_tree_rss_bytes"] / 2**30 for p in points], "s--", color="C1",
              label="peak memory")
    twin.set_ylabel("peak memory of the process tree (GiB)")
    fig.legend(loc="upper left")
    return fig


def plot_personalization(plt, s):
    rows = [r for r in s["rows"] if r.get("personal_macro_f1") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([r["global_macro_f1"] for r in rows], [r["personal_macro_f1"] for r in rows])
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("global model macro-F1 (site's own validation)")
    ax.set_ylabel("personalised macro-F1")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return fig


def plot_robustness(plt, s):
    configs = [c for c in s["configs"] if c["macro_f1"].get("mean") is not None]
    if not configs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["C0" if not c["attacked"] else "C3" if c["aggregation"] == "mean" else "C2"
              for c in configs]
    for ax, metric in zip(axes, ("accuracy", "macro_f1")):
        _bars(ax, [c["label"] for c in configs], [c[metric]["mean"] for c in configs],
              [c[metric]["sd"] for c in configs], color=colors)
        reference = configs[0][metric]["mean"] if not configs[0]["attacked"] else None
        if reference is not None:
            ax.axhline(reference - s.get("limit_points", 2) / 100, color="k", ls="--", lw=1)
        ax.set_ylabel(f"test {metric.replace('_', '-')}")
        ax.set_ylim(0, 1)
    fig.suptitle(f"One of five sites poisoned (seeds {s.get('seeds')}); dashed: "
                 "no-attack mean − 2 points")
    return fig


PLOTS = {"utility": plot_utility, "dp-cost": plot_dp_cost, "accounting": plot_accounting,
         "orchestration": plot_orchestration, "scaling": plot_scaling,
         "personalization": plot_personalization, "robustness": plot_robustness}


def write(results: dict, out: Path) -> None:
    """results.json, results.md and the plots, all at once (after every section)."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True,
                                                 default=str))
    (out / "results.md").write_text(render(results), encoding="utf-8")
    plot_all(results, out)
