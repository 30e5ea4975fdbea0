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
NAME --out DIR`` needs no CA) and send only ``auth.pub`` to the operator. The
commands themselves, and what they print next: server/certs_cli.py.

Private keys are created with mode 0600 (``os.open(..., 0o600)`` with ``O_EXCL``) and
existing files are never replaced unless ``overwrite=True`` is passed; all targets are
checked before anything is written, so a refused call writes nothing.

Size: the CA, the server certificate and the site keys share their checks and their
writers; the command is server/certs_cli.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
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
            _key_usage("key_cert_sign", "crl_sign"),
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
            _key_usage("digital_signature", "key_agreement"),
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


_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment",
               "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
               "encipher_only", "decipher_only")


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension that allows exactly `allowed` (x509.KeyUsage takes every
    flag by name)."""
    return x509.KeyUsage(**{usage: usage in allowed for usage in _KEY_USAGES})


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
