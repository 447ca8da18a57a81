"""Read a GGUF file's header and tensor infos without touching the weights: the bytes of a local file or of an
http(s) URL by Range requests, parsed by ``gguf_header``.

The `gguf` package's ``GGUFReader`` memory-maps a whole local file, which cannot work over HTTP and would need
the full download.

With a ``refuse`` rule (the operator's: ``settings.refused_address``) a URL read is the operator pod reaching an
address a tenant chose: every address its host name resolves to is checked and the connection goes to a checked
address, on every redirect hop, never through a proxy (which would connect where it likes). An ``Authorization`` header goes over https only and only to the URL's own origin:
a redirect to another host, port or scheme drops it (a Hugging Face CDN's signed URL needs none).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .gguf_header import (
    ByteSource,
    GGUFError,
    GGUFHeader,
    TensorInfo,
    header_from,
    split_paths,
    tensor_nbytes,
)

__all__ = [
    "READ_DEADLINE",
    "ByteSource",
    "EgressRefused",
    "GGUFError",
    "GGUFHeader",
    "HttpSource",
    "LocalSource",
    "TensorInfo",
    "open_source",
    "read_gguf",
    "split_paths",
    "tensor_nbytes",
]


READ_DEADLINE = 20.0  # seconds for a whole header read, every request and shard: ~11 MB at 0.5 MB/s
_BODY_CHUNK = 64 << 10  # a response is read this much at a time, the clock checked between reads


class LocalSource:
    """A local file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.name}: no such file")

    def read(self, offset: int, size: int) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def total_size(self) -> int | None:
        return self.path.stat().st_size


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Refuse = Callable[[Address], str | None]  # why an address is not to be connected to ("link-local"), or None


class EgressRefused(GGUFError):
    """A request the operator does not make: a refused address, or a token that would travel in clear text."""


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port filled in: what a token is bound to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a number: no origin a token was meant for
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def vetted_addresses(host: str, port: int, refuse: Refuse) -> list[tuple[Any, ...]]:
    """getaddrinfo's answers for ``host``, every one checked: an EgressRefused naming the host, the address and
    the rule when any is refused (a name that also resolves to a refused address is not tried at all)."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]))
        why = refuse(ip)
        if why is not None:
            said = f"{host} is {why}" if _is_literal(host, ip) else f"{host} resolves to {ip}, which is {why}"
            raise EgressRefused(f"refused: {said}")
    return list(infos)


def _is_literal(host: str, ip: Address) -> bool:
    """Whether ``host`` is ``ip`` written as an address (127.1 or 2130706433 are names glibc reads as one)."""
    try:
        return ipaddress.ip_address(host.strip("[]")) == ip
    except ValueError:
        return False


def _connect(
    refuse: Refuse, address: tuple[str, int], timeout: float | None = None, source_address: Any = None
) -> socket.socket:
    """``socket.create_connection`` to a vetted address of ``address``'s host: the lookup checked is the one used
    (no second lookup a rebinding DNS server could answer differently)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in vetted_addresses(host, port, refuse):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"{host}: no address")


class _HTTP(http.client.HTTPConnection):
    """With ``refuse``: connected to a vetted address only."""

    def __init__(self, host: str, *, refuse: Refuse | None, **kw: Any) -> None:
        super().__init__(host, **kw)
        if refuse is not None:
            self._create_connection = functools.partial(_connect, refuse)


class _HTTPS(http.client.HTTPSConnection):
    """With ``refuse``: TLS to a vetted address, SNI and the certificate check for the URL's host name."""

    def __init__(self, host: str, *, refuse: Refuse | None, **kw: Any) -> None:
        super().__init__(host, **kw)
        if refuse is not None:
            self._create_connection = functools.partial(_connect, refuse)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, refuse: Refuse | None) -> None:
        super().__init__()
        self.refuse = refuse

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTP, refuse=self.refuse), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, refuse: Refuse | None) -> None:
        super().__init__()
        self.refuse = refuse

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        conn = functools.partial(_HTTPS, refuse=self.refuse)
        return self.do_open(conn, req, context=tls_context())


