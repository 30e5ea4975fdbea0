"""Site keys and the append-only ledger: file modes, chain, write-ahead, refusals of bad input.

`build_ledger` is shared with test_verify/test_report: it writes a realistic site ledger
(σ≈1, q≈0.05, 10-50 steps a round, one refusal) whose ε claims come from dp_accounting's
public RdpAccountant with its default orders.
"""

from __future__ import annotations

import json
import os
import stat
from functools import lru_cache
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from common.privacy import ledger as ledger_module
from common.privacy.keys import (
    InsecureKeyFileError, KeyFileError, load_or_create_site_key, load_public_key,
    public_key_fingerprint, public_key_pem, signature_valid,
)
from common.privacy.ledger import (
    GENESIS_HASH, REQUIRED_FIELDS, Ledger, LedgerEntryError, LedgerFormatError,
    LedgerConcurrentWriteError, LedgerIntegrityError, LedgerTruncatedError, canonical_json,
    discard_incomplete_tail, entry_hash, read_entries,
)

MECHANISM = {"name": "DP-SGD", "noise": "gaussian", "sampling": "poisson"}
SOFTWARE = {"fedcare": "0.1.0", "opacus": "1.6.0", "torch": "2.13.0"}
ROUNDS = ((1.0, 0.05, 20), (1.1, 0.05, 30), None, (1.0, 0.04, 50), (1.2, 0.05, 10))
DELTA = 1e-5


def claimed_epsilon(history, delta: float = DELTA) -> float:
    return _claimed(tuple(history), delta)


@lru_cache(maxsize=None)
def _claimed(history: tuple, delta: float) -> float:
    accountant = RdpAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    return float(accountant.get_epsilon(delta)) if history else 0.0


def fields(site: str, rnd: int, history: list, release, budget: float) -> dict:
    """Entry fields for one round; `release` is (σ, q, steps), or None for a refusal."""
    base = {"site": site, "run_id": "run-2025-01", "round": rnd,
            "data_fingerprint": f"sha256:data-of-{site}", "mechanism": dict(MECHANISM),
            "max_grad_norm": 1.0, "delta": DELTA, "accountant": "opacus-rdp",
            "epsilon_budget": budget, "secure_aggregation": False, "software": dict(SOFTWARE)}
    if release is None:
        return {**base, "kind": "refusal", "noise_multiplier": 0.0, "sample_rate": 0.0,
                "steps": 0, "epsilon": claimed_epsilon(history), "update_sha256": None,
                "reason": "the next round would exceed the remaining budget"}
    history.append(release)
    sigma, q, steps = release
    return {**base, "kind": "train", "noise_multiplier": sigma, "sample_rate": q,
            "steps": steps, "epsilon": claimed_epsilon(history), "update_sha256": "ab" * 32}


def build_ledger(path: Path, key, site: str = "hospital_a", rounds=ROUNDS,
                 budget: float = 8.0) -> list[dict]:
    ledger, history = Ledger(path, key), []
    for rnd, release in enumerate(rounds, start=1):
        ledger.append(fields(site, rnd, history, release, budget))
    return ledger.entries()


@pytest.fixture
def key(tmp_path):
    return load_or_create_site_key(tmp_path / "keys")


def test_new_key_files_have_owner_only_and_public_modes(tmp_path):
    key = load_or_create_site_key(tmp_path / "keys")
    private, public = tmp_path / "keys" / "site_key.pem", tmp_path / "keys" / "site_key.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = load_or_create_site_key(tmp_path / "keys")
    assert public_key_fingerprint(again.public_key()) == public_key_fingerprint(key.public_key())
    assert public_key_pem(load_public_key(public)) == public_key_pem(key.public_key())


def test_public_key_file_is_world_readable_under_default_umask(tmp_path):
    old = os.umask(0o022)
    try:
        load_or_create_site_key(tmp_path / "keys")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "keys" / "site_key.pub.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "keys" / "site_key.pem").stat().st_mode) == 0o600


def test_world_readable_private_key_is_refused_with_the_fix(tmp_path):
    load_or_create_site_key(tmp_path / "keys")
    private = tmp_path / "keys" / "site_key.pem"
    private.chmod(0o644)
    with pytest.raises(InsecureKeyFileError, match=r"chmod 600 .*site_key\.pem"):
        load_or_create_site_key(tmp_path / "keys")


def test_fingerprint_is_sha256_of_raw_public_key(key):
    fingerprint = public_key_fingerprint(key.public_key())
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64


def test_public_key_of_another_site_beside_private_key_is_refused(tmp_path):
    load_or_create_site_key(tmp_path / "a")
    other = load_or_create_site_key(tmp_path / "b")
    (tmp_path / "a" / "site_key.pub.pem").write_text(public_key_pem(other.public_key()))
    with pytest.raises(KeyFileError, match="does not belong"):
        load_or_create_site_key(tmp_path / "a")


def test_entries_chain_and_verify(tmp_path, key):
    entries = build_ledger(tmp_path / "a.jsonl", key)
    assert [e["seq"] for e in entries] == list(range(len(ROUNDS)))
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for before, after in zip(entries, entries[1:]):
        assert after["prev_hash"] == before["hash"]
    for entry in entries:
        assert entry_hash(entry) == entry["hash"]
        assert signature_valid(key.public_key(), entry["hash"], entry["signature"])
        assert entry["key_fingerprint"] == public_key_fingerprint(key.public_key())
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == read_entries(tmp_path / "a.jsonl")
    assert lines[0] == canonical_json(entries[0])


