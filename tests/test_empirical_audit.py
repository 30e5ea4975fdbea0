"""`fedcare audit empirical` end to end: canaries through the real simulation, sites,
Opacus and ledger; a broken mechanism is caught, and everything needed to recompute
the bound is saved."""

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


def test_a_correct_mechanism_passes(tiny_model, site_files, tmp_path, capsys):
    config, run = _config(tiny_model, site_files, tmp_path), tmp_path / "ok"
    code = main(["audit", "empirical", str(config), "--canaries", "100",
                 "--set", "privacy.target_epsilon=2", "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().out
    result = json.loads((run / "audit" / "empirical.json").read_text())
    assert result["verdict"] == "passed" and result["control"] is None
    assert 0 < result["claimed_epsilon"] <= 2.0 + 1e-6
    for kind in result["kinds"].values():
        assert kind["epsilon"] <= result["claimed_epsilon"] and not kind["exceeds_claim"]
