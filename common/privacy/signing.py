"""Ed25519 site keys: each hospital site signs its privacy ledger with its own key.

The private key stays at the site in ``site_key.pem`` (PKCS8 PEM, unencrypted, mode
0600); the public half, ``site_key.pub.pem``, is what the site hands to the server and
the auditor. A key is named by its fingerprint, ``sha256:<hex of the raw 32 bytes>``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.errors import FedcareError

PRIVATE_KEY_FILE = "site_key.pem"
PUBLIC_KEY_FILE = "site_key.pub.pem"


class KeyFileError(FedcareError, ValueError):
    """A key file is missing, unreadable, of the wrong type, or does not match."""


class InsecureKeyFileError(KeyFileError):
    """A private key file can be read by users other than its owner."""


def load_or_create_site_key(directory: Path) -> Ed25519PrivateKey:
    """Load ``directory/site_key.pem``, or create it (0600) with its public half (0644)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    if private_path.exists():
        key = _load_private_key(private_path)
        _ensure_public_file(public_path, key.public_key())
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new_file(private_path, pem, 0o600, exclusive=True)
    _write_new_file(public_path, public_key_pem(key.public_key()).encode(), 0o644,
                    exclusive=False)
    fsync_directory(directory)
    return key


def public_key_fingerprint(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def public_key_pem(pub: Ed25519PublicKey) -> str:
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"Public key file {path} cannot be read ({exc.strerror}); check the path."
        ) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(
            f"Public key file {path} is not a PEM public key; it should be the "
            f"{PUBLIC_KEY_FILE} the site generated."
        ) from exc
    return _ed25519(key, Ed25519PublicKey, f"Public key file {path}",
                    "use the site's own site_key.pub.pem")


def sign_digest(key: Ed25519PrivateKey, hex_digest: str) -> str:
    """Base64 Ed25519 signature over the raw bytes of a hex sha256 digest."""
    return base64.b64encode(key.sign(bytes.fromhex(hex_digest))).decode("ascii")


def signature_valid(pub: Ed25519PublicKey, hex_digest: str, signature: str) -> bool:
    """True iff `signature` (base64) signs the raw bytes of `hex_digest` under `pub`."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        pub.verify(raw, bytes.fromhex(hex_digest))
    except (InvalidSignature, ValueError, TypeError, AttributeError, UnicodeError):
        return False
    return True


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise InsecureKeyFileError(
            f"Private key file {path} has mode {mode:04o}, so other users can access "
            f"it; run `chmod 600 {path}` (and rotate the key if it may have leaked)."
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"Private key file {path} is not an unencrypted PKCS8 PEM key ({exc}); "
            "restore the site's original site_key.pem."
        ) from exc
    return _ed25519(key, Ed25519PrivateKey, f"Private key file {path}",
                    "restore the site's original site_key.pem")


def _ed25519(key, kind: type, what: str, fix: str):
    """`key` when it is a site key (Ed25519 of `kind`), else a KeyFileError saying so."""
    if not isinstance(key, kind):
        raise KeyFileError(f"{what} holds a {type(key).__name__}, but site keys are "
                           f"Ed25519; {fix}.")
    return key


def _ensure_public_file(public_path: Path, pub: Ed25519PublicKey) -> None:
    expected = public_key_pem(pub)
    if not public_path.exists():
        _write_new_file(public_path, expected.encode(), 0o644, exclusive=False)
        return
    if public_key_fingerprint(load_public_key(public_path)) != public_key_fingerprint(pub):
        raise KeyFileError(
            f"Public key file {public_path} does not belong to the private key beside "
            f"it; delete {public_path} so it is regenerated from {PRIVATE_KEY_FILE}."
        )


def _write_new_file(path: Path, data: bytes, mode: int, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a new file's name in `directory` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
