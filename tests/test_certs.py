"""Tests for server/certs.py and server/certs_cli.py: CA, SuperLink server certificate, SuperNode keys, CLI."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from common.config import from_node_config
from server.certs import (
    CertPaths, CertsError, DuplicateSiteError, InvalidHostError, InvalidSiteNameError,
    TargetExistsError, add_site, init_certs,
)
from server.certs_cli import DATA_FILE_PLACEHOLDER, register


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    # One CA for the module: EC key generation is fast, but a shared one keeps
    # the handshake tests and the verification tests looking at the same files.
    out = tmp_path_factory.mktemp("certs")
    return init_certs(out, ["localhost", "127.0.0.1"], ["site-a", "site_b"], days=30)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the certificates ------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
)
def test_server_cert_verifies_against_ca(certs: CertPaths, subject: x509.GeneralName) -> None:
    verifier = PolicyBuilder().store(Store([_load(certs.ca_cert)])).build_server_verifier(subject)
    chain = verifier.verify(_load(certs.server_cert), [])
    assert chain[-1] == _load(certs.ca_cert)


def test_server_cert_is_not_valid_for_other_names(certs: CertPaths) -> None:
    verifier = (
        PolicyBuilder()
        .store(Store([_load(certs.ca_cert)]))
        .build_server_verifier(x509.DNSName("superlink.example.org"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_load(certs.server_cert), [])


def test_server_cert_does_not_verify_against_another_ca(
    certs: CertPaths, tmp_path: Path
) -> None:
    other = init_certs(tmp_path / "other")
    verifier = (
        PolicyBuilder()
        .store(Store([_load(other.ca_cert)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_load(certs.server_cert), [])


def test_ca_is_a_ca(certs: CertPaths) -> None:
    ca = _load(certs.ca_cert)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert basic.critical and basic.value.ca
    assert usage.key_cert_sign
    assert ca.issuer == ca.subject


def test_server_cert_sans_hold_every_host(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["superlink.example.org", "10.0.0.5", "::1"])
    san = _load(paths.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert paths.hosts == ("superlink.example.org", "10.0.0.5", "::1", "localhost", "127.0.0.1")


def test_loopback_can_be_left_out(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, ["10.0.0.5"], loopback=False)
    san = _load(paths.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]


@pytest.mark.parametrize("host", ["", "bad host", "-leading.example", "a..b", "x" * 64])
def test_bad_hosts_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(InvalidHostError, match="host"):
        init_certs(tmp_path, [host])
    assert not any(tmp_path.iterdir())


# --- key files --------------------------------------------------------------------


def test_private_keys_are_0600_and_public_files_readable(certs: CertPaths) -> None:
    private = [certs.ca_key, certs.server_key] + [s.private_key for s in certs.sites]
    public = [certs.ca_cert, certs.server_cert] + [s.public_key for s in certs.sites]
    assert [_mode(p) for p in private] == [0o600] * len(private)
    assert [_mode(p) for p in public] == [0o644] * len(public)


def test_private_key_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = init_certs(tmp_path, sites=["s1"])
    finally:
        os.umask(old)
    assert _mode(paths.server_key) == 0o600
    assert _mode(paths.sites[0].private_key) == 0o600


def test_server_key_matches_server_cert(certs: CertPaths) -> None:
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key() == _load(certs.server_cert).public_key()


def test_site_keys_load_the_way_flower_loads_them(certs: CertPaths) -> None:
    # flower-supernode: load_ssh_private_key(data, None), must be an EC key;
    # flwr supernode register: load_ssh_public_key, EC on a NIST curve.
    for site in certs.sites:
        private = load_ssh_private_key(site.private_key.read_bytes(), None)
        public = load_ssh_public_key(site.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"
        assert private.public_key() == public
    assert certs.sites[0].public_key != certs.sites[1].public_key
    assert certs.sites[0].public_key.read_bytes() != certs.sites[1].public_key.read_bytes()


# --- refusing to overwrite ----------------------------------------------------------


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("precious")
    with pytest.raises(TargetExistsError) as err:
        init_certs(tmp_path, sites=["s1"])
    assert err.value.path == tmp_path / "server.key"
    assert "server.key" in str(err.value)
    assert (tmp_path / "server.key").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_init_twice_is_refused(tmp_path: Path) -> None:
    first = init_certs(tmp_path)
    before = first.ca_key.read_bytes()
    with pytest.raises(TargetExistsError, match="ca.crt"):
        init_certs(tmp_path)
    assert first.ca_key.read_bytes() == before


def test_overwrite_replaces_and_keeps_mode(tmp_path: Path) -> None:
    first = init_certs(tmp_path, sites=["s1"])
    first.server_key.chmod(0o644)  # someone loosened it; the new file must not inherit
    old_ca = first.ca_cert.read_bytes()
    second = init_certs(tmp_path, sites=["s1"], overwrite=True)
    assert second.ca_cert.read_bytes() != old_ca
    assert _mode(second.server_key) == 0o600


# --- sites ----------------------------------------------------------------------------


def test_add_site_creates_a_new_pair(certs: CertPaths) -> None:
    site = add_site(certs.out_dir, "site-c")
    assert site.private_key == certs.out_dir / "sites" / "site-c" / "auth.key"
    assert _mode(site.private_key) == 0o600
    assert isinstance(load_ssh_public_key(site.public_key.read_bytes()), ec.EllipticCurvePublicKey)


def test_add_site_refuses_a_duplicate(certs: CertPaths) -> None:
    before = certs.sites[0].private_key.read_bytes()
    with pytest.raises(DuplicateSiteError, match="site-a"):
        add_site(certs.out_dir, "site-a")
    assert certs.sites[0].private_key.read_bytes() == before


def test_add_site_overwrite_rotates_the_key(tmp_path: Path) -> None:
    first = add_site(tmp_path, "s1")  # no CA needed: a site may make its own keys
    old = first.public_key.read_bytes()
    second = add_site(tmp_path, "s1", overwrite=True)
    assert second.public_key.read_bytes() != old
    assert _mode(second.private_key) == 0o600


@pytest.mark.parametrize("name", ["", "a b", "../evil", "a/b", "é", "x" * 65, ".hidden"])
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidSiteNameError, match="site name"):
        add_site(tmp_path, name)
    with pytest.raises(InvalidSiteNameError):
        init_certs(tmp_path / "x", sites=[name])
    assert not any(tmp_path.iterdir())


def test_duplicate_names_in_init_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DuplicateSiteError, match="s1"):
        init_certs(tmp_path, sites=["s1", "s2", "s1"])
    assert not any(tmp_path.iterdir())


# --- a real TLS handshake ---------------------------------------------------------------


def _handshake(certs: CertPaths, client: ssl.SSLContext, server_hostname: str) -> str | None:
    """Run one TLS handshake against a server thread; return the error or None."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client refused us; the client side reports why

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
        return None
    except ssl.SSLCertVerificationError as err:
        return err.verify_message
    finally:
        listener.close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_succeeds_with_the_ca(certs: CertPaths, server_hostname: str) -> None:
    client = ssl.create_default_context(cafile=str(certs.ca_cert))
    assert _handshake(certs, client, server_hostname) is None


