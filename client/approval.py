"""A hospital runs only the app it approved: `fedcare site approve|revoke|approvals|clientapp`.

    fedcare site approve STATE_DIR APP_DIR_OR_FAB --reason TEXT [--by NAME] [--site NAME]
                         [--node-config FILE]
    fedcare site revoke STATE_DIR HASH_OR_APP --reason TEXT [--by NAME]
    fedcare site approvals STATE_DIR
    fedcare site clientapp STATE_DIR [--runtime-api 127.0.0.1:9094]
                                     [--superexec-auth-secret-file F]

approve hashes an app as Flower does (a source folder is built into the FAB `flwr run`
would submit from it) and appends a signed approval entry to the site's ledger
(common/privacy/approvals.py); revoke appends its withdrawal. clientapp is the
hospital's ClientApp process beside a SuperNode started with `--isolation process`:
it takes each task from the SuperNode's Runtime API and hands it to a fresh
interpreter (client/approved_task.py) together with the apps approved in the ledger
at that moment, read only from a ledger whose chain and signatures verify.
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import ConfigError, from_node_config
from common.privacy.approvals import (
    BundleError, approval_fields, approved_apps, bundle_sha256, check_hash,
)
from common.privacy.entries import LedgerError, software_versions
from common.privacy.ledger import LEDGER_FILE, Ledger, integrity_problems, parse_ledger_bytes
from common.privacy.signing import (
    PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, KeyFileError, load_or_create_site_key, load_public_key,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

TASK = Path(__file__).with_name("approved_task.py")
RUNTIME_API = "127.0.0.1:9094"  # flower-supernode's default --port, on loopback


def register(site_commands: argparse._SubParsersAction) -> None:
    approve = site_commands.add_parser(
        "approve", help="approve an app (a source folder or a .fab) by its hash: signed, "
                        "in the site's ledger")
    approve.add_argument("state_dir", type=Path, help="the site's state folder")
    approve.add_argument("app", type=Path, help="the app's source folder (as given to "
                                                "`flwr run`) or a .fab file")
    _who(approve, "why this app may run on the site's records (e.g. the release reviewed)")
    approve.add_argument("--site", help="the site's name; only for a ledger with no "
                                        "entries yet (otherwise it is the ledger's)")
    approve.add_argument("--node-config", type=Path, metavar="FILE",
                         help="the SuperNode's node config (TOML): the site is its `site`, "
                              "and STATE_DIR must be its `state-dir`; a --site or a ledger "
                              "naming another site is refused")
    approve.set_defaults(func=cmd_approve)
    revoke = site_commands.add_parser("revoke", help="withdraw an approval (signed)")
    revoke.add_argument("state_dir", type=Path, help="the site's state folder")
    revoke.add_argument("app", help="the app's hash, source folder or .fab file")
    _who(revoke, "why the approval is withdrawn")
    revoke.set_defaults(func=cmd_revoke)
    listing = site_commands.add_parser("approvals", help="the apps approved, and every "
                                                         "approval and revocation")
    listing.add_argument("state_dir", type=Path, help="the site's state folder")
    listing.set_defaults(func=cmd_approvals)
    run = site_commands.add_parser(
        "clientapp", help="run approved apps only, beside `flower-supernode --isolation "
                          "process`")
    run.add_argument("state_dir", type=Path, help="the site's state folder (its ledger "
                                                  "holds the approvals)")
    run.add_argument("--runtime-api", default=RUNTIME_API,
                     help=f"the SuperNode's Runtime API, its --port (default {RUNTIME_API})")
    run.add_argument("--superexec-auth-secret-file", type=Path, default=None,
                     help="the secret the SuperNode was given with the same option: only "
                          "a process holding it can take the site's tasks")
    run.add_argument("--poll", type=_seconds, default=1.0, help="seconds between polls")
    run.set_defaults(func=cmd_clientapp)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text}: give 0.1 to 60 seconds")
    return value


def _who(parser: argparse.ArgumentParser, reason: str) -> None:
    parser.add_argument("--reason", required=True, help=reason)
    parser.add_argument("--by", default=None,
                        help="who decides (default: this account's user name)")


def _open_ledger(state: Path) -> Ledger:
    """The site's ledger, opened for appending (which verifies its chain and signatures);
    a site key is created only for a site with no ledger yet."""
    state = Path(state)
    if (state / LEDGER_FILE).exists() and not (state / PRIVATE_KEY_FILE).is_file():
        raise LedgerError(f"{state} holds a ledger but no {PRIVATE_KEY_FILE}: restore the "
                          "site's key from its backup; a new key could not sign this ledger.")
    return Ledger(state / LEDGER_FILE, load_or_create_site_key(state))


def _append(args, app: str, approved: bool, site: str | None = None) -> int:
    ledger = _open_ledger(args.state_dir)
    names = {e["site"] for e in ledger.entries()}
    if site and names and site not in names:
        raise LedgerError(f"{ledger.path} is site {sorted(names)[0]!r}'s ledger, not {site!r}.")
    site = site or (sorted(names)[0] if names else None)
    if site is None:
        raise LedgerError(f"{ledger.path} holds no entries yet: name the site with --site "
                          "(its node config's `site`).")
    in_force = approved_apps(ledger.entries())
    if approved and app in in_force:
        print(f"app {app} is already approved (seq {in_force[app]['seq']}); nothing written.")
        return 0
    if not approved and app not in in_force:
        raise LedgerError(f"app {app} is not approved at {site}, so there is nothing to "
                          "revoke (`fedcare site approvals` lists what is).")
    entry = ledger.append(approval_fields(site, app, approved, args.by or getpass.getuser(),
                                          args.reason, software_versions()))
    print(f"{'approved' if approved else 'revoked'} app {app} for site {site}: ledger "
          f"{ledger.path}, seq {entry['seq']}, by {entry['by']}")
    return 0


def _site_named(args) -> str | None:
    """The site an approval is for: --site, checked against the node config's `site`
    and `state-dir` when --node-config is given (an approval under another name would
    sit in a ledger the site's node never accepts as its own)."""
    if args.node_config is None:
        return args.site
    try:
        with open(args.node_config, "rb") as handle:
            node = from_node_config(tomllib.load(handle))
    except OSError as exc:
        raise ConfigError(f"{args.node_config}: cannot read the node config ({exc.strerror})") \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{args.node_config}: not TOML ({exc})") from None
    if not node.site:
        raise ConfigError(f"{args.node_config} names no `site`; add site = \"NAME\"")
    if args.site and args.site != node.site:
        raise ConfigError(f"--site {args.site!r} is not the site {node.site!r} that "
                          f"{args.node_config} names; give its name, or leave --site out")
    if node.state_dir and Path(node.state_dir).resolve() != args.state_dir.resolve():
        raise ConfigError(f"{args.node_config} keeps the site's state in {node.state_dir}, "
                          f"not {args.state_dir}: approve in the node config's state-dir")
    return node.site


def cmd_approve(args) -> int:
    try:
        app = bundle_sha256(args.app)
        if args.app.is_dir():
            print(f"built {args.app} as `flwr run` would submit it")
        return _append(args, app, True, _site_named(args))
    except (BundleError, LedgerError, KeyFileError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_revoke(args) -> int:
    try:
        path = Path(args.app)
        app = bundle_sha256(path) if path.exists() else check_hash(args.app)
        return _append(args, app, False)
    except (BundleError, LedgerError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_approvals(args, out=None) -> int:
    from common.privacy.verify import VerifyInputError, verify_path

    out = out or sys.stdout
    path = Path(args.state_dir) / LEDGER_FILE
    if not path.is_file():
        print(f"{args.state_dir} has no {LEDGER_FILE}: no app is approved "
              "(`fedcare site approve`).", file=sys.stderr)
        return 2
    try:
        site = verify_path(path).sites[0]
    except (VerifyInputError, KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    current: dict[str, object] = {}
    for a in site.approvals:
        if a.approved:
            current[a.app_sha256] = a
        else:
            current.pop(a.app_sha256, None)
    print(f"site {site.site}: {len(current)} app(s) approved now"
          + ("" if not site.problems else ", but the ledger does not verify, so `fedcare site "
             "clientapp` honours none of them"), file=out)
    for app, a in current.items():
        print(f"  {app}  since seq {a.seq} ({a.time}), by {a.by}: {a.reason}", file=out)
    print("history:", file=out)
    for a in site.approvals:
        print(f"  seq {a.seq}  {a.time}  {'approve' if a.approved else 'revoke '}  "
              f"{a.app_sha256}  by {a.by}: {a.reason}", file=out)
    if not site.problems:
        print("the ledger verifies", file=out)
        return 0
    for p in site.problems:
        print(f"PROBLEM{'' if p.seq is None else f' [seq {p.seq}]'} {p.message}", file=out)
    return 1


def current_approvals(state: Path) -> tuple[list[str], str]:
    """The approved app hashes, and a sentence on where they come from; none at all
    when the ledger cannot be read or does not verify against the site's public key
    (the hospital is told why). Read-only, under a shared lock, so never a line the site
    is writing; a last line cut short by a crash released nothing and is left for the
    site to set aside when it next opens its ledger."""
    path = Path(state) / LEDGER_FILE
    try:
        key = load_public_key(Path(state) / PUBLIC_KEY_FILE)
        with open(path, "rb") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            data = handle.read()
    except (KeyFileError, OSError) as exc:
        return [], f"no app is approved: the ledger cannot be read ({exc})"
    good, bad = parse_ledger_bytes(data[:data.rfind(b"\n") + 1])
    entries = [entry for _, entry in good]
    if bad or integrity_problems(entries, key):
        return [], (f"no app is approved: {path} does not verify against "
                    f"{PUBLIC_KEY_FILE} (`fedcare audit verify {path}` says why)")
    apps = sorted(approved_apps(entries))
    return apps, f"{len(apps)} approved app(s) in {path}"


def cmd_clientapp(args) -> int:
    """Poll the SuperNode's Runtime API; one checked task process per task."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.runtime import RuntimeHttpClient

    state = Path(args.state_dir)
    if not (state / LEDGER_FILE).is_file():
        print(f"error: {state} has no {LEDGER_FILE}, so no app is approved: approve the "
              "release you reviewed first (`fedcare site approve`).", file=sys.stderr)
        return 2
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if args.superexec_auth_secret_file is not None:
        try:
            secret = load_superexec_auth_secret(str(args.superexec_auth_secret_file))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    _, where = current_approvals(state)
    say = lambda line: print(f"fedcare site clientapp: {line}", flush=True)  # noqa: E731
    say(f"{where}; taking tasks from the SuperNode at {args.runtime_api}")
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api, insecure=True, root_certificates=None,
        # no retries inside Flower (whose invoker stops the process on a 401): this loop
        # waits for a SuperNode that is not up yet, and stops on a refused secret
        interceptors=interceptors, retry_invoker=RetryInvoker(lambda: iter(()), (), 1, None))
    running: list[subprocess.Popen] = []
    waiting = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the tasks too (finally)
    try:
        while True:
            running = [p for p in running if p.poll() is None]
            try:
                res = client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP]))
                waiting = False
            except httpx.HTTPStatusError as exc:
                code = exc.response.status_code
                hint = ("give it the same --superexec-auth-secret-file as the SuperNode"
                        if code == 401 else exc.response.text[:300])
                print(f"error: the SuperNode at {args.runtime_api} refused this process "
                      f"(HTTP {code}): {hint}", file=sys.stderr)
                return 2
            except httpx.TransportError as exc:  # the SuperNode is not up (yet, or again)
                if not waiting:
                    say(f"waiting for the SuperNode's Runtime API at {args.runtime_api} "
                        f"({type(exc).__name__})")
                waiting = True
                time.sleep(max(args.poll, 1.0))
                continue
            if res.HasField("task") and res.token:
                apps, now = current_approvals(state)  # approvals as they are now
                if now != where:
                    say(now)
                    where = now
                job = {"token": res.token, "approved": apps, "runtime_api": args.runtime_api,
                       "ledger": str((state / LEDGER_FILE).resolve())}
                try:
                    proc = subprocess.Popen([sys.executable, "-I", str(TASK)],
                                            stdin=subprocess.PIPE, text=True)
                    proc.stdin.write(json.dumps(job))
                    proc.stdin.close()
                    running.append(proc)
                except OSError as exc:  # this task is lost (the SuperNode times it out)
                    say(f"task {res.task.task_id} of run {res.task.run_id} could not start "
                        f"its process: {exc}")
                continue
            time.sleep(args.poll)
    except KeyboardInterrupt:
        say("stopped")
        return 0
    finally:
        for proc in running:
            proc.terminate()
        client.close()
