"""The run's console says what each round spends: σ, ε spent and left per site, and
why a site that spent budget in earlier runs trains with more noise. The run directory
keeps every ledger head a site reported, each site's δ, and evaluation rows that may
carry no metrics."""

from __future__ import annotations

import io
import json
import math

from common.config import Config
from common.message_keys import Keys
from server.run_log import ALL_SITES, RunRecorder

HEAD = "3:" + "ab" * 32


def _ledger(*entries) -> str:
    return "".join(json.dumps({"data_fingerprint": "sha256:x", "epsilon_budget": 8.0,
                               "delta": 1e-5, **e}) + "\n" for e in entries)


def _row(site, eps, sigma, ledger, **extra):
    return {Keys.SITE: site, Keys.EPSILON: eps, Keys.NOISE_MULTIPLIER: sigma,
            Keys.LEDGER: ledger, "status": "accepted", "num_examples": 100, **extra}


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_round_line_shows_sigma_and_what_is_left_and_prior_spending_is_said_once(tmp_path):
    out = io.StringIO()
    run = tmp_path / "run-b"
    recorder = RunRecorder(run, Config(), out=out)
    fresh = _ledger({"run_id": "run-b", "epsilon": 3.0})
    reused = _ledger({"run_id": "run-a", "epsilon": 7.5}, {"run_id": "run-b", "epsilon": 7.9})
    recorder.record("train", 1, [_row("site0", 3.0, 0.61, fresh),
                                 _row("site1", 7.9, 2.07, reused)])
    recorder.record("evaluate", 1, [{Keys.SITE: "site0", "macro_f1": 0.5, "num_examples": 10,
                                     Keys.EPSILON: 3.25}])  # its evaluation spent 0.25
    text = out.getvalue()
    assert text.count("NOTE:") == 1
    assert "site1 had already spent ε=7.5 of its budget 8" in text and "σ=2.07" in text
    line = text.strip().splitlines()[-1]
    assert "σ 0.61/2.07" in line and "val macro-F1 0.500" in line
    assert "site0=3.25(4.75)" in line and "site1=7.90(0.10)" in line
    assert "train loss" not in line  # sites keep their training loss
    recorder.record("train", 2, [_row("site1", 8.0, 2.07, reused + _ledger(
        {"run_id": "run-b", "epsilon": 8.0}))])
    assert out.getvalue().count("NOTE:") == 1  # said once per site and run


def test_prior_spending_counts_the_dataset_across_its_data_versions(tmp_path):
    out = io.StringIO()
    recorder = RunRecorder(tmp_path / "run-b", Config(), out=out)
    ledger = _ledger({"run_id": "run-a", "epsilon": 5.0, "dataset": "notes"},
                     {"run_id": "run-b", "epsilon": 6.0, "dataset": "notes",
                      "data_fingerprint": "sha256:v2"})
    recorder.record("train", 1, [_row("site0", 6.0, 1.5, ledger)])
    assert "site0 had already spent ε=5 of its budget 8 on this dataset" in out.getvalue()


def test_every_reported_head_is_kept_and_a_path_like_site_name_is_refused(tmp_path):
    out = io.StringIO()
    run = tmp_path / "run"
    recorder = RunRecorder(run, Config(), out=out)
    recorder.record("train", 1, [_row("site0", 3.0, 0.6, _ledger({"epsilon": 3.0}),
                                      **{Keys.LEDGER_HEAD: "2:" + "cd" * 32})])
    recorder.record("evaluate", 1, [{Keys.SITE: "site0", Keys.LEDGER_HEAD: HEAD,
                                     "macro_f1": 0.4, "num_examples": 10}])
    heads = (run / "ledgers" / "site0.heads.jsonl").read_text().splitlines()
    assert [json.loads(h) for h in heads] == [
        {"round": 1, "phase": "train", "head": "2:" + "cd" * 32},
        {"round": 1, "phase": "evaluate", "head": HEAD}]
    assert all(Keys.LEDGER_HEAD not in row for row in _metrics(run))
    for evil in ("../escaped", "a/b", "site0.heads"):
        recorder.record("train", 2, [_row(evil, 3.0, 0.6, _ledger({"epsilon": 3.0}),
                                          **{Keys.LEDGER_HEAD: HEAD})])
        assert out.getvalue().count(f"WARNING: site name {evil!r} cannot name a file") == 1
    assert sorted(p.name for p in (run / "ledgers").iterdir()) == [
        "site0.heads.jsonl", "site0.jsonl"]
    assert not (run / "escaped.jsonl").exists() and not (run / "escaped.heads.jsonl").exists()


