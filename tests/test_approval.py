"""A hospital approves the app it runs: hashes as Flower computes them, signed approval
entries in the site's ledger that spend nothing, the auditor's check that every release
names an approved app, and a hospital site that will not start without one. The
refusal of an unapproved app by `fedcare site clientapp` runs in tests/test_deployment.py
(real SuperLink and SuperNodes)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.approval import current_approvals
from client.node import site_from_context
from common.cli import main
from common.config import from_node_config
from common.privacy.approvals import (
    APPROVALS_LEDGER_ENV, APPROVED_APP_ENV, AppNotApproved, BundleError, app_problems,
    approved_apps, bundle_sha256,
)
from common.privacy.entries import LedgerEntryError
from common.privacy.ledger import LEDGER_FILE, Ledger, read_entries
from common.privacy.signing import load_or_create_site_key
from common.privacy.verify import verify_path
from tests.conftest import tiny_config

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "hospital-test"
fab-include = ["client/**/*.py"]

[tool.flwr.app.components]
serverapp = "client.app:server"
clientapp = "client.app:app"

[tool.flwr.app.config]
rounds = 1
"""


def write_app(folder: Path, line: str = "VALUE = 1") -> Path:
    (folder / "client").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "client" / "__init__.py").write_text("")
    (folder / "client" / "app.py").write_text(f'"""A tiny app."""\napp = server = None\n{line}\n')
    (folder / "notes.txt").write_text("not in the bundle (fab-include)\n")
    return folder


def release(entries: list[dict], app: str | None, kind: str = "train") -> dict:
    """A train entry as a site writes it (under `app`, when it names one)."""
    spent = 5.0 * (1 + sum(1 for e in entries if e.get("kind") == "train"))  # above true ε
    entry = {"kind": kind, "site": "site-a", "run_id": "run-1", "round": 1,
             "data_fingerprint": "sha256:x", "dataset": "main",
             "mechanism": {"name": "DP-SGD"}, "noise_multiplier": 1.0, "sample_rate": 0.1,
             "steps": 10, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "opacus-rdp",
             "epsilon": spent, "epsilon_budget": 100.0, "update_sha256": "ab" * 32,
             "secure_aggregation": False, "software": {}}
    return {**entry, "app_sha256": app} if app else entry


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["site", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- the hash ----------------------------------------------------------------------------
def test_a_source_folder_hashes_to_the_fab_flwr_builds_from_it(tmp_path):
    app = write_app(tmp_path / "app")
    out = tmp_path / "built"
    out.mkdir()
    subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(app)],
                   cwd=out, check=True, capture_output=True)
    (fab,) = out.glob("*.fab")
    assert bundle_sha256(app) == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert bundle_sha256(fab) == bundle_sha256(app)  # the .fab itself, as received
    # another copy of the same source (new times, new folder) is the same bundle ...
    copy = shutil.copytree(app, tmp_path / "copy")
    (copy / "notes.txt").write_text("edited outside the bundle\n")
    assert bundle_sha256(copy) == bundle_sha256(app)
    # ... and one changed line in the code is not
    code = copy / "client" / "app.py"
    code.write_text(code.read_text().replace("VALUE = 1", "VALUE = 2"))
    assert bundle_sha256(copy) != bundle_sha256(app)


def test_what_is_not_an_app_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no pyproject.toml"):
        bundle_sha256(tmp_path / "empty")
    (tmp_path / "x.fab").write_text("not a zip")
    with pytest.raises(BundleError, match="not a FAB"):
        bundle_sha256(tmp_path / "x.fab")
    with pytest.raises(BundleError, match="does not exist"):
        bundle_sha256(tmp_path / "missing")


