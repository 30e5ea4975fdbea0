"""TLS certificates for the SuperLink and authentication keys for SuperNodes.

One directory holds everything a small federation needs (``fedcare certs init``):

    ca.crt                  CA certificate; every SuperNode and `flwr` CLI trusts it
                            (`flower-supernode --root-certificates`,
                            `root-certificates` in $FLWR_HOME/config.toml) and the
                            SuperLink gets it as `--ssl-ca-certfile`
    ca.key                  CA private key (0600); needed only to issue new server
                            certificates: keep it offline
    server.crt, server.key  SuperLink TLS certificate (SANs = the hosts given) and key
                            (0600): `flower-superlink --ssl-certfile --ssl-keyfile`
    sites/<name>/auth.key   SuperNode authentication key (0600), ECDSA P-384 in
                            OpenSSH private-key format:
                            `flower-supernode --auth-supernode-private-key`
    sites/<name>/auth.pub   its OpenSSH public key: `flwr supernode register`

Key formats were read from Flower 1.42's sources: `flower-supernode` loads the node
key with `load_ssh_private_key(data, password=None)` and requires an EC key (so a PEM
PKCS#8 key is refused, and the key must not be encrypted); `flwr supernode register`
loads the public key with `load_ssh_public_key` and requires a NIST EC curve.

A site may instead create its key pair on its own machine (``fedcare certs add-site
NAME --out DIR`` needs no CA) and send only ``auth.pub`` to the operator. What the
commands print next (the SuperLink, the `flwr` connection, registrations, a site's
node config and SuperNode) uses absolute paths, so it runs from any folder; the
steps are those of docs/run_across_hospitals.md.

Private keys are created with mode 0600 (``os.open(..., 0o600)`` with ``O_EXCL``) and
existing files are never replaced unless ``overwrite=True`` is passed; all targets are
checked before anything is written, so a refused call writes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedcareError

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_OUT_DIR = Path("certs")
DEFAULT_DAYS = 365

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
SITES_DIR = "sites"
SITE_PRIVATE_KEY = "auth.key"
SITE_PUBLIC_KEY = "auth.pub"

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CURVE = ec.SECP384R1()  # the curve Flower's docs use for node keys; fine for TLS too
_HASH = hashes.SHA384()
_CLOCK_SKEW = dt.timedelta(minutes=5)


# --- errors ----------------------------------------------------------------------


class CertsError(FedcareError):
    """Base class for every error this module raises on bad input."""


class TargetExistsError(CertsError, FileExistsError):
    """A file this call would write already exists and ``overwrite`` is False."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} already exists; refusing to overwrite it "
            "(pass overwrite=True / --overwrite to replace it)"
        )


class InvalidSiteNameError(CertsError, ValueError):
    """A site name that is not 1-64 letters, digits, '-' or '_'."""


class DuplicateSiteError(CertsError):
    """A site name given twice, or one that already has a key pair."""


class InvalidHostError(CertsError, ValueError):
    """A host that is neither an IP address nor a DNS name."""


# --- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class SitePaths:
    """Where one site's SuperNode authentication key pair lies."""

    name: str
    private_key: Path  # OpenSSH EC private key -> --auth-supernode-private-key
    public_key: Path  # OpenSSH public key -> flwr supernode register


