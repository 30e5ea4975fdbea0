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
from common.privacy.entries import (
    GAUSSIAN_MECHANISM, REQUIRED_FIELDS, LedgerConcurrentWriteError, LedgerEntryError,
    LedgerFormatError, LedgerIntegrityError, LedgerTruncatedError, canonical_json, dataset_of,
    entry_hash,
)
from common.privacy.ledger import (
    GENESIS_HASH, Ledger, discard_incomplete_tail, format_head, heads_file, parse_head,
    read_entries,
)
from common.privacy.signing import (
    InsecureKeyFileError, KeyFileError, load_or_create_site_key, load_public_key,
    public_key_fingerprint, public_key_pem, signature_valid,
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


def gaussian(kind: str, rnd: int, history: list, sigma: float = 4.0, **extra) -> dict:
    """An evaluate or size release: one Gaussian mechanism of sensitivity 1, (σ, 1.0, 1)."""
    base = fields("hospital_a", rnd, [], (sigma, 1.0, 1), 8.0)
    history.append((sigma, 1.0, 1))
    return {**base, "kind": kind, "mechanism": dict(GAUSSIAN_MECHANISM), "update_sha256": None,
            "epsilon": claimed_epsilon(history),
            **({"released_value": 812.4} if kind == "size" else {}), **extra}


def start(dataset: str, reason: str = "records of a new ward", **extra) -> dict:
    """A "dataset" entry: the site declares a new dataset with a fresh budget."""
    base = fields("hospital_a", 0, [], None, 8.0)
    return {**base, "kind": "dataset", "dataset": dataset, "data_fingerprint": "none",
            "epsilon": 0.0, "reason": reason, **extra}


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


# -- datasets: one budget per declared dataset, across its data versions ------------------
def test_a_new_data_version_spends_from_the_same_budget(tmp_path, key):
    ledger, history = Ledger(tmp_path / "a.jsonl", key), []
    ledger.append({**fields("hospital_a", 1, history, ROUNDS[0], 8.0), "dataset": "notes"})
    v2 = {**fields("hospital_a", 2, history, ROUNDS[1], 8.0), "dataset": "notes",
          "data_fingerprint": "sha256:v2"}
    ledger.append(v2)
    assert ledger.history("notes") == [ROUNDS[0], ROUNDS[1]]
    assert ledger.spent_epsilon("notes") == pytest.approx(claimed_epsilon(ROUNDS[:2]))
    assert ledger.history("sha256:v2") == [] and ledger.datasets() == ["notes"]
    restart = {**fields("hospital_a", 3, [], ROUNDS[3], 8.0), "dataset": "notes",
               "data_fingerprint": "sha256:v3"}  # ε counted on v3 alone: too low
    with pytest.raises(LedgerEntryError, match="dataset 'notes' has spent"):
        ledger.append(restart)


def test_an_old_ledger_keeps_its_fingerprint_as_the_dataset(tmp_path, key):
    build_ledger(tmp_path / "a.jsonl", key, rounds=ROUNDS[:2])
    ledger = Ledger(tmp_path / "a.jsonl", key)
    assert ledger.datasets() == ["sha256:data-of-hospital_a"]
    assert dataset_of(ledger.entries()[0]) == "sha256:data-of-hospital_a"
    # the old site code's call: the fingerprint, which is the identity of such entries
    assert ledger.history("sha256:data-of-hospital_a") == list(ROUNDS[:2])
    # a changed fingerprint no longer starts a fresh budget by itself
    moved = {**fields("hospital_a", 3, [], ROUNDS[3], 8.0), "data_fingerprint": "sha256:new"}
    with pytest.raises(LedgerEntryError, match="only a ledger's first dataset starts "
                                               "implicitly.*--dataset NAME"):
        ledger.append(moved)


def test_a_second_dataset_needs_a_dataset_entry_which_starts_it_once(tmp_path, key):
    ledger = Ledger(tmp_path / "a.jsonl", key)
    ledger.append({**fields("hospital_a", 1, [], ROUNDS[0], 8.0), "dataset": "notes"})
    ward = {**fields("hospital_a", 1, [], ROUNDS[0], 8.0), "dataset": "ward-b"}
    with pytest.raises(LedgerEntryError, match=r"fedcare site new-dataset \S+ --dataset ward-b "
                                               r'--reason "\.\.\."'):
        ledger.append(ward)
    refusal = {**fields("hospital_a", 1, [], None, 8.0), "dataset": "ward-b", "epsilon": 0.0}
    with pytest.raises(LedgerEntryError, match="is new to"):
        ledger.append(refusal)
    assert ledger.append(start("ward-b"))["epsilon"] == 0.0
    assert ledger.append(ward)["epsilon"] == pytest.approx(claimed_epsilon([ROUNDS[0]]))
    assert ledger.spent_epsilon("notes") == ledger.spent_epsilon("ward-b")  # two budgets
    for again in ("ward-b", "notes"):
        with pytest.raises(LedgerEntryError, match="can be started once"):
            ledger.append(start(again))
    assert [e["kind"] for e in read_entries(tmp_path / "a.jsonl")] == ["train", "dataset", "train"]


@pytest.mark.parametrize("change, message", [
    ({"epsilon": 0.5}, "epsilon must be 0"),
    ({"reason": ""}, "needs a non-empty reason explaining why a new dataset starts"),
    ({"steps": 3}, "releases nothing"),
    ({"dataset": ""}, "dataset must be a non-empty string"),
])
def test_bad_dataset_entries_are_refused(tmp_path, key, change, message):
    with pytest.raises(LedgerEntryError, match=message):
        Ledger(tmp_path / "a.jsonl", key).append({**start("notes"), **change})
    nameless = {k: v for k, v in start("notes").items() if k != "dataset"}
    with pytest.raises(LedgerEntryError, match="must name the dataset"):
        Ledger(tmp_path / "a.jsonl", key).append(nameless)


def test_evaluate_and_size_releases_compose_into_the_history(tmp_path, key):
    ledger, history = Ledger(tmp_path / "a.jsonl", key), []
    ledger.append(fields("hospital_a", 1, history, ROUNDS[0], 8.0))
    ledger.append(gaussian("evaluate", 1, history))
    size = ledger.append(gaussian("size", 1, history, sigma=10.0))
    assert size["released_value"] == 812.4
    assert ledger.history("sha256:data-of-hospital_a") == [ROUNDS[0], (4.0, 1.0, 1),
                                                           (10.0, 1.0, 1)]
    spent = ledger.spent_epsilon("sha256:data-of-hospital_a")
    assert spent == pytest.approx(claimed_epsilon(history))
    assert spent > claimed_epsilon([ROUNDS[0]]) + 0.1


@pytest.mark.parametrize("kind, change, message", [
    ("evaluate", {"sample_rate": 0.5}, "sample_rate=1.0, steps=1"),
    ("evaluate", {"steps": 2}, "sample_rate=1.0, steps=1"),
    ("evaluate", {"max_grad_norm": 2.0}, "max_grad_norm=1.0"),
    ("evaluate", {"noise_multiplier": 0.0}, "noise_multiplier > 0"),
    ("evaluate", {"mechanism": MECHANISM}, "mechanism must be"),
    ("evaluate", {"update_sha256": "ab" * 32}, "update_sha256=None"),
    ("size", {"released_value": float("inf")}, "released_value must be a finite number"),
])
def test_bad_gaussian_releases_are_refused(tmp_path, key, kind, change, message):
    with pytest.raises(LedgerEntryError, match=message):
        Ledger(tmp_path / "a.jsonl", key).append(gaussian(kind, 1, [], **change))
    unvalued = {k: v for k, v in gaussian("size", 1, []).items() if k != "released_value"}
    with pytest.raises(LedgerEntryError, match="size entry must record the noisy size"):
        Ledger(tmp_path / "a.jsonl", key).append(unvalued)


def test_a_trained_but_withheld_update_is_charged_and_says_why(tmp_path, key):
    ledger, history = Ledger(tmp_path / "a.jsonl", key), []
    withheld = {**fields("hospital_a", 1, history, ROUNDS[0], 8.0), "update_sha256": None,
                "withheld": "the update held NaN"}
    assert ledger.append(withheld)["withheld"] == "the update held NaN"
    assert ledger.spent_epsilon("sha256:data-of-hospital_a") > 0
    silent = {**fields("hospital_a", 2, history, ROUNDS[1], 8.0), "update_sha256": None}
    with pytest.raises(LedgerEntryError, match="say why in withheld"):
        ledger.append(silent)
    with pytest.raises(LedgerEntryError, match="Only a train entry whose update was not sent"):
        ledger.append({**silent, "update_sha256": "ab" * 32, "withheld": "x"})


def test_head_is_the_last_entry_and_round_trips_as_text(tmp_path, key):
    ledger = Ledger(tmp_path / "a.jsonl", key)
    assert ledger.head() is None
    build_ledger(tmp_path / "a.jsonl", key, rounds=ROUNDS[:2])
    last = read_entries(tmp_path / "a.jsonl")[-1]
    head = Ledger(tmp_path / "a.jsonl", key).head()
    assert head == (1, last["hash"])
    assert parse_head(format_head(*head)) == head and format_head(*head) == f"1:{last['hash']}"
    for bad in ("1", f"-1:{last['hash']}", f"01:{last['hash']}", "1:abc", f"1:{last['hash']}x",
                None, 7):
        with pytest.raises(ValueError, match="seq:hash"):
            parse_head(bad)
    assert heads_file(tmp_path / "site0.jsonl") == tmp_path / "site0.heads.jsonl"