class _OriginBoundRedirects(urllib.request.HTTPRedirectHandler):
    """Follow http(s) redirects only; ``Authorization`` only to the origin it was meant for (like curl >= 7.83:
    another host, port or scheme, an https -> http downgrade on the same host included, drops it)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise EgressRefused(f"refused: a redirect to {newurl.split('?')[0][:200]}, not http(s)")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


TLS_CONTEXT: ssl.SSLContext | None = None  # None: the system's trusted CAs (a test sets one trusting its own)


@functools.cache
def _system_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


def tls_context() -> ssl.SSLContext:
    return TLS_CONTEXT or _system_tls()


def _opener(refuse: Refuse | None) -> urllib.request.OpenerDirector:
    """Without ``refuse`` (the command line's own reads) any address, through a proxy from the environment; with
    it (the operator) vetted addresses only and never a proxy (it would connect where it likes)."""
    direct = [urllib.request.ProxyHandler({})] if refuse is not None else []
    return urllib.request.build_opener(*direct, _OriginBoundRedirects(), _HTTPHandler(refuse), _HTTPSHandler(refuse))


class HttpSource:
    """An http(s) URL read with Range requests; never downloads the weights.

    ``headers`` go with every request (an ``Authorization`` header over https only, to the URL's own origin,
    never to a redirect elsewhere); they are never part of an error message. ``timeout`` bounds each socket
    operation, ``deadline`` (a ``time.monotonic()`` instant, shared by a model's shards) the whole read: a
    server that drips a byte at a time, each within the timeout, still fails there. ``refuse``: the operator's
    egress rule (module docstring); None reaches any address.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
        refuse: Refuse | None = None,
    ) -> None:
        self.url = url
        self.name = url
        self.timeout = timeout
        self.deadline = time.monotonic() + READ_DEADLINE if deadline is None else deadline
        self.headers = {"User-Agent": "modelfit", **(headers or {})}
        if any(k.lower() == "authorization" for k in self.headers) and _origin(url)[0] != "https":
            raise EgressRefused(f"{url}: refused: a token goes over https only, never in clear text over http")
        self._opener = _opener(refuse)
        self._size: int | None = None

    def _left(self) -> float:
        """Seconds to the deadline, for the next socket operation (at most ``timeout``); a GGUFError past it."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GGUFError(f"{self.url}: the header read ran past its deadline; the server is too slow")
        return min(left, self.timeout)

    def _body(self, resp: Any, skip: int, size: int) -> bytes:
        """``size`` bytes of the response after ``skip`` (fewer at its end), read in small pieces so the
        deadline is checked between them; each piece waits at most what is left (best effort: the socket is
        urllib's)."""
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        read = getattr(resp, "read1", resp.read)
        out = bytearray()
        while len(out) < size:
            left = self._left()
            if sock is not None:
                sock.settimeout(left)
            piece = read(min(_BODY_CHUNK, skip + size - len(out)))
            if not piece:
                break
            if skip:
                drop = min(skip, len(piece))
                piece, skip = piece[drop:], skip - drop
            out += piece
        return bytes(out[:size])

    def read(self, offset: int, size: int) -> bytes:
        req = urllib.request.Request(self.url, headers={**self.headers, "Range": f"bytes={offset}-{offset + size - 1}"})
        try:
            with self._opener.open(req, timeout=self._left()) as resp:
                status = resp.status
                content_range = resp.headers.get("Content-Range", "")
                if status == 206:
                    m = re.search(r"/(\d+)$", content_range)
                    if m:
                        self._size = int(m.group(1))
                    return self._body(resp, 0, size)
                if status == 200:
                    # Server ignored Range: read only what we need, then drop the connection.
                    length = resp.headers.get("Content-Length")
                    if length is not None and length.isdigit():
                        self._size = int(length)
                    return self._body(resp, offset, size)
                raise GGUFError(f"{self.url}: HTTP {status}")
        except EgressRefused as exc:
            raise EgressRefused(f"{self.url}: {exc}") from None
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                return b""
            raise GGUFError(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
        except http.client.HTTPException as exc:  # a server that does not speak HTTP, or breaks off an answer
            raise GGUFError(f"{self.url}: not an HTTP answer ({type(exc).__name__}: {exc})"[:500]) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if time.monotonic() >= self.deadline:
                raise GGUFError(f"{self.url}: the header read ran past its deadline ({reason})") from exc
            raise GGUFError(f"{self.url}: cannot fetch ({reason})") from exc

    def total_size(self) -> int | None:
        if self._size is None:
            req = urllib.request.Request(self.url, method="HEAD", headers=self.headers)
            try:
                with self._opener.open(req, timeout=self._left()) as resp:
                    length = resp.headers.get("Content-Length")
                    self._size = int(length) if length is not None else None
            except EgressRefused as exc:
                raise EgressRefused(f"{self.url}: {exc}") from None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError):
                return None
        return self._size


def open_source(
    location: str | Path,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    deadline: float | None = None,
    refuse: Refuse | None = None,
) -> ByteSource:
    """A byte source for a local path or an http(s) URL (``headers``, ``timeout``, ``deadline`` and ``refuse``
    apply to URLs)."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        return HttpSource(text, timeout=timeout, headers=headers, deadline=deadline, refuse=refuse)
    return LocalSource(text)


def read_gguf(
    location: str | Path,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    deadline: float = READ_DEADLINE,
    refuse: Refuse | None = None,
) -> GGUFHeader:
    """Read the header and tensor infos of a local path or http(s) URL.

    ``headers`` (an ``Authorization: Bearer`` token, say) go with every HTTP request; ``timeout`` bounds
    each request's connect and reads (not the DNS lookup), ``deadline`` (seconds) all of them together, every
    shard included. Split models are read shard by shard and merged. ``refuse``: the operator's egress rule
    (an EgressRefused for an address it refuses); None (the command line) reaches any address.
    """
    at = time.monotonic() + deadline
    sources = (open_source(loc, headers, timeout, at, refuse) for loc in split_paths(str(location)))
    return header_from(str(location), sources)
