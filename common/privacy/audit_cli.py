"""`fedcare audit verify|report`: the auditor's commands (and `empirical`, which runs a
simulation: simulations/cli.py, registered in pyproject.toml).

    fedcare audit verify RUN_DIR_OR_LEDGER [--trusted-keys DIR] [--tolerance 0.01]
    fedcare audit report RUN_DIR_OR_LEDGER [--output FILE.html]

verify exits 0 when clean, 1 when it finds problems, 2 on unusable input; report
exits 0 once written (2 on unusable input). Also runnable as
`python -m common.privacy.audit_cli verify PATH`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import run_command
from common.privacy.group import notes_count
from common.privacy.report import dataset_summaries, format_epsilon, write_report
from common.privacy.signing import KeyFileError
from common.privacy.verify import VerifyInputError, verify_path


def register(subparsers: argparse._SubParsersAction,
             more: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    """Add the `audit` command to a CLI's subparsers; each leaf sets func(args) -> int.
    Each of `more`, called with the leaves' subparsers, adds further leaves."""
    audit = subparsers.add_parser("audit", help="verify privacy ledgers and report on them")
    audit.set_defaults(func=lambda args: _usage(audit))
    commands = audit.add_subparsers(dest="audit_command")

    verify = commands.add_parser("verify", help="check signatures, chain and every ε claim")
    verify.add_argument("path", type=Path, help="a ledger .jsonl or a run directory")
    verify.add_argument("--trusted-keys", type=Path, default=None,
                        help="folder of <site>.pub.pem keys to pin each site's signature to")
    verify.add_argument("--tolerance", type=_tolerance, default=1e-2,
                        help="relative slack below the re-derived ε (default 0.01)")
    verify.set_defaults(func=run_verify)

    report = commands.add_parser("report", help="write a self-contained HTML + JSON report")
    report.add_argument("path", type=Path, help="a ledger .jsonl or a run directory")
    report.add_argument("--output", type=Path, default=None,
                        help="HTML file (default: PATH/audit_report.html; JSON beside it)")
    report.add_argument("--trusted-keys", type=Path, default=None,
                        help="folder of <site>.pub.pem keys to pin each site's signature to")
    report.add_argument("--notes-per-patient", type=notes_count, default=None, metavar="N",
                        help="the most notes one patient has at a site (as the hospital "
                             "states it), for the patient reading of a record-level ε; "
                             "default: a table for 2 to 50 notes")
    report.set_defaults(func=run_report)
    for add in more:
        add(commands)
    commands.metavar = "{" + ",".join(commands.choices) + "}"
    return audit


def run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_path(args.path, args.trusted_keys, args.tolerance)
    except (VerifyInputError, KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in report.problems:
        where = "" if problem.seq is None else f" seq {problem.seq}"
        print(f"PROBLEM [{problem.site}{where}] {problem.message}")
    for site in report.sites:
        spent = ", ".join(f"ε={format_epsilon(d['spent'])} per {d['unit']}"
                          + (f" (k={d['max_records_per_patient']})" if d["unit"] == "patient"
                             else "") + f" on dataset {d['dataset']}"
                          for d in dataset_summaries(site.entries)) or "no ε"
        unpinned = ("; KEYS UNPINNED: signatures checked only against the key sent with the "
                    "ledger, pass --trusted-keys to pin them") if not site.keys_pinned else ""
        print(f"{site.site}: {site.status}, {len(site.entries)} entries, "
              f"{len(site.problems)} problem(s), {spent}{unpinned}; apps: {site.app_approval}")
    return 0 if report.ok else 1


def run_report(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.output is not None:
        out_html = Path(args.output)
    elif path.is_dir():
        out_html = path / "audit_report.html"
    else:
        out_html = path.with_name(path.stem + ".audit_report.html")
    out_json = out_html.with_suffix(".json")
    try:
        data = write_report(path, out_html, out_json, args.trusted_keys,
                            notes_per_patient=args.notes_per_patient)
    except (VerifyInputError, KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out_html)
    print(out_json)
    if not data["ok"]:
        print("The report lists problems; `fedcare audit verify` exits 1 on them.")
    return 0


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--tolerance must be a number in [0, 1) (got {text})")
    return value


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcare")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)


if __name__ == "__main__":  # `python -m common.privacy.audit_cli verify ...`: the auditor's
    sys.exit(main())        # tools run without the rest of fedcare's command line
