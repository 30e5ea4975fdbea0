"""The auditor's verifier: every kind of tampering is found, and ε is re-derived independently.

Reference: Opacus's RDP accountant gives ε = 7.32911117143 for σ=1.5, q=0.04, 2250 steps,
δ=1e-5 on its default alphas. The verifier's RDP uses dp_accounting's default orders plus
every 0.05 from 1.05 to 10.95 (`AUDIT_ORDERS`, a superset of Opacus's alphas), so it must
land just at or below that value; PLD is tighter still.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from common.privacy import accounting
from common.privacy.audit_cli import main, register
from common.privacy.entries import canonical_json
from common.privacy.ledger import GENESIS_HASH, Ledger, format_head, read_entries, seal_entry
from common.privacy.signing import load_or_create_site_key, public_key_pem
from common.privacy.verify import (
    AUDIT_ORDERS, PLD_DISCRETIZATION, PRV_EPS_ERROR, compare_accountants, pld_epsilon,
    pld_error, rdp_epsilon, verify_path,
)
from tests.test_ledger import ROUNDS, build_ledger, claimed_epsilon, fields, gaussian, start

OPACUS_REFERENCE = 7.32911117143
SITES = ("hospital_a", "hospital_b")
REPO = Path(__file__).resolve().parents[1]


def make_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run directory with ledgers/<site>.jsonl and the <site>.pub.pem each site sent."""
    run, keys = tmp_path / "run", {}
    (run / "ledgers").mkdir(parents=True)
    (tmp_path / "trusted").mkdir()
    for site in SITES:
        keys[site] = load_or_create_site_key(tmp_path / "keys" / site)
        build_ledger(run / "ledgers" / f"{site}.jsonl", keys[site], site=site)
        pem = public_key_pem(keys[site].public_key())
        (run / "ledgers" / f"{site}.pub.pem").write_text(pem)
        (tmp_path / "trusted" / f"{site}.pub.pem").write_text(pem)
    return run, keys


def write(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(canonical_json(e) + "\n" for e in entries))


def reseal(entries: list[dict], key, start: int = 0) -> list[dict]:
    """What a forger holding `key` does: re-hash and re-sign from `start` on."""
    out = entries[:start]
    for entry in entries[start:]:
        body = {k: v for k, v in entry.items()
                if k not in ("seq", "prev_hash", "key_fingerprint", "hash", "signature")}
        prev = out[-1]["hash"] if out else GENESIS_HASH
        out.append(seal_entry(body, seq=len(out), prev_hash=prev, key=key))
    return out


def messages(report) -> str:
    return "\n".join(p.message for p in report.problems)


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path)


def test_clean_run_verifies_and_says_when_keys_are_unpinned(tmp_path, run):
    run_dir, _ = run
    report = verify_path(run_dir)
    assert report.ok, messages(report)
    assert [s.status for s in report.sites] == ["verified (keys unpinned)"] * 2
    pinned = verify_path(run_dir, trusted_keys=tmp_path / "trusted")
    assert pinned.ok and [s.status for s in pinned.sites] == ["verified"] * 2
    for row in pinned.sites[0].entries:
        assert row.epsilon_pld <= row.epsilon_rdp <= row.epsilon_claimed * 1.0001
    assert [r.kind for r in pinned.sites[0].entries].count("refusal") == 1


@pytest.mark.parametrize("line", [0, 2, -1])
@pytest.mark.parametrize("where", [0, 0.1, 0.3, 0.5, 0.7, 0.9, "last", "newline"])
def test_flipping_any_byte_is_detected(run, line, where):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    target = bytearray(lines[line])
    body = len(target) - 1
    named = {"last": body - 1, "newline": body}
    pos = named[where] if isinstance(where, str) else int(body * where)
    target[pos] ^= 0x01
    lines[line] = bytes(target)
    path.write_bytes(b"".join(lines))
    report = verify_path(run_dir)
    assert not report.ok
    assert {p.site for p in report.problems} == {"hospital_a"}


