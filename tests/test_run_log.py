"""The run's console says what each round spends: σ, ε spent and left per site, and
why a site that spent budget in earlier runs trains with more noise."""

from __future__ import annotations

import io
import json

from common.config import Config
from common.keys import Keys
from server.run_log import RunRecorder


def _ledger(*entries) -> str:
    return "".join(json.dumps({"data_fingerprint": "sha256:x", "epsilon_budget": 8.0,
                               **e}) + "\n" for e in entries)


def _row(site, eps, sigma, ledger):
    return {Keys.SITE: site, Keys.EPSILON: eps, Keys.NOISE_MULTIPLIER: sigma,
            Keys.LEDGER: ledger, Keys.TRAIN_LOSS: 1.0, "status": "accepted",
            "num_examples": 100}


def test_round_line_shows_sigma_and_what_is_left_and_prior_spending_is_said_once(tmp_path):
    out = io.StringIO()
    run = tmp_path / "run-b"
    recorder = RunRecorder(run, Config(), out=out)
    fresh = _ledger({"run_id": "run-b", "epsilon": 3.0})
    reused = _ledger({"run_id": "run-a", "epsilon": 7.5}, {"run_id": "run-b", "epsilon": 7.9})
    recorder.record("train", 1, [_row("site0", 3.0, 0.61, fresh),
                                 _row("site1", 7.9, 2.07, reused)])
    recorder.record("evaluate", 1, [{Keys.SITE: "site0", "macro_f1": 0.5, "num_examples": 10}])
    text = out.getvalue()
    assert text.count("NOTE:") == 1
    assert "site1 had already spent ε=7.5 of its budget 8" in text and "σ=2.07" in text
    line = text.strip().splitlines()[-1]
    assert "σ 0.61/2.07" in line
    assert "site0=3.00(5.00)" in line and "site1=7.90(0.10)" in line
    recorder.record("train", 2, [_row("site1", 8.0, 2.07, reused + _ledger(
        {"run_id": "run-b", "epsilon": 8.0}))])
    assert out.getvalue().count("NOTE:") == 1  # said once per site and run