# -- the commands ------------------------------------------------------------------------
def test_approve_list_and_revoke_are_signed_ledger_entries(tmp_path, capsys):
    app, state = write_app(tmp_path / "app"), tmp_path / "state"
    digest = bundle_sha256(app)
    rc, _, err = cli(capsys, "approve", str(state), str(app), "--reason", "reviewed")
    assert rc == 1 and "--site" in err and not (state / LEDGER_FILE).exists()
    rc, out, _ = cli(capsys, "approve", str(state), str(app), "--site", "site-a",
                     "--reason", "release 1.0 reviewed", "--by", "dpo")
    assert rc == 0 and f"approved app {digest}" in out
    rc, out, _ = cli(capsys, "approve", str(state), str(app), "--reason", "again")
    assert rc == 0 and "already approved" in out  # nothing written twice
    rc, _, err = cli(capsys, "approve", str(state), str(app), "--site", "site-b",
                     "--reason", "x")
    assert rc == 1 and "site 'site-a'" in err
    rc, out, _ = cli(capsys, "approvals", str(state))
    assert rc == 0 and "1 app(s) approved now" in out and "by dpo: release 1.0" in out
    rc, out, _ = cli(capsys, "revoke", str(state), digest, "--reason", "withdrawn")
    assert rc == 0 and f"revoked app {digest}" in out
    rc, _, err = cli(capsys, "revoke", str(state), digest, "--reason", "again")
    assert rc == 1 and "nothing to revoke" in err
    rc, out, _ = cli(capsys, "approvals", str(state))
    assert rc == 0 and "0 app(s) approved now" in out and "revoke" in out
    entries = read_entries(state / LEDGER_FILE)
    assert [(e["kind"], e["approved"], e["app_sha256"]) for e in entries] == [
        ("approval", True, digest), ("approval", False, digest)]
    assert approved_apps(entries) == {}
    assert verify_path(state / LEDGER_FILE).ok  # chained and signed by the site key


def test_a_first_approval_takes_the_node_configs_site_or_is_refused_by_name(tmp_path, capsys):
    app, state = write_app(tmp_path / "app"), tmp_path / "state"
    node = tmp_path / "node-config.toml"
    node.write_text(f'site = "site-a"\nstate-dir = "{state}"\ndata-file = "notes.csv"\n'
                    'epsilon-budget = 8.0\ndelta = 1e-5\n')
    rc, _, err = cli(capsys, "approve", str(state), str(app), "--site", "site-A",
                     "--node-config", str(node), "--reason", "typo")
    assert rc == 1 and "--site 'site-A' is not the site 'site-a'" in err
    assert not (state / LEDGER_FILE).exists()  # nothing written under the wrong name
    rc, _, err = cli(capsys, "approve", str(tmp_path / "elsewhere"), str(app),
                     "--node-config", str(node), "--reason", "x")
    assert rc == 1 and f"keeps the site's state in {state}" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("site = \n")
    rc, _, err = cli(capsys, "approve", str(state), str(app), "--node-config", str(broken),
                     "--reason", "x")
    assert rc == 1 and f"{broken}: not TOML" in err
    rc, out, _ = cli(capsys, "approve", str(state), str(app), "--node-config", str(node),
                     "--reason", "reviewed")
    assert rc == 0 and "for site site-a" in out
    assert [e["site"] for e in read_entries(state / LEDGER_FILE)] == ["site-a"]


def test_a_node_whose_approvals_name_another_site_refuses_by_name(
        tiny_model, site_files, tmp_path, capsys, monkeypatch):
    from flwr.app import Context, RecordDict

    app, state = write_app(tmp_path / "app"), tmp_path / "state"
    assert cli(capsys, "approve", str(state), str(app), "--site", "site-A",  # a typo
               "--reason", "reviewed")[0] == 0
    node = {"site": "site-a", "data-file": str(site_files["sites"][0]),
            "state-dir": str(state), "epsilon-budget": 8.0, "delta": 1e-5,
            "text-column": "note", "label-column": "diagnosis"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config={})
    monkeypatch.setenv(APPROVED_APP_ENV, bundle_sha256(app))
    monkeypatch.setenv(APPROVALS_LEDGER_ENV, str(state / LEDGER_FILE))
    with pytest.raises(AppNotApproved, match="belong to site 'site-A', but this node config "
                                             "names site 'site-a'"):
        site_from_context(tiny_config(tiny_model, site_files), context)