def test_deleted_entry_is_detected(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    write(path, [e for e in read_entries(path) if e["seq"] != 2])
    assert "deleted, inserted or moved" in messages(verify_path(run_dir))


def test_reordered_entries_are_detected(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = read_entries(path)
    entries[1], entries[2] = entries[2], entries[1]
    write(path, entries)
    text = messages(verify_path(run_dir))
    assert "does not link" in text and "deleted, inserted or moved" in text


def test_inserted_copy_of_an_entry_is_detected(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = read_entries(path)
    write(path, entries[:2] + [entries[1]] + entries[2:])
    assert "deleted, inserted or moved" in messages(verify_path(run_dir))


def test_entry_resigned_by_another_key(tmp_path, run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    forger = load_or_create_site_key(tmp_path / "forger")
    write(path, reseal(read_entries(path), forger, start=3))
    pinned = verify_path(run_dir, trusted_keys=tmp_path / "trusted")
    assert "not the site's trusted key" in messages(pinned)
    unpinned = verify_path(run_dir)
    assert "signed with 2 different keys" in messages(unpinned)
    # The forger also swaps the key sent beside the ledger: still a key change.
    (run_dir / "ledgers" / "hospital_a.pub.pem").write_text(public_key_pem(forger.public_key()))
    assert "signed with 2 different keys" in messages(verify_path(run_dir))


def test_whole_ledger_resigned_needs_pinned_keys(tmp_path, run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    forger = load_or_create_site_key(tmp_path / "forger")
    write(path, reseal(read_entries(path), forger))
    (run_dir / "ledgers" / "hospital_a.pub.pem").write_text(public_key_pem(forger.public_key()))
    unpinned = verify_path(run_dir)
    assert unpinned.ok and unpinned.sites[0].status == "verified (keys unpinned)"
    pinned = verify_path(run_dir, trusted_keys=tmp_path / "trusted")
    assert "not the site's trusted key" in messages(pinned)
    assert "beside the ledger" in messages(pinned)


def test_lying_site_with_valid_signatures_is_caught_by_rederivation(tmp_path, run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = [{**e, "epsilon": e["epsilon"] * 0.8} for e in read_entries(path)]
    write(path, reseal(entries, keys["hospital_a"]))
    report = verify_path(run_dir, trusted_keys=tmp_path / "trusted")
    problems = report.sites[0].problems
    assert [p.seq for p in problems] == list(range(len(entries)))  # refusal included
    assert all("re-derive to" in p.message and "too low" in p.message for p in problems)
    assert report.sites[1].problems == ()


def test_small_numeric_differences_stay_within_tolerance(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = [{**e, "epsilon": e["epsilon"] * 0.995} for e in read_entries(path)]
    write(path, reseal(entries, keys["hospital_a"]))
    assert verify_path(run_dir, tolerance=1e-2).ok
    assert not verify_path(run_dir, tolerance=1e-3).ok


def test_claim_above_budget_is_a_problem(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = read_entries(path)
    entries[-1] = {**entries[-1], "epsilon_budget": entries[-1]["epsilon"] / 2}
    write(path, reseal(entries, keys["hospital_a"]))
    report = verify_path(run_dir)
    assert [p.seq for p in report.problems] == [len(entries) - 1]
    assert "above its budget" in report.problems[0].message


def test_refusal_that_releases_or_moves_epsilon_is_a_problem(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = read_entries(path)
    refusal = ROUNDS.index(None)
    entries[refusal] = {**entries[refusal], "steps": 5, "epsilon": entries[refusal]["epsilon"] + 1}
    write(path, reseal(entries, keys["hospital_a"]))
    text = messages(verify_path(run_dir))
    assert "a refusal must release nothing" in text and "must stay unchanged" in text


def test_truncated_final_line_is_a_problem(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_b.jsonl"
    path.write_bytes(path.read_bytes()[:-25])
    report = verify_path(run_dir)
    assert [p.site for p in report.problems] == ["hospital_b"]
    assert "Line 5 is incomplete" in report.problems[0].message


def test_rdp_reproduces_opacus_reference_and_pld_is_lower():
    history = ((1.5, 0.04, 2250),)
    rdp = rdp_epsilon(history, 1e-5)
    assert rdp == pytest.approx(OPACUS_REFERENCE, abs=5e-3)
    assert rdp <= OPACUS_REFERENCE
    assert 6.0 < pld_epsilon(history, 1e-5) < rdp


def test_cached_paths_equal_dp_accounting_public_accountants():
    """The verifier caches per (σ, q) for speed; its numbers must be the accountants'."""
    history = ((1.0, 0.05, 20), (1.1, 0.05, 30), (1.0, 0.04, 50))
    rdp = RdpAccountant(AUDIT_ORDERS)
    pld = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        event = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        rdp.compose(event)
        pld.compose(event)
    assert rdp_epsilon(history, 1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    assert pld_epsilon(history, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("sigma", [0.8, 1.2, 2.0])
@pytest.mark.parametrize("q", [0.01, 0.05])
@pytest.mark.parametrize("steps", [100, 1000])
def test_pld_never_exceeds_rdp(sigma, q, steps):
    history = ((sigma, q, steps),)
    assert 0 < pld_epsilon(history, 1e-5) <= rdp_epsilon(history, 1e-5)


def test_cli_exit_codes(tmp_path, run, capsys):
    run_dir, _ = run
    assert main(["verify", str(run_dir)]) == 0
    assert "KEYS UNPINNED" in capsys.readouterr().out
    assert main(["verify", str(run_dir), "--trusted-keys", str(tmp_path / "trusted")]) == 0
    out = capsys.readouterr().out
    assert "UNPINNED" not in out and out.count(": verified,") == 2
    assert "problem(s), ε=" in out and " on dataset sha256:data-of-hospital_b" in out
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    path.write_text(path.read_text().replace('"steps":30', '"steps":3'))
    assert main(["verify", str(run_dir)]) == 1
    assert "PROBLEM [hospital_a seq 1]" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2


def test_cli_runs_as_module_and_under_a_parent_parser(run):
    import argparse
    run_dir, _ = run
    ledger = run_dir / "ledgers" / "hospital_b.jsonl"
    done = subprocess.run([sys.executable, "-m", "common.privacy.audit_cli", "verify", str(ledger)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hospital_b: verified (keys unpinned)" in done.stdout
    parser = argparse.ArgumentParser(prog="fedcare")
    register(parser.add_subparsers(dest="command"))
    shutil.copy(ledger, run_dir / "copy.jsonl")  # no key beside it: cannot be verified
    args = parser.parse_args(["audit", "verify", str(run_dir / "copy.jsonl")])
    assert args.func(args) == 1


def test_claims_are_held_to_the_accountant_they_name(run):
    """A PLD/PRV claim may sit below RDP but not below PLD; an RDP claim may not."""
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = read_entries(path)
    history, tight = [], []
    for entry in entries:
        if entry["kind"] != "refusal":
            history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
        tight.append({**entry, "epsilon": pld_epsilon(tuple(history), entry["delta"]) * 1.001})
    write(path, reseal([{**e, "accountant": "opacus-prv"} for e in tight], keys["hospital_a"]))
    assert verify_path(run_dir).ok
    write(path, reseal(tight, keys["hospital_a"]))  # same numbers, labelled opacus-rdp
    assert "too low" in messages(verify_path(run_dir))


def prv_claims(entries: list[dict]) -> list[dict]:
    """The same ledger as fedcare writes it under privacy.accountant=prv."""
    history, out = [], []
    for entry in entries:
        if entry["kind"] != "refusal":
            history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
        out.append({**entry, "accountant": accounting.accountant_name("prv"),
                    "epsilon": accounting.epsilon(history, entry["delta"], "prv")})
    return out


def test_prv_claims_pass_and_a_claim_lowered_beyond_prvs_stated_error_fails(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    honest = prv_claims(read_entries(path))
    write(path, reseal(honest, keys["hospital_a"]))
    report = verify_path(run_dir)
    assert report.ok, messages(report)
    rows = report.sites[0].entries
    assert {(r.accountant, r.reference) for r in rows} == {("opacus-prv", "pld")}
    assert all(r.epsilon_pld <= r.epsilon_claimed < r.epsilon_rdp for r in rows)
    # within PRV's stated error: still an upper bound for all the verifier can tell
    write(path, reseal([{**e, "epsilon": e["epsilon"] - 0.005} for e in honest],
                       keys["hospital_a"]))
    assert verify_path(run_dir).ok
    # lowered by more than the whole width of PRV's bound (2·eps_error): flagged
    lowered = 2 * PRV_EPS_ERROR + 0.005
    write(path, reseal([{**e, "epsilon": e["epsilon"] - lowered} for e in honest],
                       keys["hospital_a"]))
    report = verify_path(run_dir)
    assert [p.seq for p in report.problems] == list(range(len(honest)))
    assert all("by opacus-prv" in p.message and "held to PLD less" in p.message
               and "too low" in p.message for p in report.problems)


def test_the_prv_tolerance_covers_plds_own_pessimism():
    """PLD(h) overstates the true ε by a margin quadratic in h; pld_error = PLD(2h) -
    PLD(h) is about three times that margin, so PLD(h) - pld_error is below the true ε."""
    assert PRV_EPS_ERROR == accounting.PRV_EPS_ERROR  # the error fedcare's claims carry
    history = ((1.5, 0.04, 2250),)
    coarse, finer = pld_epsilon(history, 1e-5), pld_epsilon(history, 1e-5, 1e-4)
    assert 0 < coarse - finer < pld_error(history, 1e-5) < PRV_EPS_ERROR
    assert coarse - pld_error(history, 1e-5) <= finer


def test_an_unnamed_or_rdp_accountant_is_held_to_rdp(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    write(path, reseal([{k: v for k, v in e.items() if k != "accountant"}
                        for e in prv_claims(read_entries(path))], keys["hospital_a"]))
    report = verify_path(run_dir)
    assert {r.reference for r in report.sites[0].entries} == {"rdp"}
    assert "by an unnamed accountant" in messages(report)


def test_compare_accountants_on_the_demo_mechanism():
    row = compare_accountants(0.61, 0.058, 16, 1e-5)
    assert row["rdp"] == pytest.approx(8.0212, abs=1e-3)
    assert row["prv"] == pytest.approx(6.6551, abs=2e-3)
    assert row["pld"] == pytest.approx(6.6445, abs=1e-3)
    assert row["prv_over_pld"] == pytest.approx(row["prv"] / row["pld"])
    assert 1.0 <= row["prv_over_pld"] < 1.005 < 1.2 < row["rdp_over_pld"]


# -- datasets ------------------------------------------------------------------------------
def resealed_run(run, entries: list[dict]) -> Path:
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    write(path, reseal(entries, keys["hospital_a"]))
    return run_dir


def test_a_changed_fingerprint_is_a_new_version_of_the_same_budget(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    versions = [{**e, "dataset": "notes", "data_fingerprint": f"sha256:v{e['seq'] // 2}"}
                for e in read_entries(path)]
    report = verify_path(resealed_run(run, versions))
    assert report.ok, messages(report)
    assert {r.dataset for r in report.sites[0].entries} == {"notes"}
    assert [r.data_fingerprint for r in report.sites[0].entries][-1] == "sha256:v2"
    # the loophole: counting the newest version's ε from zero is caught twice over
    restarted = versions[:4] + [{**versions[4], "epsilon": claimed_epsilon([ROUNDS[4]])}]
    text = messages(verify_path(resealed_run(run, restarted)))
    assert "cumulative and cannot fall" in text and "too low" in text


def test_delta_is_one_per_dataset(run):
    run_dir, _ = run
    entries = read_entries(run_dir / "ledgers" / "hospital_a.jsonl")
    entries[-1] = {**entries[-1], "delta": 1e-6, "epsilon": claimed_epsilon(
        [r for r in ROUNDS if r is not None], 1e-6)}
    assert "keep one δ per dataset" in messages(verify_path(resealed_run(run, entries)))


def test_evaluate_and_size_releases_are_rederived_as_unsampled_gaussians(run):
    run_dir, _ = run
    entries = read_entries(run_dir / "ledgers" / "hospital_a.jsonl")[:2]
    history = [ROUNDS[0], ROUNDS[1]]
    entries += [gaussian("evaluate", 2, history), gaussian("size", 2, history, sigma=10.0)]
    report = verify_path(resealed_run(run, entries))
    assert report.ok, messages(report)
    size = report.sites[0].entries[-1]
    assert (size.kind, size.sample_rate, size.released_value) == ("size", 1.0, 812.4)
    assert size.epsilon_pld <= size.epsilon_rdp <= size.epsilon_claimed * 1.0001
    # a site that leaves the evaluation out of its ε
    entries[2]["epsilon"] = entries[1]["epsilon"]
    text = messages(verify_path(resealed_run(run, entries)))
    assert "Entry seq 2 claims" in text and "too low" in text
    # an "unsampled" release that claims amplification by sampling
    entries[2] = {**gaussian("evaluate", 2, [ROUNDS[0], ROUNDS[1]]), "sample_rate": 0.01}
    assert "without sampling there is no amplification" in messages(
        verify_path(resealed_run(run, entries)))


def test_dataset_starts_are_declared_once_and_release_nothing(run):
    run_dir, _ = run
    entries = read_entries(run_dir / "ledgers" / "hospital_a.jsonl")[:2]
    ward = {**fields("hospital_a", 3, [], ROUNDS[0], 8.0), "dataset": "ward-b"}
    declared = entries + [start("ward-b"), ward]
    report = verify_path(resealed_run(run, declared))
    assert report.ok, messages(report)
    assert [r.dataset for r in report.sites[0].entries][-2:] == ["ward-b", "ward-b"]
    undeclared = entries + [ward]
    assert "no dataset entry started it" in messages(verify_path(resealed_run(run, undeclared)))
    restart = entries + [start("sha256:data-of-hospital_a")]  # to get the budget back
    text = messages(verify_path(resealed_run(run, restart)))
    assert "starts dataset 'sha256:data-of-hospital_a' again" in text
    spends = entries + [{**start("ward-b"), "epsilon": 1.0, "steps": 5}]
    text = messages(verify_path(resealed_run(run, spends)))
    assert "ε must be 0" in text and "a dataset start must release nothing" in text


def test_an_old_ledger_with_two_fingerprints_stays_valid(run):
    run_dir, _ = run
    entries = read_entries(run_dir / "ledgers" / "hospital_a.jsonl")[:2]
    moved = {**fields("hospital_a", 3, [], ROUNDS[0], 8.0), "data_fingerprint": "sha256:other"}
    report = verify_path(resealed_run(run, entries + [moved]))
    assert report.ok, messages(report)
    assert report.sites[0].entries[-1].dataset == "sha256:other"


# -- rollback: the heads the server received -------------------------------------------------
def record_heads(run_dir: Path, site: str = "hospital_a") -> list[dict]:
    """What the server's run log keeps: each head the site reported, with its round."""
    entries = read_entries(run_dir / "ledgers" / f"{site}.jsonl")
    heads = [{"round": e["round"], "phase": phase, "head": format_head(e["seq"], e["hash"])}
             for e in entries for phase in ("train", "evaluate")]
    (run_dir / "ledgers" / f"{site}.heads.jsonl").write_text(
        "".join(json.dumps(h) + "\n" for h in heads))
    return entries


def test_heads_the_ledger_still_contains_verify_and_are_not_ledgers(run):
    run_dir, _ = run
    record_heads(run_dir)
    report = verify_path(run_dir)
    assert report.ok, messages(report)
    assert [s.site for s in report.sites] == list(SITES)


def test_a_ledger_cut_after_the_server_saw_it_is_caught(run):
    run_dir, _ = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = record_heads(run_dir)
    write(path, entries[:3])  # chain and signatures of what is left are intact
    report = verify_path(run_dir)
    cut = [p for p in report.problems if "does not extend a head" in p.message]
    assert [p.seq for p in cut] == [3, 4]
    assert cut[0].message.endswith("the ledger does not extend a head the server received in "
                                   "round 4 (seq 3): entries were cut off or rewritten.")


def test_a_ledger_rewritten_and_resigned_after_the_server_saw_it_is_caught(run):
    run_dir, keys = run
    path = run_dir / "ledgers" / "hospital_a.jsonl"
    entries = record_heads(run_dir)
    lower = [{**e, "steps": max(1, e["steps"] // 2)} if e["seq"] >= 3 else e for e in entries]
    history = []
    for e in lower:  # honest claims for the smaller history: only the heads betray it
        if e["kind"] != "refusal":
            history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
        e["epsilon"] = claimed_epsilon(history)
    write(path, reseal(lower, keys["hospital_a"]))
    report = verify_path(run_dir)
    assert [p.seq for p in report.problems] == [3, 4]
    assert all("entries were cut off or rewritten" in p.message for p in report.problems)


def test_a_ledger_file_is_checked_against_the_heads_beside_it(tmp_path):
    key = load_or_create_site_key(tmp_path / "k")
    ledger = tmp_path / "site0.jsonl"
    Ledger(ledger, key).append(fields("site0", 1, [], ROUNDS[0], 8.0))
    (tmp_path / "site0.pub.pem").write_text(public_key_pem(key.public_key()))
    (tmp_path / "site0.heads.jsonl").write_text(
        json.dumps({"round": 2, "phase": "train", "head": "1:" + "ab" * 32}) + "\n")
    assert "round 2 (seq 1)" in messages(verify_path(ledger))


def test_an_unreadable_heads_file_is_a_problem_not_a_crash(run):
    run_dir, _ = run
    heads = run_dir / "ledgers" / "hospital_b.heads.jsonl"
    heads.write_text('{"round": 1, "head": "oops"}\nnot json\n')
    report = verify_path(run_dir)
    lines = [p.message for p in report.problems]
    assert len(lines) == 2 and all("is not a head record" in m for m in lines)
    heads.write_bytes(b"\xff\xfe")
    assert "cannot be read" in messages(verify_path(run_dir))


def test_heads_from_a_site_whose_ledger_is_gone_are_a_problem(run):
    run_dir, _ = run
    record_heads(run_dir, "hospital_b")
    (run_dir / "ledgers" / "hospital_b.jsonl").unlink()
    report = verify_path(run_dir)
    assert [s.site for s in report.sites] == list(SITES)
    assert "its ledger is missing" in messages(report)
