"""Which app a hospital approved to run on its records: entries of its own ledger.

A hospital approves an app bundle (a Flower FAB) by its SHA-256, the hash Flower
itself computes for the FAB a run carries, with `fedcare site approve`; it revokes one
the same way. Each is a signed "approval" entry in the site's ledger, chained with its
releases, so an auditor sees what code every release was made under. The hospital's
ClientApp process (`fedcare site clientapp`, client/approval.py) runs a run's app only
when its hash is approved at that moment; every entry the app then writes names it in
`app_sha256`.

An approval entry releases nothing and spends nothing: it holds `kind`, `site`,
`app_sha256`, `approved` (true: approve, false: revoke), `by`, `reason`, `software`
and `time`. Readers of budgets skip it (`releases`).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

from common.errors import FedcareError

APPROVAL = "approval"  # the ledger kind
APP_FIELD = "app_sha256"  # in an approval, and in every entry made under an approved app
# How the hospital's task process (client/approved_task.py, which imports nothing of
# fedcare) tells the app it runs which approved app it is and whose approvals said so.
APPROVED_APP_ENV = "FEDCARE_APPROVED_APP"
APPROVALS_LEDGER_ENV = "FEDCARE_APPROVALS_LEDGER"
REQUIRED = ("kind", "site", APP_FIELD, "approved", "by", "reason", "software")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class AppNotApproved(FedcareError):
    """A hospital's site was asked to train under an app it has not approved."""


class BundleError(FedcareError, ValueError):
    """A path to approve is neither an app folder nor a FAB file."""


def bundle_sha256(path: Path) -> str:
    """The SHA-256 Flower gives the app at `path`: a FAB file's bytes, or the FAB that
    `flwr run` builds from a source folder (the same builder, so the same bytes)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise BundleError(f"{path} has no pyproject.toml: pass the app's source folder "
                              "(the one `flwr run` is given) or a .fab file.")
        from flwr.cli.build import build_fab_from_disk
        try:
            content = build_fab_from_disk(path)
        except Exception as exc:  # noqa: BLE001 - Flower raises click and value errors
            raise BundleError(f"Flower cannot build an app bundle from {path}: {exc}") from exc
        return hashlib.sha256(content).hexdigest()
    if not path.is_file():
        raise BundleError(f"{path} does not exist: pass an app folder or a .fab file.")
    content = path.read_bytes()
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is not a FAB (a zip archive built by `flwr build`).")
    return hashlib.sha256(content).hexdigest()


def check_hash(text: str) -> str:
    """A lower-case SHA-256 hex digest, or BundleError naming the expected form."""
    text = text.strip().lower()
    if not SHA256_HEX.fullmatch(text):
        raise BundleError(f"{text!r} is not a SHA-256 hex digest (64 hex digits).")
    return text


def validate(fields: dict) -> list[str]:
    """What is wrong with an approval entry's fields (empty when nothing)."""
    wrong = [f"it lacks {name}" for name in REQUIRED if name not in fields]
    if wrong:
        return wrong
    checks = {
        "site": isinstance(fields["site"], str) and fields["site"] != "",
        APP_FIELD: isinstance(fields[APP_FIELD], str) and bool(
            SHA256_HEX.fullmatch(fields[APP_FIELD])),
        "approved": isinstance(fields["approved"], bool),
        "by": isinstance(fields["by"], str) and fields["by"].strip() != "",
        "reason": isinstance(fields["reason"], str) and fields["reason"].strip() != "",
        "software": isinstance(fields["software"], dict),
    }
    return [f"its {name} is {fields[name]!r}" for name, ok in checks.items() if not ok]


def releases(entries: Sequence[dict]) -> list[dict]:
    """The entries that account for ε: every entry but approvals."""
    return [e for e in entries if e.get("kind") != APPROVAL]


def approved_apps(entries: Sequence[dict]) -> dict[str, dict]:
    """App hash -> the approval entry in force after `entries` (revocations applied)."""
    approved: dict[str, dict] = {}
    for entry in entries:
        if entry.get("kind") == APPROVAL and not validate(entry):
            if entry["approved"]:
                approved[entry[APP_FIELD]] = entry
            else:
                approved.pop(entry[APP_FIELD], None)
    return approved


def app_problems(entries: Sequence[dict]) -> list[tuple[int, str]]:
    """(position, sentence) for every malformed approval, and, once the site approves
    apps, for every release made under an app it had not approved at that moment."""
    problems: list[tuple[int, str]] = []
    approved: dict[str, dict] = {}
    in_use = False
    for pos, entry in enumerate(entries):
        seq = entry.get("seq", pos)
        if entry.get("kind") == APPROVAL:
            wrong = validate(entry)
            if wrong:
                problems.append((pos, f"Approval seq {seq} is malformed ({'; '.join(wrong)})."))
                continue
            in_use = True
            if entry["approved"]:
                approved[entry[APP_FIELD]] = entry
            else:
                approved.pop(entry[APP_FIELD], None)
            continue
        if not in_use or entry.get("kind") in ("refusal", "dataset"):
            continue  # before the site approved apps; or nothing released
        app = entry.get(APP_FIELD)
        if app not in approved:
            which = "names no app" if app is None else f"was made under app {app}"
            problems.append((pos, f"Entry seq {seq} ({entry.get('kind')}) {which}, which the "
                                  "site had not approved at that point of its ledger."))
    return problems


def approval_fields(site: str, app: str, approved: bool, by: str, reason: str,
                    software: dict[str, Any]) -> dict:
    return {"kind": APPROVAL, "site": site, APP_FIELD: app, "approved": approved,
            "by": by, "reason": reason, "software": software}
