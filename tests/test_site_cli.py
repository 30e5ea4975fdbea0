"""`fedcare site status|new-dataset` on real signed ledgers in a site's state folder."""

from __future__ import annotations

import pytest

from client.site_cli import LEDGER_FILE, main
from common.privacy.entries import LedgerEntryError
from common.privacy.ledger import Ledger, read_entries
from common.privacy.signing import load_or_create_site_key
from tests.test_ledger import fields, gaussian


def release(history: list, rnd: int, step, dataset: str, version: str, **extra) -> dict:
    return {**fields("hospital_a", rnd, history, step, 8.0), "dataset": dataset,
            "data_fingerprint": version, **extra}


@pytest.fixture
def state(tmp_path):
    """A site that trained twice on notes v1, evaluated once, then trained on notes v2
    (a new version of the same dataset) with an update it withheld."""
    folder = tmp_path / "state"
    ledger, history = Ledger(folder / LEDGER_FILE, load_or_create_site_key(folder)), []
    ledger.append(release(history, 1, (1.0, 0.05, 20), "notes", "sha256:v1"))
    ledger.append(release(history, 2, (1.1, 0.05, 30), "notes", "sha256:v1"))
    ledger.append({**gaussian("evaluate", 2, history), "dataset": "notes",
                   "data_fingerprint": "sha256:v1"})
    ledger.append(release(history, 3, (1.0, 0.04, 50), "notes", "sha256:v2",
                          update_sha256=None, withheld="the update held NaN"))
    return folder


def test_status_shows_one_budget_across_data_versions(state, capsys):
    assert main(["status", str(state)]) == 0
    out = capsys.readouterr().out
    spent = read_entries(state / LEDGER_FILE)[-1]["epsilon"]
    assert f"dataset notes: budget ε=8.0000, spent ε={spent:.4f}, left ε={8 - spent:.4f}" in out
    assert "data version 1: sha256:v1 (seq 0-2)" in out
    assert "data version 2: sha256:v2 (seq 3-3)" in out
    assert "started with its first release" in out
    assert "evaluate" in out and "update withheld: the update held NaN" in out
    assert "no amplification by sampling" not in out
    assert out.rstrip().endswith("the ledger verifies: chain intact, every entry signed by "
                                 "the key in site_key.pub.pem")


def test_status_says_when_the_batch_covers_the_whole_data(tmp_path, capsys):
    folder = tmp_path / "small"
    Ledger(folder / LEDGER_FILE, load_or_create_site_key(folder)).append(
        release([], 1, (2.0, 1.0, 5), "tiny", "sha256:t"))
    assert main(["status", str(folder)]) == 0
    assert "not larger than its batch, so there is no amplification by sampling" in \
        capsys.readouterr().out


def test_status_exits_1_on_a_tampered_ledger_and_2_without_one(state, tmp_path, capsys):
    path = state / LEDGER_FILE
    path.write_text(path.read_text().replace('"steps":30', '"steps":3'))
    assert main(["status", str(state)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM [seq 1]" in out and "changed after it was written" in out
    assert "does NOT verify" in out
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "has no ledger.jsonl" in capsys.readouterr().err


def test_status_exits_1_when_the_ledger_is_not_signed_by_the_sites_key(state, tmp_path,
                                                                      capsys):
    load_or_create_site_key(tmp_path / "other")
    (state / "site_key.pub.pem").write_bytes(
        (tmp_path / "other" / "site_key.pub.pem").read_bytes())
    assert main(["status", str(state)]) == 1
    assert "PROBLEM [seq 0] Entry seq 0 is signed by key" in capsys.readouterr().out


def test_new_dataset_starts_a_fresh_budget_once(state, capsys):
    key = load_or_create_site_key(state)
    with pytest.raises(LedgerEntryError, match="fedcare site new-dataset .* --dataset notes-2025"):
        Ledger(state / LEDGER_FILE, key).append(release([], 4, (1.0, 0.05, 20), "notes-2025",
                                                        "sha256:w1"))
    assert main(["new-dataset", str(state), "--dataset", "notes-2025",
                 "--reason", "a new ward's records, never used before", "--budget", "4"]) == 0
    assert "started dataset notes-2025 at seq 4" in capsys.readouterr().out
    fresh = release([], 4, (1.0, 0.05, 20), "notes-2025", "sha256:w1", epsilon_budget=4.0)
    Ledger(state / LEDGER_FILE, key).append(fresh)  # no longer refused
    assert main(["status", str(state)]) == 0
    out = capsys.readouterr().out
    new = out[out.index("dataset notes-2025:"):]
    assert new.startswith(f"dataset notes-2025: budget ε=4.0000, spent ε={fresh['epsilon']:.4f}")
    assert "started at seq 4: a new ward's records, never used before" in new
    assert "data version 1: sha256:w1 (seq 5-5)" in new
    assert main(["new-dataset", str(state), "--dataset", "notes-2025", "--reason", "again"]) == 1
    assert "can be started once" in capsys.readouterr().err
    assert main(["new-dataset", str(state), "--dataset", "notes", "--reason", "reset"]) == 1
    assert len(read_entries(state / LEDGER_FILE)) == 6


def test_new_dataset_needs_an_existing_ledger_and_key(tmp_path, capsys):
    load_or_create_site_key(tmp_path / "fresh")
    assert main(["new-dataset", str(tmp_path / "fresh"), "--dataset", "a", "--reason", "x"]) == 2
    assert "has no ledger.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / LEDGER_FILE).exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "x" * 129, "", "sha256:abc"])
def test_new_dataset_rejects_names_that_are_not_plain(state, name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["new-dataset", str(state), "--dataset", name, "--reason", "x"])
    assert info.value.code == 2 and "cannot name a folder" in capsys.readouterr().err


def test_the_fedcare_command_registers_the_site_commands(state):
    from client.budget import LEDGER_FILE as written
    from common.cli import build_parser

    assert written == LEDGER_FILE
    args = build_parser().parse_args(["site", "status", str(state)])
    assert args.func(args) == 0
