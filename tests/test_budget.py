"""The site enforces its own budget, across rounds and runs, and its ledger never
claims less than was released, whatever happens to the process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client.budget import Policy, SiteGuard
from client.site import Site, SiteTrainer
from client.training import PrivateStep
from common.data import read_records, site_split
from common.privacy import accounting
from common.privacy.ledger import read_entries
from common.privacy.verify import verify_path
from tests.conftest import LABELS, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _site(files, state: Path, budget: float, max_noise: float = 20.0) -> Site:
    ds = read_records(files["sites"][0], "note", "diagnosis", LABELS)
    return Site("site0", site_split(ds, 0.1, 0), LABELS,
                Policy(budget, 1e-5, max_noise_multiplier=max_noise), state)


def _run(cfg, site, run_id: str, rounds: int) -> list[dict]:
    return [SiteTrainer(cfg, site).fit(r, rounds, run_id) for r in range(1, rounds + 1)]


def test_second_run_on_the_same_data_starts_from_what_was_spent(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, privacy={"target_epsilon": 2.0})
    site = _site(site_files, tmp_path / "state", budget=20.0)
    first = _run(cfg, site, "run-1", 2)
    second = _run(cfg, site, "run-2", 2)
    spent_after_first = first[-1]["metrics"]["epsilon"]
    assert spent_after_first <= 2.0 + 1e-9
    assert second[0]["metrics"]["epsilon"] > spent_after_first
    history = SiteTrainer(cfg, site).guard().history()
    assert len(history) == 5  # the noisy size once, then both runs' releases, composed
    assert history[0] == (cfg.privacy.count_noise, 1.0, 1)
    assert second[-1]["metrics"]["epsilon"] == pytest.approx(
        accounting.epsilon(history, 1e-5), rel=1e-9)


def test_a_site_whose_budget_is_spent_refuses_and_sends_nothing(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, privacy={"target_epsilon": 3.0})
    site = _site(site_files, tmp_path / "state", budget=3.0, max_noise=5.0)
    spent = _run(cfg, site, "run-1", 2)[-1]["metrics"]["epsilon"]
    refused = SiteTrainer(cfg, site).fit(1, 2, "run-2")
    assert refused["arrays"] == [] and refused["num_examples"] == 0
    assert refused["metrics"]["refused"] == "budget"  # a code; the sentence is the ledger's
    assert refused["metrics"]["epsilon"] == pytest.approx(spent)
    entries = read_entries(tmp_path / "state" / "ledger.jsonl")
    assert [e["kind"] for e in entries] == ["size", "train", "train", "refusal"]
    assert entries[-1]["update_sha256"] is None and entries[-1]["epsilon"] == pytest.approx(spent)
    assert "refuses round 1" in entries[-1]["reason"]
    assert "above the site's max_noise_multiplier 5" in entries[-1]["reason"]
    assert verify_path(tmp_path / "state" / "ledger.jsonl").ok


def test_the_server_asking_for_more_rounds_than_planned_is_refused(tiny_model, site_files, tmp_path):
    """The server announces 2 rounds, σ is planned for 2, then it asks for a third."""
    cfg = tiny_config(tiny_model, site_files, privacy={"target_epsilon": 4.0})
    site = _site(site_files, tmp_path / "state", budget=4.0)
    _run(cfg, site, "run-1", 2)
    third = SiteTrainer(cfg, site).fit(3, 3, "run-1")
    assert third["arrays"] == [] and third["metrics"]["refused"] == "budget"
    last = read_entries(tmp_path / "state" / "ledger.jsonl")[-1]
    assert last["kind"] == "refusal" and "above the site's budget of 4" in last["reason"]


def test_ledger_entries_are_signed_and_verify(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files)
    site = _site(site_files, tmp_path / "state", budget=8.0)
    results = _run(cfg, site, "run-1", 2)
    entries = read_entries(tmp_path / "state" / "ledger.jsonl")
    assert [(e["kind"], e["round"]) for e in entries] == [("size", 1), ("train", 1),
                                                          ("train", 2)]
    assert entries[2]["epsilon"] == pytest.approx(results[1]["metrics"]["epsilon"])
    assert entries[1]["mechanism"]["sampling"] == "poisson"
    assert entries[0]["mechanism"]["sampling"] == "none"
    # the FedAvg weight is the noisy size the ledger records, not the exact count
    assert results[0]["num_examples"] == max(1, round(entries[0]["released_value"]))
    assert oct((tmp_path / "state" / "site_key.pem").stat().st_mode & 0o777) == "0o600"
    report = verify_path(tmp_path / "state" / "ledger.jsonl")
    assert report.ok, report.problems


def _count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.slow
def test_killed_site_never_shows_less_epsilon_than_it_released(tiny_model, site_files, tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_site", str(tiny_model),
             str(site_files["sites"][0]), str(site_files["test"]), str(state), str(out)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # let it release at least one more update, then kill it at a random moment
            # of a later round (before, during or after training, or mid-append)
            before = _count(out / "released.txt")
            deadline = time.time() + 180
            while _count(out / "released.txt") <= before:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "site process released nothing in 180 s"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stderr.close()
    SiteGuard("site0", state, "unused", Policy(1000.0, 1e-5))  # repairs a cut-off tail
    released = [h for h in (out / "released.txt").read_text().split()] if (
        out / "released.txt").exists() else []
    entries = [e for e in read_entries(state / "ledger.jsonl") if e["kind"] == "train"]
    assert len(released) >= 5
    recorded = {e["update_sha256"] for e in entries}
    assert set(released) <= recorded  # every update that left was in the ledger first
    true_history = [(e["noise_multiplier"], e["sample_rate"], e["steps"])
                    for e in entries if e["update_sha256"] in set(released)]
    assert entries[-1]["epsilon"] >= accounting.epsilon(true_history, 1e-5) - 1e-12
    assert verify_path(state / "ledger.jsonl").ok


def _hospital_context(cfg, node: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                   run_config=cfg.to_run_config())


def test_the_run_config_cannot_set_a_hospitals_policy_or_switch_off_its_dp(
        tiny_model, site_files, tmp_path):
    from client.site import site_from_context

    cfg = tiny_config(tiny_model, site_files, privacy={"enabled": False, "delta": 0.1},
                      site={"epsilon_budget": 1000.0})
    node = {"site": "site-a", "data-file": str(site_files["sites"][0]),
            "text-column": "note", "label-column": "diagnosis",
            "state-dir": str(tmp_path / "a"), "epsilon-budget": 3.0, "delta": 1e-6,
            "require-approved-app": False}
    site = site_from_context(cfg, _hospital_context(cfg, node))
    assert site.private is True  # the server asked for no DP; the hospital did not
    assert (site.policy.epsilon_budget, site.policy.delta) == (3.0, 1e-6)
    result = SiteTrainer(cfg, site).fit(1, 1, "run-x")
    assert result["metrics"]["private"] is True
    assert 0 < result["metrics"]["epsilon"] <= 3.0
    for key in ("epsilon-budget", "delta"):
        with pytest.raises(ValueError, match=f"must set {key}"):
            site_from_context(cfg, _hospital_context(
                cfg, {k: v for k, v in node.items() if k != key}))


# -- the accountant a site claims with (no training: the guard alone) -----------------
DEMO = (0.61, 0.058, 16)  # RDP puts it at ε=8.02, PRV at 6.66 (δ=1e-5)
ARRAYS = [np.zeros(3, dtype=np.float32)]


def _guard(state: Path, budget: float = 10.0, **kind) -> SiteGuard:
    return SiteGuard("site0", state, "sha256:data", Policy(budget, 1e-5), **kind)


def test_the_guard_plans_projects_and_records_with_its_accountant(tmp_path):
    guards = {kind: _guard(tmp_path / kind, 8.0, accountant=kind) for kind in ("prv", "rdp")}
    sigmas = {kind: guard.plan("run-1", 8.0, [(0.058, 16)]) for kind, guard in guards.items()}
    assert sigmas["prv"] < sigmas["rdp"]  # the tighter accountant buys less noise
    for kind, guard in guards.items():
        step = PrivateStep(sigmas[kind], 0.058, 16, 1.0)
        claim = accounting.epsilon([(sigmas[kind], 0.058, 16)], 1e-5, guard.accountant)
        assert guard.projected(step) == claim <= 8.0
        entry = guard.record_release("run-1", 1, step, claim, ARRAYS, False)
        assert entry["accountant"] == {"prv": "opacus-prv", "rdp": "opacus-rdp"}[kind]
        assert entry["epsilon"] == claim
        assert verify_path(tmp_path / kind / "ledger.jsonl").ok


def test_the_default_accountant_is_prv_so_an_unchanged_caller_claims_with_prv(tmp_path):
    guard = _guard(tmp_path / "state")
    assert guard.accountant == "prv"
    entry = guard.record_release("run-1", 1, PrivateStep(*DEMO, 1.0),
                                 accounting.epsilon([DEMO], 1e-5), ARRAYS, False)
    assert entry["accountant"] == "opacus-prv"
    with pytest.raises(ValueError, match="privacy.accountant must be one of"):
        _guard(tmp_path / "other", accountant="gdp")


def test_switching_from_rdp_to_prv_never_lowers_the_claimed_epsilon(tmp_path):
    state = tmp_path / "state"
    rdp = _guard(state, accountant="rdp")
    first = rdp.record_release("run-1", 1, PrivateStep(*DEMO, 1.0),
                               accounting.epsilon([DEMO], 1e-5, "rdp"), ARRAYS, False)
    assert first["epsilon"] == pytest.approx(8.02, abs=0.01)
    prv = _guard(state)  # the same site's ledger, now under PRV
    step = PrivateStep(5.0, 0.058, 1, 1.0)  # one more, very noisy step
    recomputed = accounting.epsilon([*prv.history(), (5.0, 0.058, 1)], 1e-5)
    assert recomputed < 7.0  # PRV's ε of the whole history is far below the RDP claim
    assert prv.projected(step) == first["epsilon"]
    second = prv.record_release("run-2", 1, step, recomputed, ARRAYS, False)
    assert (second["epsilon"], second["accountant"]) == (first["epsilon"], "opacus-prv")
    report = verify_path(state / "ledger.jsonl")
    assert report.ok, report.problems
    assert [(r.accountant, r.reference) for r in report.sites[0].entries] == [
        ("opacus-rdp", "rdp"), ("opacus-prv", "pld")]


def test_a_target_the_planned_evaluations_alone_pass_is_refused_as_planned_not_spent(tmp_path):
    """At ε=1 and the default count noise (5), 4 rounds' evaluations alone cost more than
    the target: the refusal says so and names the knobs, instead of 'already spent'."""
    guard = _guard(tmp_path / "state", 8.0)
    counts = [(5.0, 1.0, 1)] * 4
    planned = accounting.epsilon(counts, 1e-5, guard.accountant)
    assert planned > 1.0
    with pytest.raises(accounting.BudgetError) as refused:
        guard.plan("run-1", 1.0, [(0.1, 400)], counts)
    text = str(refused.value)
    assert "ε=0 is spent" in text and f"ε={planned:.4g} before any training" in text
    assert "4 planned evaluations" in text and "privacy.count_noise" in text
    assert "already spent" not in text
    # spent alone beyond the limit (ε≈4.9 spent, then the budget lowered to 4): the
    # counts are not the cause, and the refusal does not point at them
    step = PrivateStep(2.0, 0.1, 400, 1.0)
    claim = accounting.epsilon([(2.0, 0.1, 400)], 1e-5, guard.accountant)
    assert 4.0 < claim < 8.0
    _guard(tmp_path / "spent", 8.0).record_release("run-0", 1, step, claim, ARRAYS, False)
    with pytest.raises(accounting.BudgetError, match="already spent") as refused:
        _guard(tmp_path / "spent", 4.0).plan("run-1", 8.0, [(0.1, 400)], counts)
    assert "planned evaluations" not in str(refused.value)
    # with fewer evaluations it fits, and the σ it plans leaves room for them
    sigma = guard.plan("run-1", 1.0, [(0.1, 400)], counts[:1])
    assert accounting.epsilon([(sigma, 0.1, 400), *counts[:1]], 1e-5, guard.accountant) <= 1.0
