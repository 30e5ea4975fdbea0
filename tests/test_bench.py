"""The benchmark's arithmetic and its tables, on hand-made inputs (no model, no runs)."""

from __future__ import annotations

import json

import pytest

from common.config import load_yaml
from simulations.bench import report, targets
from simulations.bench.orchestration import round_overheads
from simulations.bench.utility import Setup, gaps, summarize


# -- targets -------------------------------------------------------------------------
def test_paired_gap_is_reference_minus_other_in_points_over_shared_seeds():
    gap = targets.paired_gap_points({0: 0.70, 1: 0.60, 2: 0.50}, {0: 0.66, 1: 0.58})
    assert gap["seeds"] == [0, 1]  # seed 2 has no partner and is left out
    assert gap["n"] == 2
    assert gap["mean"] == pytest.approx(3.0)        # (4 + 2) / 2 points
    assert gap["sd"] == pytest.approx(1.41421356, rel=1e-6)


def test_judging_at_most_a_limit():
    assert targets.judge_at_most(3.0, 3.0) == targets.MET        # the limit itself is met
    assert targets.judge_at_most(3.01, 3.0) == targets.MISSED
    assert targets.judge_at_most(-1.0, 3.0) == targets.MET       # DP better than reference
    assert targets.judge_at_most(None, 3.0) == targets.NOT_RUN
    assert targets.judge_at_most(float("nan"), 3.0) == targets.NOT_RUN


def test_relative_judgement_is_two_sided():
    assert targets.judge_relative(1.009, 1.0, 0.01) == targets.MET
    assert targets.judge_relative(0.989, 1.0, 0.01) == targets.MISSED
    assert targets.judge_relative(1.02, 1.0, 0.01) == targets.MISSED
    assert targets.judge_relative(1.0, None, 0.01) == targets.NOT_RUN


def test_mean_sd_ignores_missing_values():
    stat = targets.mean_sd([1.0, None, 3.0, float("nan")])
    assert stat == {"mean": 2.0, "sd": pytest.approx(2 ** 0.5), "n": 2}
    assert targets.mean_sd([5.0])["sd"] == 0.0
    assert targets.mean_sd([]) == {"mean": None, "sd": None, "n": 0}


def _run(seed, f1, acc=0.5, error=None):
    return {"seed": seed, "macro_f1": f1, "accuracy": acc, "process_seconds": 100.0,
            "epsilon_max": None, "error": error}


def _utility_configs(fed, dp8, pooled=None, dp3=None):
    setups = [("fed_nonprivate", fed), ("dp_eps8", dp8), ("pooled", pooled), ("dp_eps3", dp3)]
    return [summarize(Setup(name, name, {}), runs) for name, runs in setups if runs]


def test_gaps_marks_each_target_met_missed_or_not_run():
    configs = _utility_configs(
        fed=[_run(0, 0.60), _run(1, 0.62)],
        dp8=[_run(0, 0.58), _run(1, 0.58)],     # 2 and 4 points below: mean 3.0 -> met
        pooled=[_run(0, 0.65), _run(1, 0.63)],  # fed 5 and 1 below pooled: mean 3.0 > 2
    )
    by_pair = {(g["reference"], g["other"]): g for g in gaps(configs)}
    assert by_pair["fed_nonprivate", "dp_eps8"]["gap_points"]["mean"] == pytest.approx(3.0)
    assert by_pair["fed_nonprivate", "dp_eps8"]["status"] == targets.MET
    assert by_pair["pooled", "fed_nonprivate"]["gap_points"]["mean"] == pytest.approx(3.0)
    assert by_pair["pooled", "fed_nonprivate"]["status"] == targets.MISSED
    assert by_pair["fed_nonprivate", "dp_eps3"]["status"] == targets.NOT_RUN  # quick: no ε=3
    assert by_pair["pooled_allbatch", "fed_nonprivate"]["status"] == targets.NOT_RUN


def test_failed_runs_are_left_out_of_means_and_gaps():
    configs = _utility_configs(fed=[_run(0, 0.60), _run(1, 0.90, error="exit 1")],
                               dp8=[_run(0, 0.50), _run(1, 0.10)])
    fed = configs[0]
    assert fed["failed"] == 1 and fed["macro_f1"]["n"] == 1
    assert fed["macro_f1"]["mean"] == pytest.approx(0.60)
    dp8 = next(g for g in gaps(configs) if g["other"] == "dp_eps8")
    assert dp8["gap_points"]["seeds"] == [0]
    assert dp8["gap_points"]["mean"] == pytest.approx(10.0)
    assert dp8["status"] == targets.MISSED


