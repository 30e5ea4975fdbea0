"""What `fedcare simulate` says per site after a run, read from the sites' own logs:
the run log's rows (names or node ids, codes and references) matched to each site's
site.log, in the format the site writes it (client/releases.py, client/budget.py)."""

from __future__ import annotations

import json

import pytest

from client.budget import describe
from simulations.site_logs import explain

RUN = "run-1"


def _refusal(site: str, round_no: int, reason: str, unit: str = "record") -> str:
    """The line a site logs for a refusal, as its guard words it, in either unit."""
    unit = {"privacy_unit": "patient", "max_records_per_patient": 4} if unit == "patient" \
        else {"privacy_unit": "record"}
    entry = {"kind": "refusal", "run_id": RUN, "round": round_no, "dataset": "d0",
             "reason": reason, "epsilon": 0.0, "epsilon_budget": 1.0, "delta": 1e-5,
             "seq": round_no, "noise_multiplier": 0.0, "sample_rate": 0.0, "steps": 0, **unit}
    return f"2026-12-03T08:00:00+00:00 {describe(entry)}"


def _write(tmp_path, logs: dict[str, list[str]], rows: list[dict]):
    run = tmp_path / RUN
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                       + '{"phase": "train", "rou')  # a line a kill cut
    for site, lines in logs.items():
        (tmp_path / "state" / site).mkdir(parents=True)
        (tmp_path / "state" / site / "site.log").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("unit", ["record", "patient"])
def test_each_site_is_named_with_the_cause_its_own_log_gives(tmp_path, unit):
    logs = {
        "site0": ["node 11", "error 0a1b2c3d (data): a.csv:7: unknown label 'x'",
                  "Traceback (most recent call last):", "  File ...",
                  "common.errors.DataError: a.csv:7: unknown label 'x'"],
        "site1": ["node 22", _refusal("site1", 1, "site1 refuses round 1: the run asks δ=1e-3, "
                                                 "above the site's δ=1e-5", unit),
                  _refusal("site1", 1, "site1 does not evaluate round 1: over budget", unit)],
        "site2": ["node 33", "2026-12-03T08:00:01+00:00 training round 1 of run-1"],
        "site3": ["node 44"],  # answered every round
    }
    rows = [
        {"phase": "train", "round": 1, "site": "node-11", "status":
         "failed: site failure 'data'; the site's own log ... under reference 0a1b2c3d"},
        {"phase": "train", "round": 1, "site": "site1", "status": "refused", "refused": "delta"},
        {"phase": "evaluate", "round": 1, "site": "site1", "status": "accepted",
         "refused": "budget"},
        {"phase": "train", "round": 1, "site": "node-33",
         "status": "failed: no answer within federation.round_timeout (9s)"},
        {"phase": "train", "round": 1, "site": "site3", "status": "accepted"},
        {"phase": "evaluate", "round": 1, "site": "all", "status": "accepted"},
        {"phase": "train", "round": 1, "site": "node-99", "status": "rejected: ε is not a number"},
    ]
    lines = explain(_write(tmp_path, logs, rows), tmp_path / "state")
    assert lines == [
        "node-99: rejected: ε is not a number (round 1 train)",  # no site's log knows it
        "site0: data: a.csv:7: unknown label 'x' (round 1 train)",
        "site1: delta: the run asks δ=1e-3, above the site's δ=1e-5 (round 1 train); "
        "budget: over budget (round 1 evaluate)",
        "site2: timeout: no answer within federation.round_timeout (9s) in round 1 train; "
        "the last line it logged: 2026-12-03T08:00:01+00:00 training round 1 of run-1 "
        "(round 1 train)",
    ]


def test_a_run_whose_sites_all_answered_names_none(tmp_path):
    run = _write(tmp_path, {"site0": ["node 1"]},
                 [{"phase": "train", "round": 1, "site": "site0", "status": "accepted"}])
    assert explain(run, tmp_path / "state") == []