def test_tls_handshake_fails_without_the_ca(certs: CertPaths) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, trusts nothing
    assert _handshake(certs, client, "localhost") is not None


def test_tls_handshake_fails_with_another_ca(certs: CertPaths, tmp_path: Path) -> None:
    other = init_certs(tmp_path / "other")
    client = ssl.create_default_context(cafile=str(other.ca_cert))
    assert _handshake(certs, client, "localhost") is not None


def test_tls_handshake_fails_for_a_name_not_in_the_cert(certs: CertPaths) -> None:
    client = ssl.create_default_context(cafile=str(certs.ca_cert))
    error = _handshake(certs, client, "superlink.example.org")
    assert error is not None and "mismatch" in error.lower()


# --- CLI --------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedcare")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _command(printed: str, program: str) -> list[str]:
    """The one printed line that runs `program`, split as the shell would."""
    lines = [line for line in printed.splitlines() if line.strip().startswith(program + " ")]
    assert len(lines) == 1, (program, printed)
    return shlex.split(lines[0])


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _toml_lines(printed: str) -> str:
    """The printed `key = value` lines (a config.toml stanza or a node config)."""
    return "\n".join(line.strip() for line in printed.splitlines()
                     if line.startswith("  ") and " = " in line)


def test_cli_init_prints_commands_that_run_from_any_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    assert _cli(["certs", "init", "--out", str(out), "--host", "sl.example.org",
                 "--site", "a", "--site", "b"]) == 0
    printed = capsys.readouterr().out
    superlink = _command(printed, "flower-superlink")
    assert "--enable-supernode-auth" in superlink
    for option in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert Path(_option(superlink, option)).is_absolute()
        assert Path(_option(superlink, option)).is_file(), option
    assert _option(superlink, "--database") == str((tmp_path / "superlink.db").resolve())
    connection = tomllib.loads("[superlink.fedcare]\n" + _toml_lines(printed.split(
        "[superlink.fedcare]", 1)[1]))["superlink"]["fedcare"]
    assert connection["address"] == "sl.example.org:8000"
    assert Path(connection["root-certificates"]).is_file()
    for site in ("a", "b"):
        public = (out / "sites" / site / "auth.pub").resolve()
        assert f"flwr supernode register {public} fedcare --name {site}" in printed
    san = _load(out / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.get_values_for_type(x509.DNSName) == ["sl.example.org", "localhost"]


def test_cli_add_site_in_the_operators_folder_prints_what_a_site_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    assert _cli(["certs", "init", "--out", str(out), "--host", "sl.example.org"]) == 0
    capsys.readouterr()
    assert _cli(["certs", "add-site", "site-c", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "sites" / "site-c" / "auth.key").exists()
    public = (out / "sites" / "site-c" / "auth.pub").resolve()
    assert f"flwr supernode register {public} fedcare --name site-c" in printed

    supernode = _command(printed, "flower-supernode")
    assert _option(supernode, "--superlink") == "sl.example.org:8000"
    for option in ("--root-certificates", "--auth-supernode-private-key"):
        assert Path(_option(supernode, option)).is_file(), option
    node_config_file = Path(_option(supernode, "--node-config"))
    assert node_config_file == (tmp_path / "node-config.toml").resolve()
    assert f"node config to {node_config_file}" in printed
    # the hospital's own ClientApp process, sharing the SuperNode's port and secret, and
    # the approval it needs first, in the site's state folder
    state = (tmp_path / "state").resolve()
    assert _option(supernode, "--isolation") == "process"
    clientapp = _command(printed, "fedcare site clientapp")
    assert clientapp[3] == str(state)
    assert _option(clientapp, "--runtime-api") == f"127.0.0.1:{_option(supernode, '--port')}"
    secret = _option(supernode, "--superexec-auth-secret-file")
    assert _option(clientapp, "--superexec-auth-secret-file") == secret
    assert Path(secret).parent == state
    approve = _command(printed, "fedcare site approve")
    assert approve[3] == str(state) and _option(approve, "--site") == "site-c"

    # the printed node config is complete: with the data path filled in, it is what
    # the ClientApp parses, and it names the site, its state folder and its policy
    text = _toml_lines(printed)
    assert DATA_FILE_PLACEHOLDER in text
    data = tmp_path / "notes.csv"
    node_config_file.write_text(text.replace(DATA_FILE_PLACEHOLDER, str(data)) + "\n")
    node = from_node_config(tomllib.loads(node_config_file.read_text()))
    assert (node.site, node.data_file) == ("site-c", str(data))
    assert node.state_dir == str((tmp_path / "state").resolve())
    assert (node.epsilon_budget, node.run_epsilon_cap, node.delta) == (24.0, 8.0, 1e-5)
    assert node.epsilon_budget > node.run_epsilon_cap > 0  # a run spends a share of it
    assert (node.text_column, node.label_column) == ("text", "label")


def test_cli_add_site_at_a_hospital_says_where_the_ca_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"  # the hospital's own folder: no CA, no server certificate
    assert _cli(["certs", "add-site", "site-a", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    supernode = _command(printed, "flower-supernode")
    ca = Path(_option(supernode, "--root-certificates"))
    assert ca == (out / "ca.crt").resolve() and not ca.exists()
    assert f"(ca.crt) as {ca}" in printed  # where to save the operator's certificate
    assert _option(supernode, "--superlink") == "SUPERLINK-HOST:8000"
    assert "SUPERLINK-HOST: the SuperLink's address" in printed
    assert Path(_option(supernode, "--auth-supernode-private-key")).is_file()
    node = from_node_config(tomllib.loads(
        _toml_lines(printed).replace(DATA_FILE_PLACEHOLDER, "/data/notes.csv")))
    assert node.site == "site-a" and node.state_dir == str((tmp_path / "state").resolve())


def test_cli_errors_are_sentences_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(["certs", "init", "--out", str(tmp_path)]) == 0
    assert _cli(["certs", "init", "--out", str(tmp_path)]) == 1
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
    assert _cli(["certs", "add-site", "bad name", "--out", str(tmp_path)]) == 1
    assert "site name 'bad name' is not allowed" in capsys.readouterr().err


def test_days_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match=r"days must be >= 1 \(got 0\)"):
        init_certs(tmp_path, days=0)
    assert not any(tmp_path.iterdir())
