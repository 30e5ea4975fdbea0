"""`fedcare certs init|add-site`: the operator's certificate commands, over server/certs.py.

What each command prints next (the SuperLink, the `flwr` connection, registrations, a
site's node config, its app approval, SuperNode and ClientApp process) uses absolute
paths, so it runs from any folder; the steps are those of docs/run_across_hospitals.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from server.certs import (
    CA_CERT, CA_KEY, DEFAULT_DAYS, DEFAULT_HOSTS, DEFAULT_OUT_DIR, SERVER_CERT, CertPaths,
    CertsError, SitePaths, add_site, init_certs,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `certs` command (`certs init`, `certs add-site`) to a CLI."""
    certs = subparsers.add_parser(
        "certs",
        help="create TLS certificates and SuperNode authentication keys",
        description="Create the TLS certificates of a SuperLink and the "
        "authentication keys of its SuperNodes (see docs/deployment_notes.md).",
    )
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)

    init = certs_sub.add_parser(
        "init", help="create a CA, the SuperLink server certificate and site key pairs"
    )
    init.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, metavar="DIR",
        help=f"output directory (default: {DEFAULT_OUT_DIR})",
    )
    init.add_argument(
        "--host", action="append", dest="hosts", metavar="H",
        help="DNS name or IP address SuperNodes and the flwr CLI use to reach the "
        f"SuperLink; repeat for several (default: {' '.join(DEFAULT_HOSTS)})",
    )
    init.add_argument(
        "--site", action="append", dest="sites", default=[], metavar="NAME",
        help="create a SuperNode key pair for this site; repeat for several",
    )
    init.add_argument(
        "--days", type=int, default=DEFAULT_DAYS,
        help=f"validity of the CA and server certificate (default: {DEFAULT_DAYS})",
    )
    init.add_argument(
        "--no-loopback", dest="loopback", action="store_false",
        help="do not add localhost and 127.0.0.1 to the server certificate (only "
        "safe when the SuperLink binds a non-loopback --host)",
    )
    init.add_argument(
        "--overwrite", action="store_true", help="replace existing files instead of refusing"
    )
    init.set_defaults(func=_cmd_init)

    add = certs_sub.add_parser("add-site", help="create the key pair of one more site")
    add.add_argument("name", metavar="NAME", help="site name: letters, digits, '-', '_'")
    add.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, metavar="DIR",
        help=f"output directory (default: {DEFAULT_OUT_DIR})",
    )
    add.add_argument(
        "--overwrite", action="store_true",
        help="replace the site's key pair (key rotation: a SuperLink refuses to "
        "register a public key again once it was unregistered)",
    )
    add.set_defaults(func=_cmd_add_site)


# --- CLI handlers ----------------------------------------------------------------

SUPERLINK_PORT = 8000  # flower-superlink's default --port (Fleet, Control, Runtime)
SUPERNODE_PORT = 9094  # flower-supernode's default --port (its local Runtime API)
RUNTIME_SECRET = "runtime.secret"  # in the state folder: SuperNode <-> ClientApp process
RELEASE_PLACEHOLDER = "RELEASE-FOLDER"  # the reviewed fedcare source, the site's own copy
CONNECTION = "fedcare"  # the connection name the guide adds to $FLWR_HOME/config.toml
DATABASE_FILE = "superlink.db"  # next to the certificates' folder
NODE_CONFIG_FILE = "node-config.toml"  # next to the certificates' folder, at a site
STATE_DIR = "state"  # a site's ledger and signing key, next to the certificates' folder
DATA_FILE_PLACEHOLDER = "<absolute path of the site's notes, .csv or .jsonl>"
SUPERLINK_PLACEHOLDER = "SUPERLINK-HOST"
# the guide's example policy: a lifetime budget that a run at the default target
# (privacy.target_epsilon = 8) spends a third of
EXAMPLE_EPSILON_BUDGET = 24.0
EXAMPLE_RUN_EPSILON_CAP = 8.0
EXAMPLE_DELTA = "1e-5"  # as the node config writes it


