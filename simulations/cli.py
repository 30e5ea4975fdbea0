"""The researcher's commands: `fedcare simulate` and `fedcare audit empirical` (which
runs a simulation with canaries). Registered for the `fedcare` command (common/cli.py)
in pyproject.toml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from common.config import ConfigError, check_simulation, load_yaml
from common.errors import RunError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects section.key=value (got {pair!r})")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError, RecursionError):
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a YAML value; quote "
                              "it, e.g. --set 'data.labels=[a, b]'") from None
    return out


def cmd_simulate(args) -> int:
    from simulations.run import resume, simulate

    try:
        if args.resume:
            if args.set or args.run_dir or args.config != str(DEFAULT_CONFIG):
                raise ConfigError("--resume goes on with the run's own config.yaml; give "
                                  "it alone, without a config, --set or --run-dir")
            run_dir = resume(Path(args.resume), verbose=args.verbose)
        else:
            cfg = check_simulation(load_yaml(args.config, _overrides(args.set)))
            run_dir = simulate(cfg, Path(args.run_dir) if args.run_dir else None,
                               verbose=args.verbose)
    except RuntimeError as err:  # the run directory is taken, or the run failed (it says why)
        raise RunError(str(err)) from None
    print(f"summary: {run_dir / 'summary.json'}")
    return 0


def cmd_audit_empirical(args) -> int:
    """One audit (quick), or with --full three audits and both controls. Exit 1 when an
    audit's bound exceeds its claim, or when a control is not caught (the audit would
    then have no power to catch that bug)."""
    from simulations.audit import describe, run, sweep

    cfg = check_simulation(load_yaml(args.config, _overrides(args.set)))
    base = Path(args.run_dir) if args.run_dir else None
    try:
        if args.full:
            results, ok = sweep(cfg, args.canaries, args.sites, base, verbose=args.verbose,
                                notes=args.notes)
        else:
            results = [run(cfg, args.canaries, args.sites, args.break_ or "", base,
                           verbose=args.verbose, notes=args.notes)]
            ok = results[0]["verdict"] == "passed"
    except RuntimeError as err:  # the run directory is taken, or the run failed
        raise RunError(str(err)) from None
    if args.full:
        bad = [Path(r["run_dir"]).name for r in results
               if (r["verdict"] == "failed") != bool(r["control"])]
        print("full audit PASSED: every audit below its claim, every control caught" if ok
              else f"full audit FAILED: {', '.join(bad)} (an audit above its claim, or a "
                   "control the audit did not catch)")
        print(f"results: {Path(results[0]['run_dir']).parent}/empirical_summary.json")
    else:
        print(describe(results[0]))
        print(f"results: {results[0]['run_dir']}/audit/ ({results[0]['seconds']:.0f} s)")
    return 0 if ok else 1


def register_empirical(commands: argparse._SubParsersAction) -> None:
    """`fedcare audit empirical`, a leaf of the auditor's `audit`."""
    emp = commands.add_parser(
        "empirical", help="measure a lower bound on ε from one run with canaries; "
                          "exit 1 if it exceeds the claimed ε")
    _run_arguments(emp, "write the run (--full: the runs, in subfolders) here instead of a "
                        "new timestamped folder")
    emp.add_argument("--canaries", type=int, default=1000,
                     help="canaries of each kind, input and gradient (default 1000)")
    emp.add_argument("--sites", type=int, default=1,
                     help="spread the canaries over the first N simulated sites (default 1)")
    emp.add_argument("--notes", type=int, default=None,
                     help="notes per canary: >1 makes each canary a patient (default 8 "
                          "where site.privacy_unit is patient, else 1)")
    mode = emp.add_mutually_exclusive_group()
    mode.add_argument("--break", dest="break_", choices=("noise", "clipping", "unit"),
                      default=None,
                      help="a control, which claims ε=1 and must fail: the mechanism broken "
                           "(noise, clipping), or the sites protecting records while the "
                           "canaries are patients (unit)")
    mode.add_argument("--full", action="store_true",
                      help="three audits with fresh canaries, then the controls, which "
                           "must fail (noise, clipping, and unit where the canaries are "
                           "patients)")
    emp.set_defaults(func=cmd_audit_empirical)


def _run_arguments(parser: argparse.ArgumentParser, run_dir_help: str) -> None:
    """What every command that runs a simulation takes: config, --set, --run-dir, --verbose."""
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: the shipped default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set privacy.target_epsilon=4")
    parser.add_argument("--run-dir", help=run_dir_help)
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def register(commands: argparse._SubParsersAction) -> None:
    """`fedcare simulate`."""
    sim = commands.add_parser("simulate", help="simulate N hospitals on this machine")
    _run_arguments(sim, "write the run here instead of a new timestamped folder")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="go on with a stopped run after its last checkpointed round")
    sim.set_defaults(func=cmd_simulate)
