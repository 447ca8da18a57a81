"""Local https for the tests of where a token may go: a self-signed certificate for localhost and 127.0.0.1
(made by the openssl command; tests that need it skip without one) and a test HTTP server that answers http
and https on the same port, so that a redirect can change the scheme alone (https -> http, same host and port).
Used by tests/test_egress.py, tests/test_facts_source.py and tests/test_download.py.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

OPENSSL = shutil.which("openssl")


def make_cert(directory: Path) -> Path:
    """A self-signed certificate and its key in one PEM file, valid for localhost, 127.0.0.1 and ::1."""
    if OPENSSL is None:
        pytest.skip("needs the openssl command")
    pem, key = directory / "tls.pem", directory / "tls.key"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout", str(key), "-out", str(pem),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pem.write_text(pem.read_text() + key.read_text())
    return pem


def client_context(pem: Path) -> ssl.SSLContext:
    """A client context trusting ``pem`` only (hostname checked, as the system's would)."""
    return ssl.create_default_context(cafile=str(pem))


class DualProtocol:
    """A socketserver mixin: a connection whose first byte opens a TLS handshake is served over TLS, any other
    in clear text. Set ``tls`` (a server context) before serving."""

    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()  # type: ignore[misc]
        sock.settimeout(5)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if first == b"\x16" and self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError):
            pass  # the handler sees a broken connection
        sock.settimeout(None)
        return sock, addr


def server_context(pem: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))
    return ctx