# -- orchestration -------------------------------------------------------------------
def _metrics_rows():
    """Two rounds, two sites, as server/run_log.py writes them (wall_seconds from the
    run's start); round 1 ends at 50 s, round 2 at 80 s."""
    def row(rnd, phase, wall, site, **extra):
        return {"round": rnd, "phase": phase, "wall_seconds": wall, "site": site, **extra}
    return [
        row(1, "train", 40.0, "site0", status="accepted"),
        row(1, "train", 40.0, "site1", status="accepted"),
        row(1, "evaluate", 50.0, "site0"), row(1, "evaluate", 50.0, "site1"),
        row(1, "evaluate", 50.0, "all"),
        row(2, "train", 74.0, "site0", status="accepted"),
        row(2, "train", 74.0, "site1", status="accepted"),
        row(2, "test", 76.0, "global"),
        row(2, "evaluate", 80.0, "site0"), row(2, "evaluate", 80.0, "site1"),
    ]


FITS = {1: {"site0": 20.0, "site1": 30.0}, 2: {"site0": 24.0, "site1": 12.0}}


def _site_logs(run_dir, fits=FITS):
    """The sites' own logs as SiteTrainer.fit words its line, among other lines."""
    for rnd, by_site in fits.items():
        for site, seconds in by_site.items():
            log = run_dir / "site_state" / site / "site.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as out:
                out.write(f"2026-12-05T01:00:00+00:00 round {rnd}: planned σ=1.2\n"
                          f"2026-12-05T01:00:01+00:00 round {rnd}: trained head, 100 steps "
                          f"over 51200 sampled records of 4400 training records, loss "
                          f"1.2345, in {seconds:.2f} s (kept here)\n")


def test_round_overheads_from_a_metrics_log_and_the_site_logs(tmp_path):
    from simulations.bench.orchestration import site_fit_seconds

    _site_logs(tmp_path)
    assert site_fit_seconds(tmp_path) == FITS
    out = round_overheads(_metrics_rows(), site_fit_seconds(tmp_path), slots=1)
    r1, r2 = out["rounds"]
    assert r1["round_seconds"] == pytest.approx(50.0)
    assert r1["slowest_train_seconds"] == pytest.approx(30.0)   # the slower site counts
    assert r1["overhead"] == pytest.approx(20.0 / 50.0)
    assert r1["fit_overhead"] == pytest.approx(10.0 / 40.0)
    assert r2["round_seconds"] == pytest.approx(30.0)            # 80 - 50, not 80
    assert r2["fit_seconds"] == pytest.approx(24.0)              # 74 - 50
    assert r2["server_test_seconds"] == pytest.approx(2.0)      # 76 - 74: the test set
    assert r2["evaluate_seconds"] == pytest.approx(4.0)          # 80 - 76: the sites'
    assert r1["server_test_seconds"] == pytest.approx(0.0)       # no test in round 1
    assert r2["overhead"] == pytest.approx(6.0 / 30.0)
    assert r2["fit_overhead"] == pytest.approx(0.0)
    # one slot: the two sites train one after the other, 36 s of a 30 s round (< 0);
    # beyond packed leaves the server's 2 s test evaluation out of the round
    assert r2["packed_train_seconds"] == pytest.approx(36.0)
    assert r2["overhead_beyond_packed"] == pytest.approx(-8.0 / 28.0)
    assert out["first_round_overhead"] == pytest.approx(0.4)
    assert out["steady_overhead"]["mean"] == pytest.approx(0.2)  # round 1 left out
    assert out["missing"] == []
    two = round_overheads(_metrics_rows(), FITS, slots=2)["rounds"][1]
    assert two["packed_train_seconds"] == pytest.approx(24.0)    # both at once: the slower
    assert two["overhead_beyond_packed"] == pytest.approx(4.0 / 28.0)


def test_round_overheads_names_what_the_logs_lack():
    rows = [r for r in _metrics_rows() if not (r["phase"] == "evaluate" and r["round"] == 1)]
    out = round_overheads(rows, {1: FITS[1]})  # round 2: no site logged a fit
    assert any("round 1" in m and "evaluate" in m for m in out["missing"])
    assert any("round 2" in m and "fit time" in m for m in out["missing"])
    assert "overhead" not in out["rounds"][0] and "overhead" not in out["rounds"][1]
    assert out["steady_overhead"]["mean"] is None