def test_sites_that_withhold_or_fail_evaluation_are_left_out_of_the_mean(tmp_path):
    out = io.StringIO()
    run = tmp_path / "run"
    recorder = RunRecorder(run, Config(), out=out)
    recorder.record("evaluate", 1, [
        {Keys.SITE: "site0", "loss": math.nan, "accuracy": 0.8, "macro_f1": 0.6,
         Keys.EVALUATED: True, "num_examples": 40},
        {Keys.SITE: "site1", Keys.EVALUATED: False, "num_examples": 0},
        {Keys.SITE: "site2", Keys.ERROR: "evaluate_failed", Keys.ERROR_REF: "site.log:17",
         "num_examples": 25}])
    rows = _metrics(run)
    assert rows[0]["loss"] is None  # NaN written as null, the file stays JSON
    mean = next(r for r in rows if r[Keys.SITE] == ALL_SITES)
    assert (mean["num_examples"], mean["accuracy"], mean["macro_f1"], mean["loss"]) == (
        40, 0.8, 0.6, None)
    assert rows[2][Keys.ERROR_REF] == "site.log:17"
    line = out.getvalue().strip().splitlines()[-1]
    assert "val macro-F1 0.600" in line
    assert "evaluation failed at site2 (evaluate_failed): see each site's own log" in line
    recorder.record("evaluate", 2, [{Keys.SITE: "site1", Keys.EVALUATED: False,
                                     "num_examples": 0}])
    mean = [r for r in _metrics(run) if r[Keys.SITE] == ALL_SITES][-1]
    assert (mean["num_examples"], mean["macro_f1"]) == (0, None)


def test_summary_reports_each_sites_delta_and_where_personalisation_stayed(tmp_path):
    cfg = Config()
    run = tmp_path / "run"
    recorder = RunRecorder(run, cfg, out=io.StringIO())
    recorder.record("train", 1, [
        _row("site0", 3.0, 0.6, _ledger({"epsilon": 3.0}), **{Keys.DELTA: 1e-6}),
        _row("site1", 2.0, 0.9, _ledger({"epsilon": 2.0, "delta": 2e-6}))])
    last = cfg.federation.num_rounds
    recorder.record("evaluate", last, [
        {Keys.SITE: "site0", "macro_f1": 0.5, "personalized_macro_f1": 0.7,
         Keys.PERSONALIZED_ADAPTER: True, "num_examples": 10},
        {Keys.SITE: "site1", Keys.PERSONALIZED_REFUSED: "budget", Keys.EVALUATED: False,
         "num_examples": 0}])
    summary = recorder.summary({"accuracy": 0.7})
    assert summary["delta_per_site"] == {"site0": 1e-6, "site1": 2e-6}  # site1: its ledger
    assert summary["delta"] == cfg.privacy.delta  # the run's target, as before
    assert summary["epsilon_per_site"] == {"site0": 3.0, "site1": 2.0}
    personal = summary["personalization"]
    assert personal["site0"]["saved_at_site"] is True
    assert personal["site0"]["personalized"]["macro_f1"] == 0.7
    assert (personal["site1"]["saved_at_site"], personal["site1"]["refused"]) == (False,
                                                                                  "budget")
    assert "train_loss" not in (run / "summary.json").read_text()


def test_a_deployed_run_records_the_hospitals_facts_not_simulation_defaults(tmp_path):
    """Its config.yaml leaves out the simulated sites' sections (simulation.num_sites 4,
    site.epsilon_budget 8 describe no one); the summary gives each hospital's own δ and
    budget, read from what it sent."""
    import yaml

    run = tmp_path / "deployed"
    recorder = RunRecorder(run, Config(), out=io.StringIO(), deployed=True)
    ledger = _ledger({"run_id": "deployed", "epsilon": 2.0, "epsilon_budget": 24.0,
                      "delta": 1e-6})
    recorder.record("train", 1, [_row("hospital-a", 2.0, 0.9, ledger, **{Keys.DELTA: 1e-6})])
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert "simulation" not in written and "site" not in written
    assert written["privacy"]["target_epsilon"] == 8.0  # what the run asked for
    assert "a deployed run" in (run / "config.yaml").read_text()
    summary = recorder.summary({})
    assert summary["sites"] == ["hospital-a"] and summary["run_id"] == "deployed"
    assert summary["epsilon_budget_per_site"] == {"hospital-a": 24.0}
    assert summary["delta_per_site"] == {"hospital-a": 1e-6}
