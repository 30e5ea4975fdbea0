"""`fedcare site`: a hospital's own state, its signing key, ledger and approved apps.

    fedcare site init STATE_DIR
    fedcare site status STATE_DIR [--notes-per-patient N | --data FILE --patient-column C]
    fedcare site new-dataset STATE_DIR --dataset NAME --reason TEXT [--budget EPS] [--delta D]

status prints, per dataset, the budget, ε spent and left, δ, the unit of privacy
(record, or patient with its bound k; a record-level ε is also read for a patient by
group privacy, for the site's largest patient when it is given), the data versions and
every entry, and whether the chain and signatures verify (exit 0 verified, 1 not, 2
no ledger). new-dataset appends a signed "dataset" entry: the hospital declares that
NAME is new data with a fresh budget, and says why. Both read what the auditor reads:
verification is `common.privacy.verify`'s, not a second implementation. init creates
(or shows) the site's ledger signing key. approve, revoke, approvals and clientapp:
client/approval.py.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

from common.data import file_rows
from common.errors import DataError, run_command
from common.names import check_name
from common.privacy.group import notes_count, patient_reading, reading_text
from common.privacy.entries import LedgerError
from common.privacy.ledger import LEDGER_FILE, Ledger
from common.privacy.report import dataset_summaries, format_epsilon, unit_text
from common.privacy.signing import (
    PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, KeyFileError, load_or_create_site_key,
    public_key_fingerprint,
)
from common.privacy.verify import VerifyInputError, verify_path

NO_DATA = "none"  # a dataset start's data_fingerprint: it releases no data version


def register(commands: argparse._SubParsersAction) -> None:
    """`fedcare site` and its leaves: init, status, new-dataset, and the approvals'
    (client/approval.py)."""
    site = commands.add_parser("site", help="a hospital's own state: its signing key, "
                                            "ledger and approved apps")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    init = site_commands.add_parser("init", help="create (or show) the site's ledger "
                                                 "signing key")
    init.add_argument("state_dir", help="the site's state folder (its node config's "
                                        "state-dir)")
    init.set_defaults(func=cmd_init)
    status = site_commands.add_parser(
        "status", help="the site's budget per dataset, its entries, and whether they verify")
    status.add_argument("state_dir", type=Path, help="the site's state folder")
    status.add_argument("--notes-per-patient", type=notes_count, default=None, metavar="N",
                        help="the site's largest number of notes of one patient, for the "
                             "patient reading of a record-level ε")
    status.add_argument("--data", type=Path, default=None, metavar="FILE",
                        help="or the site's data file, to count them (with --patient-column)")
    status.add_argument("--patient-column", default="", metavar="COLUMN",
                        help="the column of --data that names each record's patient")
    status.set_defaults(func=cmd_status)
    new = site_commands.add_parser(
        "new-dataset", help="declare a new dataset with a fresh budget (signed, with a reason)")
    new.add_argument("state_dir", type=Path, help="the site's state folder")
    new.add_argument("--dataset", required=True, type=dataset_name,
                     help="the new dataset's name: letters, digits, '.', '_', '-' (max 64)")
    new.add_argument("--reason", required=True,
                     help="why this is a new dataset rather than a new version of one")
    new.add_argument("--budget", type=float, default=None,
                     help="its ε budget (default: the budget of the ledger's latest entry)")
    new.add_argument("--delta", type=float, default=None,
                     help="its δ (default: the δ of the ledger's latest entry)")
    new.set_defaults(func=cmd_new_dataset)
    from client.approval import register as register_approval
    register_approval(site_commands)


def dataset_name(text: str) -> str:
    try:
        return check_name("--dataset", text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_init(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    try:
        key = load_or_create_site_key(state)
    except KeyFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"site key: {state / PRIVATE_KEY_FILE} (private, 0600, never leaves this machine)")
    print(f"public key for the auditor: {state / PUBLIC_KEY_FILE}")
    print(f"fingerprint: {public_key_fingerprint(key.public_key())}")
    return 0


def cmd_status(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    ledger = Path(args.state_dir) / LEDGER_FILE
    if not ledger.is_file():
        print(f"{args.state_dir} has no {LEDGER_FILE}: this site has released nothing yet, "
              "or the folder is not its state folder (its node config's state-dir).",
              file=sys.stderr)
        return 2
    try:
        report = verify_path(ledger)
    except (VerifyInputError, KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        notes = _largest_patient(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    site = report.sites[0]
    say = lambda line="": print(line, file=out)  # noqa: E731
    say(f"site {site.site}: ledger {ledger}, {len(site.entries)} entries")
    say(f"apps: {site.app_approval}")
    for d in dataset_summaries(site.entries):
        say()
        say(f"dataset {d['dataset']}: budget ε={format_epsilon(d['budget'])}, spent "
            f"ε={format_epsilon(d['spent'])}, left ε={format_epsilon(d['left'])}, "
            f"δ={'—' if d['delta'] is None else format(d['delta'], 'g')}")
        say(f"  unit: {unit_text(d)}")
        if d["unit"] == "record" and d["spent"] and d["delta"]:
            say("  read for a patient (group privacy, docs/accounting.md): " + reading_text(
                patient_reading(d["spent"], d["delta"], notes), bool(notes)))
        started = d["started"]
        say(f"  started at seq {started['seq']}: {started['reason']}" if started
            else "  started with its first release")
        if not d["versions"]:
            say("  no data released yet")
        for v in d["versions"]:
            say(f"  data version {v['version']}: {v['fingerprint']} "
                f"(seq {v['first_seq']}-{v['last_seq']})")
        rows = [e for e in site.entries if (e.dataset or e.data_fingerprint) == d["dataset"]]
        say("  seq  time                           run                  round  kind        "
            "σ       q        steps  ε after  note")
        for e in rows:
            note = e.reason or (f"update withheld: {e.withheld}" if e.withheld else "")
            if e.released_value is not None:
                note = f"released size {e.released_value:g}"
            say(f"  {_cell(e.seq):>3}  {_cell(e.time):<29}  {_cell(e.run_id):<19}  "
                f"{_cell(e.round):>5}  {e.kind:<10}  {_num(e.noise_multiplier):<6}  "
                f"{_num(e.sample_rate):<7}  {_cell(e.steps):>5}  "
                f"{format_epsilon(e.epsilon_claimed):>7}  {note}")
        if any(e.kind == "train" and e.sample_rate == 1.0 for e in rows):
            say("  note: a train entry has sample rate 1.0: the site's data is not larger than "
                "its batch, so there is no amplification by sampling and each step costs the "
                "full Gaussian mechanism's ε.")
    say()
    for p in site.problems:
        say(f"PROBLEM{'' if p.seq is None else f' [seq {p.seq}]'} {p.message}")
    say(f"the ledger verifies: chain intact, every entry signed by the key in {PUBLIC_KEY_FILE}"
        if report.ok else
        f"the ledger does NOT verify ({len(site.problems)} problem(s)); keep it for the "
        f"auditor (`fedcare audit verify {ledger}`)")
    return 0 if report.ok else 1


def cmd_new_dataset(args: argparse.Namespace, out=None) -> int:
    state = Path(args.state_dir)
    path = state / LEDGER_FILE
    if not path.is_file() or not (state / PRIVATE_KEY_FILE).is_file():
        missing = LEDGER_FILE if not path.is_file() else PRIVATE_KEY_FILE
        print(f"{state} has no {missing}: a new dataset is declared in an existing site's "
              "ledger, signed with its key. A site's first dataset needs no declaration: it "
              "starts with the first release.", file=sys.stderr)
        return 2
    try:
        ledger = Ledger(path, load_or_create_site_key(state))
        latest = (ledger.releases() or [None])[-1]
        if latest is None:
            raise LedgerError(f"{path} holds no entries; a site's first dataset starts with "
                              "its first release, no declaration needed.")
        entry = ledger.append({
            "kind": "dataset", "site": latest["site"], "run_id": "fedcare-site-cli",
            "round": 0, "dataset": args.dataset, "data_fingerprint": NO_DATA,
            "mechanism": {"name": "none"}, "noise_multiplier": 0.0, "sample_rate": 0.0,
            "steps": 0, "max_grad_norm": 0.0,
            "delta": latest["delta"] if args.delta is None else args.delta,
            "accountant": latest["accountant"], "epsilon": 0.0,
            "epsilon_budget": latest["epsilon_budget"] if args.budget is None else args.budget,
            "update_sha256": None, "secure_aggregation": False,
            "software": {"fedcare": _version()}, "reason": args.reason})
    except (LedgerError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"started dataset {args.dataset} at seq {entry['seq']} of {path}: a fresh budget "
          f"ε={entry['epsilon_budget']:g} at δ={entry['delta']:g}; releases that name dataset "
          f"{args.dataset} spend from it.", file=out or sys.stdout)
    return 0


def _largest_patient(args: argparse.Namespace) -> int | None:
    """The most notes one patient has at the site: given, or counted in --data."""
    if args.data is None:
        return args.notes_per_patient
    if not args.patient_column:
        raise DataError("--data needs --patient-column: the column naming each record's "
                        "patient", path=args.data)
    counts: Counter = Counter()
    for line, row, _ in file_rows(args.data):
        if args.patient_column not in row:
            raise DataError(f"missing column {args.patient_column!r}", path=args.data,
                            line=line)
        counts[str(row[args.patient_column])] += 1
    return max(counts.values())


def _cell(value) -> str:
    return "—" if value is None else str(value)


def _num(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def _version() -> str:
    try:
        return metadata.version("fedcare")
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    """`fedcare site ...` alone: `python -m client.site_cli status STATE_DIR`."""
    parser = argparse.ArgumentParser(prog="fedcare")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["site", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