def test_approvals_spend_nothing_and_budgets_skip_them(tmp_path):
    state = tmp_path / "state"
    ledger = Ledger(state / LEDGER_FILE, load_or_create_site_key(state))
    app = "cd" * 32
    ledger.append({"kind": "approval", "site": "site-a", "app_sha256": app, "approved": True,
                   "by": "dpo", "reason": "reviewed", "software": {}})
    ledger.append(release(ledger.entries(), app))
    assert ledger.datasets() == ["main"] and ledger.spent_epsilon("main") == 5.0
    assert ledger.history("main") == [(1.0, 0.1, 10)]
    with pytest.raises(LedgerEntryError, match="app_sha256"):
        ledger.append({"kind": "approval", "site": "site-a", "app_sha256": "short",
                       "approved": True, "by": "dpo", "reason": "x", "software": {}})
    report = verify_path(state / LEDGER_FILE)
    assert report.ok and [e.kind for e in report.sites[0].entries] == ["train"]
    assert report.sites[0].entries[0].app_sha256 == app


def test_verify_reports_releases_under_an_app_not_approved_at_the_time(tmp_path):
    state = tmp_path / "state"
    ledger = Ledger(state / LEDGER_FILE, load_or_create_site_key(state))
    good, other = "11" * 32, "22" * 32

    def approval(app: str, approved: bool = True) -> dict:
        return {"kind": "approval", "site": "site-a", "app_sha256": app,
                "approved": approved, "by": "dpo", "reason": "r", "software": {}}

    ledger.append(release(ledger.entries(), None))      # seq 0: before approvals: fine
    ledger.append(approval(good))                       # seq 1
    ledger.append(release(ledger.entries(), good))      # seq 2: approved
    ledger.append(release(ledger.entries(), other))     # seq 3: never approved
    ledger.append(release(ledger.entries(), None))      # seq 4: names no app
    ledger.append(approval(good, approved=False))       # seq 5
    ledger.append(release(ledger.entries(), good))      # seq 6: revoked by then
    assert [pos for pos, _ in app_problems(ledger.entries())] == [3, 4, 6]
    report = verify_path(state / LEDGER_FILE)
    assert not report.ok
    flagged = {p.seq: p.message for p in report.problems}
    assert set(flagged) == {3, 4, 6}
    assert other in flagged[3] and "names no app" in flagged[4] and good in flagged[6]
    assert [(a.seq, a.approved) for a in report.sites[0].approvals] == [(1, True), (5, False)]


def test_a_site_that_never_approved_an_app_is_called_unapproved_by_every_reader(
        tmp_path, capsys):
    from common.privacy.report import write_report

    state = tmp_path / "state"  # require-approved-app = false: releases naming no app
    ledger = Ledger(state / LEDGER_FILE, load_or_create_site_key(state))
    ledger.append(release(ledger.entries(), None))
    ledger.append(release(ledger.entries(), None))
    words = "UNAPPROVED: its ledger holds no app approval"
    assert verify_path(state / LEDGER_FILE).sites[0].app_approval.startswith(words)
    rc, out, _ = cli(capsys, "status", str(state))
    assert f"apps: {words}" in out and "require-approved-app = false" in out
    assert main(["audit", "verify", str(state / LEDGER_FILE)]) in (0, 1)
    assert f"apps: {words}" in capsys.readouterr().out
    data = write_report(state / LEDGER_FILE, tmp_path / "r.html", tmp_path / "r.json")
    assert data["sites"][0]["app_approval"].startswith(words)
    assert f'<p class="warn">Apps: {words}' in (tmp_path / "r.html").read_text()

    approved = tmp_path / "approved"  # the same, once an app is approved: said so
    ledger = Ledger(approved / LEDGER_FILE, load_or_create_site_key(approved))
    ledger.append({"kind": "approval", "site": "site-a", "app_sha256": "11" * 32,
                   "approved": True, "by": "dpo", "reason": "r", "software": {}})
    ledger.append(release(ledger.entries(), "11" * 32))
    assert verify_path(approved / LEDGER_FILE).sites[0].app_approval == (
        "approved apps only: 1 approval entry in its ledger, every release checked "
        "against them")
    refused = tmp_path / "refused"  # a site that only ever refused released nothing
    Ledger(refused / LEDGER_FILE, load_or_create_site_key(refused)).append(
        {**release([], None, kind="refusal"), "reason": "over budget", "epsilon": 0.0,
         "noise_multiplier": 0.0, "sample_rate": 0.0, "steps": 0})
    assert verify_path(refused / LEDGER_FILE).sites[0].app_approval == (
        "no app approved, and nothing released")