def test_scaling_judges_steady_seconds_per_site_without_the_test_evaluation():
    from simulations.bench.scaling import linear_growth, steady_seconds

    rounds = round_overheads(_metrics_rows(), FITS, slots=2)["rounds"]
    assert steady_seconds(rounds) == pytest.approx(28.0)  # round 2 less its 2 s test
    grows = [{"sites": 4, "steady_seconds_per_site": 1.0},
             {"sites": 64, "steady_seconds_per_site": 1.3}, {"sites": 16, "error": "x"}]
    assert linear_growth(grows)["ratio"] == pytest.approx(1.3)
    assert linear_growth(grows)["status"] == targets.MISSED
    grows[1]["steady_seconds_per_site"] = 0.8
    assert linear_growth(grows)["status"] == targets.MET
    assert linear_growth(grows[:1])["status"] == targets.NOT_RUN


def test_scaling_times_flowers_and_fedcares_secret_sharing_at_the_runs_thresholds():
    from simulations.bench.scaling import sharing_costs

    rows = sharing_costs((4, 16), repeats=1)
    # Flower's setup: num_shares = every site (1.0), threshold round(0.67 × shares)
    assert [(r["sites"], r["threshold"]) for r in rows] == [(4, 3), (16, 11)]
    for r in rows:
        for impl in ("flower", "fedcare"):
            assert r[f"{impl}_round_seconds"] == pytest.approx(
                r["sites"] * r[f"{impl}_split_seconds_per_site"] + r[f"{impl}_combine_seconds"])
        assert r["ratio"] == pytest.approx(r["flower_round_seconds"] / r["fedcare_round_seconds"])
    text = "\n".join(report.render_sharing(rows))
    assert _row(text, "16").startswith("| 16 | 11 | ") and _row(text, "16").endswith("× |")
    assert report.render_sharing([]) == []


# -- the Markdown table --------------------------------------------------------------
def _results():
    configs = _utility_configs(fed=[_run(0, 0.600, 0.70)], dp8=[_run(0, 0.550, 0.66)])
    shape = {"shape": "demo", "label": "one site", "threads": 2, "memory_measure": "peak_rss_bytes",
             "time_ratio": 1.05, "memory_ratio": 1.25, "time_status": targets.MET,
             "memory_status": targets.MISSED}
    for mode in ("dp", "plain"):
        shape[mode] = {"step_seconds": {"mean": 1.0, "sd": 0.1, "n": 2},
                       "seconds_per_nominal_batch": {"mean": 1.0, "sd": 0.1, "n": 2},
                       "rows_per_step": 256.0, "peak_cuda_bytes": None,
                       "peak_rss_bytes": {"mean": 2 * 2**30, "sd": 0.0, "n": 2}}
    return {
        "mode": "quick", "started": "2026-11-29 10:00:00 UTC", "command": "python -m x",
        "wall_seconds": 600.0,
        "machine": {"cpu": "Test CPU 9000", "logical_cores": 2, "physical_cores": 1,
                    "ram_bytes": 24 * 2**30, "torch_threads": 2, "device": "cpu",
                    "device_name": "Test CPU 9000", "load_average": [0.5, 0.4, 0.3],
                    "python": "3.11", "versions": {"torch": "2.13.0"}, "git_commit": "abc1234",
                    "git_dirty": False},
        "sections": {
            "utility": {"device": "cpu", "seeds": [0], "configs": configs,
                        "gaps": gaps(configs)},
            "dp-cost": {"device": "cpu", "repetitions": 2, "warmup_steps": 1,
                        "timed_steps": 3, "limit_ratio": 1.1, "shapes": [shape]},
            "bytes": {"model_params": 22720146, "model_bytes": 90880584,
                      "limit_percent": 0.35, "head_rounds": 4, "num_rounds": 4,
                      "lora": {"r": 8, "target_modules": ["query", "value"]},
                      "updates": [{"kind": "LoRA round", "params": 80658, "bytes": 322632,
                                   "percent": 0.355, "status": targets.MISSED},
                                  {"kind": "head round", "params": 6930, "bytes": 27720,
                                   "percent": 0.0305017, "status": targets.MET}],
                      "recorded": [{"run": "dp_eps8-seed0", "kind": "as sent", "params": 0,
                                    "bytes": 27720, "mean_bytes": 27720.0,
                                    "percent": 0.0305017, "status": targets.MET}]},
        },
        "errors": {"accounting": "Traceback ...\nValueError: boom"},
    }


