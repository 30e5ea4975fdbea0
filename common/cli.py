"""fedcare: federated, differentially private LoRA fine-tuning for clinical text.

The `fedcare` command. Each audience's commands live with that audience's code and
register themselves in the package metadata (pyproject.toml, entry points
`fedcare.commands`), so this entry point names none of them and `common` imports
neither `client` nor `server`:

    simulate          the researcher's      simulations/cli.py
    site              the hospital's        client/site_cli.py (approvals: client/approval.py)
    predict           the clinician's       common/assist/cli.py
    audit             the auditor's         common/privacy/audit_cli.py
                                            (+ `audit empirical`: simulations/cli.py)
    certs             the operator's        server/certs_cli.py

Each is thin: it parses arguments and calls the functions the apps call. Bad input (a
FedcareError: a config key, a data file's line, a ledger line) is printed as one line,
``error: <message>``, with exit status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from common.errors import run_command

COMMANDS = "fedcare.commands"  # name -> register(subparsers)
AUDIT_COMMANDS = "fedcare.audit_commands"  # more `fedcare audit` leaves: register(commands)
ORDER = ("simulate", "site", "predict", "audit", "certs")  # as `fedcare --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcare", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    found = {ep.name: ep for ep in entry_points(group=COMMANDS)}
    if not found:
        raise SystemExit("fedcare's commands are not registered: install the package "
                         "(`make install`, or `pip install -e .` in its folder)")
    more = [ep.load() for ep in sorted(entry_points(group=AUDIT_COMMANDS),
                                       key=lambda ep: ep.name)]
    for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        register = found[name].load()
        register(sub, more=more) if name == "audit" else register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
