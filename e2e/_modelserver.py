"""A model server for the real-node scenarios: files over HTTP with Range support, and the
failures a user's server has (no Range support, connections cut half-way, wrong bytes).

It listens on the address of the harness's own bridge (e2e/node.sh), so the init containers of
real pods reach it without any route off the machine.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast


@dataclass
class Behaviour:
    ranges: bool = True  # False: ignore Range, always 200 with the whole file
    cut_first: int = 0  # the first N whole-file GETs send half the body, then close the connection
    # (ranged reads, such as the operator's header read, are never cut: they are not downloads)
    wrong: bool = False  # flip every byte (same length)
    rate: int = 0  # bytes per second of a whole-file GET (0: as fast as it goes); ranged reads are not slowed


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class ServerState:
    files: dict[str, Path] = field(default_factory=dict)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        st = cast(_Server, self.server).state
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append(Request(self.command, path, rng))
            b = st.behaviour.get(path, Behaviour())
            cut = not head and rng is None and b.cut_first > 0
            if cut:
                b.cut_first -= 1
        file = st.files.get(path)
        if file is None:
            self.send_error(404)
            return
        size = file.stat().st_size
        start, end = 0, size - 1
        if rng and b.ranges and rng.startswith("bytes="):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start = int(first or 0)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        partial = bool(rng and b.ranges)
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if b.ranges:
            self.send_header("Accept-Ranges", "bytes")
        length = end - start + 1
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return
        budget = length // 2 if cut else length
        slow = b.rate if not head and rng is None else 0
        t0, sent = time.monotonic(), 0
        try:
            with open(file, "rb") as f:
                f.seek(start)
                while budget > 0:
                    if slow and sent > slow * (time.monotonic() - t0):
                        time.sleep(min(0.1, sent / slow - (time.monotonic() - t0)))
                        continue
                    chunk = f.read(min(1 << 20, budget))
                    if not chunk:
                        break
                    if b.wrong:
                        chunk = bytes(x ^ 0x5A for x in chunk)
                    self.wfile.write(chunk)
                    budget -= len(chunk)
                    sent += len(chunk)
            if cut:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class ModelServer:
    """``serve(path, file, **behaviour)`` then ``url(path)``; ``gets(path)`` counts the GETs."""

    def __init__(self, host: str, port: int = 0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.state = ServerState()
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def state(self) -> ServerState:
        return self._server.state

    def start(self) -> ModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, path: str, file: Path, **behaviour: object) -> str:
        with self.state.lock:
            self.state.files[path] = file
            self.state.behaviour[path] = Behaviour(**behaviour)  # type: ignore[arg-type]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def gets(self, path: str) -> list[Request]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == path and r.method == "GET"]