def _row(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_markdown_names_the_machine_and_marks_each_target(tmp_path):
    text = report.render(_results())
    assert text.startswith("# fedcare benchmark (quick)")
    assert "| CPU | Test CPU 9000 |" in text
    assert "| RAM | 24.00 GiB |" in text
    assert "| device | cpu (Test CPU 9000) |" in text
    assert "2026-11-29 10:00:00 UTC" in text
    # 5.0 F1 points below non-private against a limit of 3: missed, in bold
    dp8 = _row(text, "DP ε=8 vs federated non-private")
    assert "5.0" in dp8 and "≤ 3" in dp8 and dp8.endswith("| **missed** |")
    assert _row(text, "DP ε=3 vs federated non-private").endswith("| not run |")
    assert _row(text, "dp_eps8").split(" | ")[5] == "5.0"  # points below fed. non-private
    assert _row(text, "one site").endswith("| met / **missed** |")
    assert "1.050×" in _row(text, "one site") and "1.250×" in _row(text, "one site")
    assert "| 1.00 ± 0.10 s |" in _row(text, "one site")
    assert report.seconds({"mean": 0.0133, "sd": 0.002, "n": 2}) == "13.3 ± 2.0 ms"
    assert _row(text, "LoRA round").endswith("| 80,658 | 322,632 | 0.355% | **missed** |")
    assert _row(text, "head round").endswith("| 0.031% | met |")
    assert "dp_eps8-seed0: as sent (largest; mean 27,720 B)" in text
    assert "## Sections that failed" in text and "ValueError: boom" in text
    assert "## 4." not in text  # a failed section has no table


def test_orchestration_table_shows_steady_share_and_the_servers_split():
    results = _results()
    run = {"sites": 4, "run_dir": "r", "error": None,
           "time_split_seconds": {"start_up": 3.0, "first_fit": 37.0, "fit": 24.0},
           **round_overheads(_metrics_rows(), FITS, slots=2), "target": targets.MET}
    results["sections"]["orchestration"] = {"runs": [run], "slots": 2, "limit": 0.25}
    text = report.render(results)
    summary = _row(text, "4")  # the first table with a row for 4 sites: the summary
    assert "| 20.0% |" in summary and summary.endswith("| met | 40.0% |")  # steady / round 1
    assert "sum of fits / 2 actor slots" in text
    assert "- 4 sites: start up 3 s, first fit 37 s, fit 24 s" in text


def test_write_puts_json_markdown_and_plots_in_the_folder(tmp_path):
    results = _results()
    report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == "quick"
    assert (tmp_path / "results.md").read_text().startswith("# fedcare benchmark")
    for name in ("utility", "dp-cost"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert (tmp_path / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_only_accepts_known_sections_in_bench_order():
    from simulations.bench.cli import QUICK_SECTIONS, parse_only

    assert parse_only("accounting,utility", quick=False) == ["utility", "accounting"]
    assert parse_only("dp_cost", quick=True) == ["dp-cost"]
    assert parse_only(None, quick=True) == list(QUICK_SECTIONS)
    with pytest.raises(SystemExit, match="unknown section 'speed'"):
        parse_only("utility,speed", quick=False)


# -- resuming a bench ----------------------------------------------------------------
def test_a_resumed_bench_keeps_its_finished_runs_configs_and_other_sections(tmp_path):
    import simulations.bench.runner as runner
    from simulations.bench.cli import main

    out = tmp_path / "bench"
    first = runner.Bench(out, "cpu", True, (0,))
    pinned = first.config()
    pinned.write_text(pinned.read_text() + "# as the first start resolved it\n")
    key = json.dumps([str(pinned), {"train.device": "cpu",
                                    "simulation.feature_cache_dir": str(out / "feature_cache"),
                                    "data.seed": 0}], sort_keys=True)
    run_dir = out / "runs" / "done-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))
    (run_dir / runner.BENCH_RUN).write_text(json.dumps(
        {"key": key, "seconds": 12.5, "peak_tree_rss": 3, "peak_processes": 2}))
    said = []
    again = runner.Bench(out, "cpu", True, (0,), echo=said.append, resume=True)
    assert again.config().read_text().endswith("# as the first start resolved it\n")
    run = again.simulate("done-seed0", {"data.seed": 0})  # no child process: kept
    assert (run.seconds, run.summary["test"]["accuracy"], run.error) == (12.5, 0.5, None)
    assert "kept" in said[-1]
    assert runner._finished(run_dir, key.replace("seed\": 0", "seed\": 1")) is None  # redo
    (out / "results.json").write_text(json.dumps(
        {"mode": "quick", "started": "then", "sections": {"utility": {"configs": [], "gaps": []}},
         "errors": {"accounting": "Traceback: boom"}}))
    assert main(["--quick", "--only", "accounting", "--resume", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["sections"]) == {"utility", "accounting"}  # utility kept as it was
    assert results["errors"] == {} and results["started"] == "then"
    assert results["sections"]["accounting"]["commit"] == results["machine"]["git_commit"]
    assert "Ran in " in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="same mode"):
        main(["--only", "accounting", "--resume", "--out", str(out)])


# -- personalisation -----------------------------------------------------------------
def test_personalisation_rows_charge_the_global_and_the_total_epsilon():
    from simulations.bench.personalization import site_rows

    summary = {
        "epsilon_per_site": {"site0": 8.0, "site1": 6.5},
        "personalization": {
            "site0": {"global": {"accuracy": 0.5, "macro_f1": 0.4},
                      "personalized": {"accuracy": 0.7, "macro_f1": 0.45}, "refused": None},
            "site1": {"global": {"accuracy": 0.6, "macro_f1": 0.5},
                      "personalized": {}, "refused": "site1 does not personalise: budget"}}}
    metrics = [{"phase": "train", "site": "site0", "round": 1, "epsilon": 5.0},
               {"phase": "train", "site": "site0", "round": 2, "epsilon": 7.2},
               {"phase": "evaluate", "site": "site0", "round": 2, "epsilon": 8.0},
               {"phase": "train", "site": "site1", "round": 2, "epsilon": 6.5}]
    s0, s1 = site_rows(3, summary, metrics)
    assert (s0["seed"], s0["site"]) == (3, "site0")
    assert s0["epsilon_global"] == 7.2      # the last federated round, not personalising
    assert s0["epsilon_total"] == 8.0       # what the site was charged in all
    assert (s0["global_accuracy"], s0["personal_accuracy"]) == (0.5, 0.7)
    assert s1["personal_macro_f1"] is None and s1["refused"].startswith("site1")
    assert s1["epsilon_global"] == s1["epsilon_total"] == 6.5


# -- patient-level privacy -----------------------------------------------------------
def test_at_least_judges_a_lead():
    assert targets.judge_at_least(10.0, 10.0) == targets.MET     # the limit itself is met
    assert targets.judge_at_least(9.9, 10.0) == targets.MISSED
    assert targets.judge_at_least(None, 10.0) == targets.NOT_RUN


def test_group_baseline_runs_record_level_at_the_per_record_share_of_the_promise():
    from common.privacy.accounting import group_privacy
    from simulations.bench import patients

    g4 = patients.group(4).overrides
    assert g4["site.privacy_unit"] == "record" and g4["data.max_notes_per_patient"] == 4
    assert g4["privacy.target_epsilon"] == pytest.approx(2.0)
    # read for a patient of 4 notes, the per-record (ε, δ) is the patient-level promise
    assert group_privacy(g4["privacy.target_epsilon"], g4["privacy.delta"], 4) == \
        pytest.approx((patients.EPSILON, patients.DELTA))
    names = [s.name for s in patients.setups()]
    assert len(names) == len(set(names))
    assert names[:3] == ["record_eps8", "uls_k4", "group_k4"]  # the targets' sides first
    # the judged ULS row is what patients.yaml ships; the other reduction is shown beside it
    shipped = load_yaml(patients.PATIENTS)
    assert patients.uls(4).overrides["train.patient_gradient"] == \
        shipped.train.patient_gradient == "mean"
    assert patients.SHIPPED_K == shipped.site.max_records_per_patient == 4
    assert patients.uls(4, "sum").name == "uls_k4_sum" and "uls_k4_sum" in names


def test_each_mechanism_trains_with_the_head_recipe_tuned_for_it():
    """ULS and group privacy run patients.yaml's recipe; record-level and non-private
    runs are set back to the defaults' (each was tuned for its own mechanism)."""
    from common.config import Config
    from simulations.bench import patients

    shipped, default = load_yaml(patients.PATIENTS).train, Config().train
    tuned = (shipped.head_steps, shipped.head_learning_rate)
    defaults = (default.head_steps, default.head_learning_rate)
    assert tuned != defaults
    for setup in patients.setups():
        train = load_yaml(patients.PATIENTS, setup.overrides).train  # what the run trains with
        record_level = setup.overrides["site.privacy_unit"] == "record" and \
            not setup.name.startswith("group")
        assert (train.head_steps, train.head_learning_rate) == \
            (defaults if record_level else tuned), setup.name


def _patient_configs(**runs):
    from simulations.bench import patients

    by_name = {s.name: s for s in patients.setups()}
    return [patients.summarize(by_name[name], rs) for name, rs in runs.items()]


def test_patient_targets_pair_by_seed_and_judge_a_lead_at_least():
    from simulations.bench import patients

    configs = _patient_configs(
        record_eps8=[_run(0, 0.70), _run(1, 0.68)],
        uls_k4=[_run(0, 0.66), _run(1, 0.60)],       # 4 and 8 below: mean 6 > 5 -> missed
        group_k4=[_run(0, 0.50), _run(1, 0.52)],     # ULS ahead by 16 and 8: mean 12 -> met
        uls_k4_sum=[_run(0, 0.64)])
    by_name = {c["name"]: c for c in patients.compare(configs)}
    record = by_name["ULS k=4 vs record-level ε=8"]
    assert record["gap_points"]["mean"] == pytest.approx(6.0)
    assert record["status"] == targets.MISSED
    lead = by_name["ULS k=4 ahead of group privacy k=4"]
    assert lead["gap_points"]["mean"] == pytest.approx(12.0)
    assert lead["status"] == targets.MET
    sum_mean = by_name["ULS k=4: mean (shipped) ahead of sum"]
    assert sum_mean["gap_points"]["seeds"] == [0] and sum_mean["status"] == "shown, not judged"
    assert by_name["ULS k=16 ahead of group privacy k=16"]["status"] == targets.NOT_RUN

    text = "\n".join(report.render_patients(
        {"seeds": [0, 1], "device": "cpu", "configs": configs,
         "comparisons": patients.compare(configs)}))
    assert _row(text, "ULS k=4 vs record-level ε=8").endswith("| ≤ 5 | **missed** |")
    assert _row(text, "ULS k=4 ahead of group privacy k=4").endswith("| ≥ 10 | met |")
    assert _row(text, "ULS k=4, mean of notes").split(" | ")[5] == "6.0"  # below record ε=8


def test_lora_section_reads_the_head_rounds_from_the_runs_own_test_rows_and_pairs_seeds():
    from simulations.bench import lora

    def test_rows(*f1s):
        return [{"phase": "test", "round": i, "macro_f1": f1, "accuracy": 0.8}
                for i, f1 in enumerate(f1s, 1)] + [{"phase": "train", "round": 1}]

    # seed 0: the LoRA rounds lose 2 points of the head rounds' 0.70; seed 1: gain 1
    runs = {"lora": [{**_run(0, 0.68), **lora.head_round_metrics(test_rows(
                          0.5, 0.6, 0.65, 0.70, 0.69, 0.68), 4)},
                     {**_run(1, 0.72), **lora.head_round_metrics(test_rows(
                          0.5, 0.6, 0.65, 0.71, 0.72, 0.72), 4)}],
            "head_only": [_run(0, 0.71), _run(1, 0.70), _run(2, 0.9)]}
    assert runs["lora"][0]["head_macro_f1"] == 0.70
    kept, beside = lora.compare(runs)
    assert kept["gap_points"]["mean"] == pytest.approx(0.5)  # (2 − 1) / 2 points lost
    assert kept["status"] == targets.MISSED                   # any loss misses
    assert beside["gap_points"]["seeds"] == [0, 1]            # seed 2 has no LoRA run
    assert beside["gap_points"]["mean"] == pytest.approx(0.5)  # (3 − 2) / 2
    assert beside["status"] == "shown, not judged"

    section = {"seeds": [0, 1], "device": "cpu", "head_rounds": 4,
               "lora": {"learning_rate": 1e-3, "local_steps": 8, "batch_size": 256},
               "configs": {k: lora.summarize(v) for k, v in runs.items()},
               "comparisons": [kept, beside]}
    text = "\n".join(report.render_lora(json.loads(json.dumps(section))))  # as results.json
    assert _row(text, "LoRA rounds vs the run's last head round").endswith(
        "| 0.5 ± 2.1 | ≤ 0 | **missed** |")
    assert _row(text, "lora.yaml").split(" | ")[3] == "0.705 ± 0.007"  # head rounds' F1
    assert _row(text, "0") == "| 0 | 0.500, 0.600, 0.650, 0.700, 0.690, 0.680 |"