# -- the site ----------------------------------------------------------------------------
def test_a_hospital_site_without_an_approved_app_refuses_before_reading_its_data(
        tiny_model, site_files, tmp_path):
    from flwr.app import Context, RecordDict

    cfg = tiny_config(tiny_model, site_files)
    node = {"site": "site-a", "data-file": str(tmp_path / "never-read.csv"),
            "state-dir": str(tmp_path / "state"), "epsilon-budget": 8.0, "delta": 1e-5}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config={})
    with pytest.raises(AppNotApproved, match="fedcare site clientapp"):
        site_from_context(cfg, context)  # the data file does not exist: never opened
    assert not (tmp_path / "state").exists()
    assert from_node_config({**node, "require-approved-app": False}).require_approved_app \
        is False
    with pytest.raises(ValueError, match="not known"):  # only the task process names it
        from_node_config({**node, "app-sha256": "ab" * 32})


def test_the_approvals_must_be_the_sites_own_ledger(tiny_model, site_files, tmp_path,
                                                      monkeypatch):
    from flwr.app import Context, RecordDict

    cfg = tiny_config(tiny_model, site_files)
    node = {"site": "site-a", "data-file": str(site_files["sites"][0]),
            "state-dir": str(tmp_path / "state"), "epsilon-budget": 8.0, "delta": 1e-5,
            "text-column": "note", "label-column": "diagnosis"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config={})
    monkeypatch.setenv(APPROVED_APP_ENV, "ab" * 32)
    monkeypatch.setenv(APPROVALS_LEDGER_ENV, str(tmp_path / "other" / LEDGER_FILE))
    with pytest.raises(AppNotApproved, match="state-dir"):
        site_from_context(cfg, context)
    monkeypatch.setenv(APPROVALS_LEDGER_ENV, str(tmp_path / "state" / LEDGER_FILE))
    site = site_from_context(cfg, context)
    assert site.policy.app_sha256 == "ab" * 32  # what every entry it writes will name


def test_the_clientapp_reads_approvals_only_from_a_ledger_that_verifies(tmp_path, capsys):
    app, state = write_app(tmp_path / "app"), tmp_path / "state"
    digest = bundle_sha256(app)
    assert cli(capsys, "approve", str(state), str(app), "--site", "site-a",
               "--reason", "reviewed")[0] == 0
    ledger = state / LEDGER_FILE
    assert current_approvals(state)[0] == [digest]
    # a last line cut short by a crash released nothing: the approvals before it hold
    with ledger.open("ab") as handle:
        handle.write(b'{"kind": "train", "si')
    assert current_approvals(state)[0] == [digest]
    # an edited entry: nothing is approved, and the hospital is told why
    ledger.write_text(ledger.read_text().split("\n")[0].replace('"r', '"R', 1) + "\n")
    apps, why = current_approvals(state)
    assert apps == [] and "does not verify" in why
    # without its private key the site's ledger is never re-keyed (the auditor's key stays)
    ledger.unlink()
    assert cli(capsys, "approve", str(state), str(app), "--site", "site-a",
               "--reason", "reviewed")[0] == 0
    public = (state / "site_key.pub.pem").read_bytes()
    (state / "site_key.pem").unlink()
    rc, _, err = cli(capsys, "revoke", str(state), digest, "--reason", "x")
    assert rc == 1 and "restore the site's key" in err
    assert (state / "site_key.pub.pem").read_bytes() == public
    assert current_approvals(state)[0] == [digest]  # read with the public key alone


def test_the_clientapp_refuses_to_start_without_approvals(tmp_path, capsys):
    rc, _, err = cli(capsys, "clientapp", str(tmp_path / "state"))
    assert rc == 2 and "approve" in err


def test_the_task_process_imports_nothing_of_fedcare_before_the_check():
    """approved_task.py runs with `python -I` beside fedcare's own packages: if it
    imported any of them, the approved app's `client`/`common` would be shadowed."""
    task = Path(__file__).resolve().parents[1] / "client" / "approved_task.py"
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('client', 'common', 'server', 'simulations')))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(task)], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []
