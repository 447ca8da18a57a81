"""Read a GGUF file's header and tensor infos without touching the weights: the bytes of a local file or of an
http(s) URL by Range requests, parsed by ``gguf_header``.

The `gguf` package's ``GGUFReader`` memory-maps a whole local file, which cannot work over HTTP and would need
the full download.
"""

from __future__ import annotations

import re
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
    redirect elsewhere); they are never part of an error message.
    """

    def __init__(self, url: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.name = url
        self.timeout = timeout
        self.headers = {"User-Agent": "modelfit", **(headers or {})}
        self._size: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        req = urllib.request.Request(self.url, headers={**self.headers, "Range": f"bytes={offset}-{offset + size - 1}"})
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                status = resp.status
                content_range = resp.headers.get("Content-Range", "")
                if status == 206:
                    m = re.search(r"/(\d+)$", content_range)
                    if m:
                        self._size = int(m.group(1))
                    return bytes(resp.read(size))
                if status == 200:
                    # Server ignored Range: read only what we need, then drop the connection.
                    length = resp.headers.get("Content-Length")
                    if length is not None:
                        self._size = int(length)
                    data = resp.read(offset + size)
                    return bytes(data[offset : offset + size])
                raise GGUFError(f"{self.url}: HTTP {status}")
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                return b""
            raise GGUFError(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GGUFError(f"{self.url}: cannot fetch ({reason})") from exc

    def total_size(self) -> int | None:
        if self._size is None:
            req = urllib.request.Request(self.url, method="HEAD", headers=self.headers)
            try:
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    self._size = int(length) if length is not None else None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError):
                return None
        return self._size


def open_source(location: str | Path, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> ByteSource:
    """A byte source for a local path or an http(s) URL (``headers`` and ``timeout`` apply to URLs)."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        return HttpSource(text, timeout=timeout, headers=headers)
    return LocalSource(text)


def read_gguf(location: str | Path, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> GGUFHeader:
    """Read the header and tensor infos of a local path or http(s) URL.

    ``headers`` (an ``Authorization: Bearer`` token, say) go with every HTTP request; ``timeout`` bounds
    each request's connect and reads (not the DNS lookup). Split models are read shard by shard and merged.
    """
    return header_from(str(location), (open_source(loc, headers, timeout) for loc in split_paths(str(location))))