def node_config_template(name: str, state_dir: Path) -> str:
    """A hospital's node config (TOML) with every key it must set, for `name`.

    Only `data-file` is a placeholder; the rest are the guide's example values. The
    required keys are those `common.config.NodeConfig` refuses to start without
    (site, data-file, state-dir, epsilon-budget, delta); the columns are the site's
    own and default to "text" and "label".
    """
    runs = EXAMPLE_EPSILON_BUDGET / EXAMPLE_RUN_EPSILON_CAP
    rows = [
        ("site", _toml_string(name), "the name in ledgers and reports"),
        ("data-file", _toml_string(DATA_FILE_PLACEHOLDER), "the site's records"),
        ("state-dir", _toml_string(state_dir), "ledger and signing key: keep, back up"),
        ("epsilon-budget", f"{EXAMPLE_EPSILON_BUDGET}", "lifetime ε on this data"),
        ("run-epsilon-cap", f"{EXAMPLE_RUN_EPSILON_CAP}",
         f"most one run may spend: {runs:g} runs in the budget"),
        ("delta", EXAMPLE_DELTA, "δ: at most 1/(10·records)"),
        ("text-column", _toml_string("text"), "the column holding the note"),
        ("label-column", _toml_string("label"), "the column holding its label name"),
    ]
    return "".join(f"{k} = {v}  # {c}\n" for k, v, c in rows)