def test_spent_epsilon_and_history_skip_refusals(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key)
    ledger = Ledger(tmp_path / "a.jsonl", key)
    releases = [r for r in ROUNDS if r is not None]
    assert ledger.history("sha256:data-of-hospital_a") == releases
    assert ledger.spent_epsilon("sha256:data-of-hospital_a") == pytest.approx(
        claimed_epsilon(releases))
    assert ledger.spent_epsilon("sha256:unknown") == 0.0
    assert ledger.history("sha256:unknown") == []


def test_reopened_ledger_continues_the_chain(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key, rounds=ROUNDS[:2])
    history = list(ROUNDS[:2])
    entry = Ledger(tmp_path / "a.jsonl", key).append(
        fields("hospital_a", 3, history, (1.0, 0.05, 15), 8.0))
    entries = read_entries(tmp_path / "a.jsonl")
    assert entry["seq"] == 2 and entry["prev_hash"] == entries[1]["hash"]


def test_append_fsyncs_before_returning(tmp_path, key, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ledger_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    Ledger(tmp_path / "a.jsonl", key).append(fields("hospital_a", 1, [], ROUNDS[0], 8.0))
    assert len(synced) == 2  # the file, then its directory (the file was created)
    assert len(read_entries(tmp_path / "a.jsonl")) == 1


def test_missing_fields_are_named(tmp_path, key):
    bad = fields("hospital_a", 1, [], ROUNDS[0], 8.0)
    del bad["delta"], bad["software"]
    with pytest.raises(LedgerEntryError, match=r"\['delta', 'software'\]"):
        Ledger(tmp_path / "a.jsonl", key).append(bad)
    assert not (tmp_path / "a.jsonl").exists()
    assert set(REQUIRED_FIELDS) <= set(fields("hospital_a", 1, [], ROUNDS[0], 8.0))


@pytest.mark.parametrize("change, message", [
    ({"kind": "refusal", "reason": "x"}, "releases nothing"),
    ({"noise_multiplier": 0.0}, "non-private runs keep no ledger"),
    ({"round": 1.5}, "round must be an integer"),
    ({"epsilon": float("nan")}, "epsilon must be a finite number"),
    ({"time": "2025-01-31T12:00:00+02:00"}, "UTC"),
    ({"hash": "0" * 64}, "only the ledger writes"),
    ({"epsilon": 9.0}, "above the budget"),
])
def test_inconsistent_entries_are_refused(tmp_path, key, change, message):
    with pytest.raises(LedgerEntryError, match=message):
        Ledger(tmp_path / "a.jsonl", key).append(
            {**fields("hospital_a", 1, [], ROUNDS[0], 8.0), **change})


def test_epsilon_cannot_fall_and_refusal_keeps_it(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key, rounds=ROUNDS[:2])
    ledger = Ledger(tmp_path / "a.jsonl", key)
    lower = fields("hospital_a", 3, [], (1.0, 0.05, 10), 8.0)  # history forgotten: ε too low
    with pytest.raises(LedgerEntryError, match="cannot fall"):
        ledger.append(lower)
    refusal = fields("hospital_a", 3, list(ROUNDS[:2]), None, 8.0)
    with pytest.raises(LedgerEntryError, match="must stay"):
        ledger.append({**refusal, "epsilon": refusal["epsilon"] + 0.5})
    assert ledger.append(refusal)["epsilon"] == ledger.spent_epsilon(refusal["data_fingerprint"])


def test_edited_ledger_is_not_extended(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key)
    path = tmp_path / "a.jsonl"
    path.write_text(path.read_text().replace('"steps":30', '"steps":3'))
    with pytest.raises(LedgerIntegrityError, match="changed after it was written"):
        Ledger(path, key)


def test_ledger_of_another_key_is_not_extended(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key)
    other = load_or_create_site_key(tmp_path / "other")
    with pytest.raises(LedgerIntegrityError, match="not signed by this site's key"):
        Ledger(tmp_path / "a.jsonl", other)


def test_truncated_last_line_is_reported_then_repairable(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key)
    path = tmp_path / "a.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # crash in the middle of writing line 5
    with pytest.raises(LedgerTruncatedError, match="Line 5 is incomplete"):
        read_entries(path)
    with pytest.raises(LedgerTruncatedError, match="discard_incomplete_tail"):
        Ledger(path, key)
    removed = discard_incomplete_tail(path)
    assert removed and data.startswith(path.read_bytes() + removed)
    assert len(Ledger(path, key).entries()) == 4


def test_malformed_line_is_reported_by_number(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key)
    path = tmp_path / "a.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][1:]  # lose the opening brace
    path.write_text("".join(lines))
    with pytest.raises(LedgerFormatError, match="Line 3 is not valid JSON") as info:
        read_entries(path)
    assert not isinstance(info.value, LedgerTruncatedError)


def test_second_writer_on_the_same_file_is_refused(tmp_path, key):
    first, second = Ledger(tmp_path / "a.jsonl", key), Ledger(tmp_path / "a.jsonl", key)
    first.append(fields("hospital_a", 1, [], ROUNDS[0], 8.0))
    with pytest.raises(LedgerConcurrentWriteError, match="only one process"):
        second.append(fields("hospital_a", 1, [], ROUNDS[0], 8.0))
    assert len(read_entries(tmp_path / "a.jsonl")) == 1


def test_non_finite_numbers_in_a_line_are_malformed(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key, rounds=ROUNDS[:2])
    path = tmp_path / "a.jsonl"
    text = path.read_text()
    epsilon = json.dumps(read_entries(path)[1]["epsilon"])
    path.write_text(text.replace(f'"epsilon":{epsilon}', '"epsilon":NaN'))
    with pytest.raises(LedgerFormatError, match="Line 2 .*NaN is not a finite number"):
        read_entries(path)
