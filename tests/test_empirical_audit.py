"""`fedcare audit empirical` end to end: canaries through the real simulation, sites,
Opacus and ledger; a broken mechanism is caught, everything needed to recompute the
bound is saved, a patient-level mechanism holds against canary patients and a
record-level claim does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import dump_yaml
from common.privacy.one_run import CONFIDENCE, counts, grid, lower_bound
from common.cli import main
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _config(tiny_model, site_files, tmp_path) -> Path:
    # two head rounds of 40 steps at q ≈ 0.25: a canary is sampled ~20 times; counts
    # noised at 20σ cost little, so σ stays below the sites' maximum of 20 even at ε = 1
    cfg = tiny_config(tiny_model, site_files,
                      train={"head_rounds": 2, "head_steps": 40, "head_batch_size": 48},
                      privacy={"count_noise": 20.0},
                      # the noisy size (±20 on ~108 notes) can put σ for ε = 1 above 20;
                      # a site that refused would leave the audit without its rounds
                      site={"max_noise_multiplier": 60.0},
                      simulation={"output_dir": str(tmp_path / "runs")})
    path = tmp_path / "audit.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def test_clipping_off_is_caught_and_the_bound_can_be_recomputed(tiny_model, site_files,
                                                              tmp_path, capsys):
    config, run = _config(tiny_model, site_files, tmp_path), tmp_path / "clipping"
    # the tiny head has 4 x 32 weights: 100 gradient canaries on distinct coordinates
    code = main(["audit", "empirical", str(config), "--canaries", "100", "--break", "clipping",
                 "--run-dir", str(run)])
    out = capsys.readouterr().out
    assert code == 1 and "empirical audit FAILED [control: clipping off]" in out
    result = json.loads((run / "audit" / "empirical.json").read_text())
    assert result["verdict"] == "failed" and result["control"] == "clipping"
    assert result["claimed_epsilon"] <= 1.0 + 1e-6  # a control claims ε = 1
    gradient = result["kinds"]["gradient"]
    assert gradient["exceeds_claim"] and gradient["epsilon"] > 1.0
    # the claim is what the site's ledger says: the mechanism was planned for ε = 1
    summary = json.loads((run / "summary.json").read_text())
    assert result["claimed_epsilon"] == pytest.approx(summary["epsilon_per_site"]["site0"])

    # recompute each kind's bound from the saved scores, membership and guesses
    rows = json.loads((run / "audit" / "canaries.json").read_text())
    for kind in ("input", "gradient"):
        mine = [r for r in rows if r["kind"] == kind]
        assert len(mine) == 100 and all(r["site"] == "site0" for r in mine)
        inside = np.array([r["included"] for r in mine])
        guess = np.array([r["guess"] for r in mine])
        scores = np.array([r["score"] for r in mine])
        r, v = counts(guess, inside)
        stated = result["kinds"][kind]
        assert (r, v) == (stated["guesses"], stated["correct"])
        # the guesses are the stated rule: the k highest "in", the k lowest "out"
        order = np.argsort(-scores, kind="stable")
        k = stated["k_in"]
        assert (guess[order[:k]] == 1).all() and (guess[order[len(order) - k:]] == -1).all()
        beta = (1 - CONFIDENCE) / len(grid(100))
        assert stated["epsilon"] == pytest.approx(lower_bound(100, r, v, 1e-5, beta), abs=1e-6)
    coordinates = [r["coordinate"] for r in rows if r["kind"] == "gradient"]
    assert len(set(coordinates)) == 100 and all(0 <= c < 4 * 32 for c in coordinates)

    # the run's audit report shows the bounds next to the claims
    report = json.loads((run / "audit_report.json").read_text())
    assert report["empirical"]["verdict"] == "failed"
    assert "Empirical audit: failed (control: clipping off)" in (
        run / "audit_report.html").read_text()
    # the sites kept no list of the canaries: the excluded ones were never sent
    assert not list(run.rglob("site0.json"))


def _patient_config(tiny_model, tmp_path) -> Path:
    # as _config, at sites whose unit is the patient (each brings at most 4 notes a step)
    from tests.test_patients import write_patient_records

    files = {"sites": [write_patient_records(tmp_path / f"site{i}.csv", 40, seed=i,
                                             prefix=f"s{i}-") for i in range(2)],
             "test": write_patient_records(tmp_path / "test.csv", 12, seed=9, prefix="t-")}
    cfg = tiny_config(tiny_model, files, data={"patient_column": "patient"},
                      site={"privacy_unit": "patient", "max_records_per_patient": 4,
                            "min_val_records": 3},
                      train={"head_rounds": 2, "head_steps": 40, "head_batch_size": 48},
                      privacy={"count_noise": 20.0, "target_epsilon": 1.0},
                      # site1's 30-odd patients cannot train at ε = 1 within σ ≤ 20; the
                      # canaries are at site0, whose update is what the audit reads
                      federation={"min_sites": 1},
                      simulation={"output_dir": str(tmp_path / "runs")})
    path = tmp_path / "patients.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def test_a_correct_mechanism_passes_per_patient_and_a_record_level_claim_is_caught(
        tiny_model, tmp_path, capsys):
    """A correct mechanism passes its audit, here at the patient level (the record
    level's pass is the same scoring and bound with canaries of one note). The same
    claim (ε = 1) and the same kind of canary patients (16 notes each, 128 of each kind:
    all the tiny head's coordinates): sites that protect patients clip a patient's notes
    together and pass; sites that protect records clip each note alone, so a patient
    moves the update by up to 16·C, and the audit flags the claim."""
    config = _patient_config(tiny_model, tmp_path)
    audit = ["audit", "empirical", str(config), "--canaries", "128", "--notes", "16"]
    code = main([*audit, "--run-dir", str(tmp_path / "patients")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "claimed ε per patient" in out and "ε per patient ≥" in out
    result = json.loads((tmp_path / "patients" / "audit" / "empirical.json").read_text())
    assert result["verdict"] == "passed" and result["claim_unit"] == "patient"
    assert result["canary_unit"] == "patient" and result["notes_per_canary"] == 16
    assert 0 < result["claimed_epsilon"] <= 1.0 + 1e-6
    for kind in result["kinds"].values():
        assert kind["canaries"] == 128 and not kind["exceeds_claim"]
    rows = json.loads((tmp_path / "patients" / "audit" / "canaries.json").read_text())
    assert all(len(r["texts"]) == 16 for r in rows)

    code = main([*audit, "--break", "unit", "--run-dir", str(tmp_path / "records")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED [control: the sites protect records, the canaries are patients]" in out
    result = json.loads((tmp_path / "records" / "audit" / "empirical.json").read_text())
    assert result["verdict"] == "failed" and result["control"] == "unit"
    assert result["claim_unit"] == "record" and result["canary_unit"] == "patient"
    assert 0 < result["claimed_epsilon"] <= 1.0 + 1e-6
    gradient = result["kinds"]["gradient"]
    assert gradient["exceeds_claim"] and gradient["epsilon_for_verdict"] > 1.0