@dataclass(frozen=True)
class CertPaths:
    """Everything `init_certs` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: tuple[SitePaths, ...]
    hosts: tuple[str, ...]  # the server certificate's SANs, in order


# --- public API ------------------------------------------------------------------


def init_certs(
    out_dir: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    sites: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    *,
    overwrite: bool = False,
    loopback: bool = True,
) -> CertPaths:
    """Create a CA, a SuperLink server certificate for `hosts`, and site key pairs.

    `hosts` become SubjectAlternativeNames of the server certificate: IP addresses
    as IPAddress entries, anything else as DNSName. Clients verify the address they
    dial against these, so list every name and IP the SuperNodes and the `flwr` CLI
    will use. `days` is the validity of both the CA and the server certificate.

    With `loopback` (the default) "localhost" and "127.0.0.1" are added when missing:
    the SuperLink starts its own SuperExec, which dials the SuperLink's `--host` over
    TLS, with 0.0.0.0 replaced by 127.0.0.1. Without a matching SAN that SuperExec
    dies and every run stays "pending" while `flwr run` reports success.
    """
    out_dir = Path(out_dir)
    hosts = list(dict.fromkeys(hosts))  # keep order, drop repeats
    if not hosts:
        raise InvalidHostError("hosts must name at least one DNS name or IP address")
    if loopback:
        hosts += [h for h in DEFAULT_HOSTS if h not in hosts]
    sans = [_parse_host(h) for h in hosts]
    if days < 1:
        raise CertsError(f"days must be >= 1 (got {days})")
    site_names = list(sites)
    for name in site_names:
        _check_site_name(name)
    duplicates = sorted({n for n in site_names if site_names.count(n) > 1})
    if duplicates:
        raise DuplicateSiteError(f"site names given more than once: {duplicates}")

    paths = CertPaths(
        out_dir=out_dir,
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY,
        sites=tuple(_site_paths(out_dir, n) for n in site_names),
        hosts=tuple(hosts),
    )
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    for site in paths.sites:
        targets += [site.private_key, site.public_key]
    if not overwrite:
        _refuse_existing(targets)

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcare federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, _HASH)
    )

    server_key = ec.generate_private_key(_CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, _HASH)
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(paths.ca_key, _pem_private(ca_key), PRIVATE_MODE, overwrite)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, overwrite)
    _write(paths.server_key, _pem_private(server_key), PRIVATE_MODE, overwrite)
    _write(
        paths.server_cert,
        server_cert.public_bytes(serialization.Encoding.PEM),
        PUBLIC_MODE,
        overwrite,
    )
    for site in paths.sites:
        _write_site_keys(site, overwrite)
    return paths


def add_site(out_dir: Path, name: str, *, overwrite: bool = False) -> SitePaths:
    """Create the SuperNode authentication key pair of one more site.

    Refuses a name that already has a key pair (``DuplicateSiteError``) unless
    ``overwrite=True``, which replaces it (key rotation): unregister the old node
    (`flwr supernode unregister NODE_ID`) and register the new public key. A SuperLink
    never accepts a public key again once it was unregistered, so rotation is also
    how a site that was removed comes back.
    """
    _check_site_name(name)
    site = _site_paths(Path(out_dir), name)
    if not overwrite:
        existing = [p for p in (site.private_key, site.public_key) if p.exists()]
        if existing:
            raise DuplicateSiteError(
                f"site {name!r} already has a key pair ({existing[0]}); choose another "
                "name or pass overwrite=True / --overwrite to replace it"
            )
    _write_site_keys(site, overwrite)
    return site


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


# --- helpers ---------------------------------------------------------------------


def _parse_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(lab) for lab in labels):
        raise InvalidHostError(
            f"host {host!r} is neither an IP address nor a DNS name "
            "(labels of letters, digits and '-', separated by '.')"
        )
    return x509.DNSName(host)


def _check_site_name(name: str) -> None:
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise InvalidSiteNameError(
            f"site name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_'"
        )


def _site_paths(out_dir: Path, name: str) -> SitePaths:
    folder = out_dir / SITES_DIR / name
    return SitePaths(name, folder / SITE_PRIVATE_KEY, folder / SITE_PUBLIC_KEY)


def _refuse_existing(targets: Sequence[Path]) -> None:
    for path in targets:
        if path.exists() or path.is_symlink():
            raise TargetExistsError(path)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_site_keys(site: SitePaths, overwrite: bool) -> None:
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,  # with OpenSSH format: "BEGIN OPENSSH PRIVATE KEY"
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # flower-supernode loads it with password=None
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    site.private_key.parent.mkdir(parents=True, exist_ok=True)
    _write(site.private_key, private, PRIVATE_MODE, overwrite)
    _write(site.public_key, public + f" fedcare-{site.name}\n".encode(), PUBLIC_MODE, overwrite)


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Create `path` with `mode` from the first byte on; never follow an old file."""
    if overwrite and (path.exists() or path.is_symlink()):
        path.unlink()  # a fresh inode gets `mode`; O_TRUNC would keep the old mode
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TargetExistsError(path) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from a public file's mode