def _toml_string(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _cmd_init(args: argparse.Namespace) -> int:
    def action() -> None:
        paths = init_certs(
            args.out,
            args.hosts or list(DEFAULT_HOSTS),
            args.sites,
            args.days,
            overwrite=args.overwrite,
            loopback=args.loopback,
        )
        _report_init(paths)

    return _guarded(action)


def _cmd_add_site(args: argparse.Namespace) -> int:
    return _guarded(
        lambda: _report_site(add_site(args.out, args.name, overwrite=args.overwrite), args.out)
    )


def _guarded(action: Callable[[], None]) -> int:
    try:
        action()
    except CertsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _report_init(paths: CertPaths) -> None:
    q = _quote
    print(f"wrote {paths.ca_cert}  CA certificate: give it to every site and CLI user")
    print(f"wrote {paths.ca_key}  CA private key, mode 0600: keep it offline")
    print(f"wrote {paths.server_cert}  SuperLink certificate for {', '.join(paths.hosts)}")
    print(f"wrote {paths.server_key}  SuperLink private key, mode 0600")
    for site in paths.sites:
        print(f"wrote {site.private_key}  SuperNode key of {site.name}, mode 0600")
        print(f"wrote {site.public_key}  public key of {site.name}: register it")
    local_only = all(h in DEFAULT_HOSTS for h in paths.hosts)
    bind = "127.0.0.1" if local_only else "0.0.0.0"
    database = Path(paths.out_dir).resolve().parent / DATABASE_FILE
    print("\nnext: start the SuperLink (TLS, SuperNode authentication, no runtime installs)")
    print(
        f"  flower-superlink --ssl-ca-certfile {q(paths.ca_cert)}"
        f" --ssl-certfile {q(paths.server_cert)} --ssl-keyfile {q(paths.server_key)}"
        " --enable-supernode-auth --disable-runtime-dependency-installation"
        f" --database {q(database)} --host {bind} --port {SUPERLINK_PORT}"
    )
    print("then append this connection to $FLWR_HOME/config.toml (default ~/.flwr), once;")
    print("the first flwr command writes that file with Flower's own connections: keep them")
    print(f"  [superlink.{CONNECTION}]")
    print(f'  address = "{_dial_host(paths.hosts)}:{SUPERLINK_PORT}"')
    print(f'  root-certificates = "{paths.ca_cert.resolve()}"')
    if paths.sites:
        print("and register each site's public key; each prints the site's node id: note it")
        print("next to the site's name (`flwr supernode list` shows node ids only)")
    for site in paths.sites:
        print(f"  flwr supernode register {q(site.public_key)} {CONNECTION} --name {site.name}")


def _report_site(site: SitePaths, out_dir: Path) -> None:
    """What the site and the operator do next, every path absolute. `out_dir` is the
    site's certificates folder: its parent is the site's own folder (node config,
    state), as in docs/run_across_hospitals.md."""
    q = _quote
    out_dir = Path(out_dir).resolve()
    ca_cert, server_cert = out_dir / CA_CERT, out_dir / SERVER_CERT
    node_config = out_dir.parent / NODE_CONFIG_FILE
    hosts = _cert_hosts(server_cert)
    address = _dial_host(hosts) if hosts else SUPERLINK_PLACEHOLDER
    print(f"wrote {site.private_key}  SuperNode private key, mode 0600: stays at the site")
    print(f"wrote {site.public_key}  public key: send it to the SuperLink operator")
    if (out_dir / CA_KEY).exists():
        print("(this is the operator's folder: send auth.key and ca.crt to the site over a "
              "channel it trusts;\n the paths below are this folder's, the site uses its own)")
    print("\nnext: the operator registers the public key; it prints the site's node id")
    print(f"  flwr supernode register {q(site.public_key)} {CONNECTION} --name {site.name}")
    print(f"then the site writes its node config to {node_config}, with the path of")
    print("its data file (an absolute path) in place of the placeholder:")
    for line in node_config_template(site.name, out_dir.parent / STATE_DIR).splitlines():
        print(f"  {line}")
    if not ca_cert.is_file():
        print(f"saves the CA certificate it gets from the operator (ca.crt) as {ca_cert},")
    state = out_dir.parent / STATE_DIR
    secret = state / RUNTIME_SECRET
    print("approves the fedcare release it reviewed (its source folder) by hash, signed in "
          "its ledger:")
    print(f"  fedcare site approve {q(state)} {RELEASE_PLACEHOLDER} --site {site.name}"
          ' --reason "the release we reviewed"')
    print("makes the secret its SuperNode shares with its own ClientApp process:")
    print(f"  ( umask 077 && mkdir -p {q(state)} && head -c 32 /dev/urandom > {q(secret)} )")
    print("starts its SuperNode"
          + ("" if hosts else
             f" ({SUPERLINK_PLACEHOLDER}: the SuperLink's address, from the operator)"))
    print(
        f"  flower-supernode --superlink {address}:{SUPERLINK_PORT}"
        f" --root-certificates {q(ca_cert)}"
        f" --auth-supernode-private-key {q(site.private_key)}"
        f" --node-config {q(node_config)}"
        f" --isolation process --port {SUPERNODE_PORT}"
        f" --superexec-auth-secret-file {q(secret)}"
    )
    print("and, beside it, the ClientApp process that runs only approved apps:")
    print(f"  fedcare site clientapp {q(state)} --runtime-api 127.0.0.1:{SUPERNODE_PORT}"
          f" --superexec-auth-secret-file {q(secret)}")
    print(f"(several SuperNodes on one host: give each its own --port, default "
          f"{SUPERNODE_PORT}, and its clientapp the same in --runtime-api)")


def _dial_host(hosts: Sequence[str]) -> str:
    """The host a SuperNode or the `flwr` CLI dials: the first that is not loopback."""
    return next((h for h in hosts if h not in DEFAULT_HOSTS), "127.0.0.1")


def _cert_hosts(cert_path: Path) -> list[str]:
    """The SubjectAlternativeNames of the server certificate `init_certs` wrote; none
    when there is no such file (a site's own folder) or it cannot be read."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name.value) for name in san]


def _quote(path: Path) -> str:
    return shlex.quote(str(Path(path).resolve()))
