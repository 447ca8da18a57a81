"""Read a GGUF file's header and tensor infos without touching the weights: the bytes of a local file or of an
http(s) URL by Range requests, parsed by ``gguf_header``.

The `gguf` package's ``GGUFReader`` memory-maps a whole local file, which cannot work over HTTP and would need
the full download.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
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


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send Authorization only to the host it was meant for (like curl)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_SameHostRedirects())


class HttpSource:
    """An http(s) URL read with Range requests; never downloads the weights.

    ``headers`` go with every request (an ``Authorization`` header only to the URL's own host, never to a
    redirect elsewhere); they are never part of an error message. ``timeout`` bounds each socket operation,
    ``deadline`` (a ``time.monotonic()`` instant, shared by a model's shards) the whole read: a server that
    drips a byte at a time, each within the timeout, still fails there.
    """

    def __init__(
        self, url: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None, deadline: float | None = None
    ) -> None:
        self.url = url
        self.name = url
        self.timeout = timeout
        self.deadline = time.monotonic() + READ_DEADLINE if deadline is None else deadline
        self.headers = {"User-Agent": "modelfit", **(headers or {})}
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
            with _OPENER.open(req, timeout=self._left()) as resp:
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
                with _OPENER.open(req, timeout=self._left()) as resp:
                    length = resp.headers.get("Content-Length")
                    self._size = int(length) if length is not None else None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError):
                return None
        return self._size


def open_source(
    location: str | Path,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    deadline: float | None = None,
) -> ByteSource:
    """A byte source for a local path or an http(s) URL (``headers``, ``timeout`` and ``deadline`` apply to URLs)."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        return HttpSource(text, timeout=timeout, headers=headers, deadline=deadline)
    return LocalSource(text)


def read_gguf(
    location: str | Path,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    deadline: float = READ_DEADLINE,
) -> GGUFHeader:
    """Read the header and tensor infos of a local path or http(s) URL.

    ``headers`` (an ``Authorization: Bearer`` token, say) go with every HTTP request; ``timeout`` bounds
    each request's connect and reads (not the DNS lookup), ``deadline`` (seconds) all of them together, every
    shard included. Split models are read shard by shard and merged.
    """
    at = time.monotonic() + deadline
    return header_from(str(location), (open_source(loc, headers, timeout, at) for loc in split_paths(str(location))))
