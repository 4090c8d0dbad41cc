"""`fedseg flower certs`: a CA and a SuperLink certificate a TLS client really accepts."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from fedseg.cli.main import run


def _handshake(tls: Path, server_hostname: str) -> str:
    """Serve one TLS handshake on 127.0.0.1 with server.pem/.key; connect trusting only ca.pem."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass   # the client refused the certificate

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn:
                return conn.recv(2).decode()
    finally:
        thread.join(10)
        listener.close()


def test_certificates_pass_a_tls_handshake_for_their_hosts_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tls = tmp_path / "tls"
    assert run(["flower", "certs", "-o", str(tls), "--host", "localhost", "--host", "127.0.0.1", "-q"]) == 0
    assert sorted(p.name for p in tls.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    for key in ("ca.key", "server.key"):   # private keys: owner only
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert _handshake(tls, "localhost") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, "elsewhere.example.org")


def test_certs_never_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tls = tmp_path / "tls"
    assert run(["flower", "certs", "-o", str(tls), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert run(["flower", "certs", "-o", str(tls), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedseg: error: ") and "never overwritten" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before
    assert run(["flower", "certs", "-o", str(tmp_path / "other"), "--host", " ", "-q"]) == 2
    assert "--host must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
