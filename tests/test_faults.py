"""Faults survived in a real Flower simulation: sites that crash, hang past the round
timeout and refuse, in the same run. With a 70% completion requirement, three silent
sites out of ten cost no round; more and the round is skipped, logged, and the run
goes on; the run log names every site and its reason."""

from __future__ import annotations

import json
import time

import pytest

from simulations.run import simulate
from tests.conftest import LABELS, tiny_config, write_records

pytestmark = pytest.mark.slow

ROUND_TIMEOUT, HANG = 20.0, 25.0  # the first round (start-up) waits 600 s


class Faults:
    """A client mod: the sites in `crash[round]` raise, those in `hang[round]` answer
    after HANG seconds (past the round timeout), when asked to train in that round."""

    def __init__(self, crash: dict[int, set[int]], hang: dict[int, set[int]]) -> None:
        self.crash, self.hang = crash, hang

    def __call__(self, msg, context, call_next):
        config = msg.content.config_records.get("fitins.config")
        if config is not None:
            site, round_no = int(context.node_config["partition-id"]), int(config["round"])
            if site in self.crash.get(round_no, ()):
                raise RuntimeError(f"injected crash of site{site} in round {round_no}")
            if site in self.hang.get(round_no, ()):
                time.sleep(HANG)
        return call_next(msg, context)


def test_crashes_hangs_and_refusals_in_one_run_cost_only_the_rounds_they_must(
        tiny_model, tmp_path, capsys):
    files = {"sites": [write_records(tmp_path / f"site{i}.csv", 48, seed=i,
                                     skew=LABELS[i % len(LABELS)]) for i in range(10)],
             "test": write_records(tmp_path / "test.csv", 40, seed=99)}
    # site9's budget cannot pay for a round: it refuses every time it is asked
    cfg = tiny_config(tiny_model, files, site={"budgets": [8.0] * 9 + [0.05],
                                               "min_val_records": 4},
                      federation={"num_rounds": 3, "min_sites": 2, "min_completion": 0.7,
                                  "round_timeout": ROUND_TIMEOUT, "first_round_timeout": 600.0,
                                  "secure_aggregation": "off",
                                  "max_failed_rounds": 0.4},
                      simulation={"num_sites": 10, "cpus_per_site": 0.5},
                      train={"local_steps": 1})
    # round 1: a crash and a refusal; round 2: a crash, a hang and a refusal (7 of 10,
    # enough); round 3: three crashes and a refusal (6 of 10, skipped; the run goes on)
    faults = Faults(crash={1: {0}, 2: {0}, 3: {0, 1, 2}}, hang={2: {1}})
    run = simulate(cfg, tmp_path / "run", client_mods=[faults])

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_aggregated"] == 2
    assert summary["rounds_skipped"] == {"3": "skipped: 6 accepted update(s), 7 needed"}
    problems = {site: {(p["round"], p["status"].split(":")[0]) for p in found if
                       p["phase"] == "train"}
                for site, found in summary["problems_per_site"].items()}
    assert problems["site0"] == {(1, "failed"), (2, "failed"), (3, "failed")}
    assert problems["site1"] == {(2, "failed"), (3, "failed")}
    assert problems["site2"] == {(3, "failed")}
    assert problems["site9"] == {(1, "refused"), (2, "refused"), (3, "refused")}
    assert {site for site in problems if problems[site]} == {"site0", "site1", "site2", "site9"}
    failed = {(p["round"], p["status"]) for p in summary["problems_per_site"]["site1"]}
    assert (2, "failed: no answer within federation.round_timeout (20s)") in failed
    crashed = [p["status"] for p in summary["problems_per_site"]["site0"]]
    assert all(s.startswith("failed: site failure 'site-error'") for s in crashed)
    assert "injected crash" not in json.dumps(summary)  # the site's details stay at the site
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0

    # the run ends with one line per such site, by name, with what its own log says
    out = capsys.readouterr().out
    said = out[out.index("as their own logs say:"):].splitlines()[1:5]
    said = {line.strip().split(": ", 1)[0]: line.strip().split(": ", 1)[1] for line in said}
    assert set(said) == {"site0", "site1", "site2", "site9"}
    assert said["site0"].startswith("site-error: injected crash of site0 in round 1 (round 1 "
                                    "train); site-error: injected crash of site0 in round 2")
    assert said["site2"] == "site-error: injected crash of site2 in round 3 (round 3 train)"
    assert said["site1"].startswith("timeout: no answer within federation.round_timeout "
                                    "(20s) in round 2 train; the last line it logged: ")
    # the same reason every round, once, with the rounds it held for
    assert said["site9"].startswith("budget: a size release would bring ε to ")
    assert "above the site's budget of 0.05 (round 1 train, round 2 train, round 3 train)" \
        in said["site9"]
