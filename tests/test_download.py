"""Runs the real fetch-model script (modelfit.download) against a local HTTP server.

Each script test runs twice: under /bin/sh with the host's tools, and under busybox sh
with a PATH holding only busybox applets and curl, as in the real downloader image.
The server answers http and https on one port (tests/local_tls.py; curl trusts its
certificate through $CURL_CA_BUNDLE): a token goes over https only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest

from local_tls import DualProtocol, make_cert, server_context
from modelfit.download import DOWNLOAD_SCRIPT, download_env, shard_names, shard_urls, verified_digests

DATA = os.urandom(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
CURL = shutil.which("curl")

pytestmark = pytest.mark.skipif(CURL is None, reason="needs curl")


@dataclass
class State:
    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # False: ignore Range, always 200 with the full body
    cut_first: int = 0  # cut this many requests after half the remaining body
    wrong: bool = False  # serve different bytes of the same length
    status: int = 0  # answer every request with this status
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    # path, Range, Authorization, scheme
    requests: list[tuple[str, str | None, str | None, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(DualProtocol, ThreadingHTTPServer):
    daemon_threads = True
    state: State


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st = cast(_Server, self.server).state
        rng = self.headers.get("Range")
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        with st.lock:
            st.requests.append((self.path, rng, self.headers.get("Authorization"), scheme))
            cut = st.cut_first > 0
            st.cut_first -= 1 if cut else 0
        if self.path in st.redirects:
            self.send_response(302)
            self.send_header("Location", st.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = st.files.get(self.path)
        if st.status or body is None:
            self.send_error(st.status or 404)
            return
        if st.wrong:
            body = bytes(b ^ 0x5A for b in body)
        start = 0
        if rng is not None and st.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                msg = b"<Error><Code>InvalidRange</Code></Error>"
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
        part = body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if cut:
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(part)


@dataclass
class Env:
    state: State
    base: str  # http://127.0.0.1:PORT (the same port answers https)
    tmp: Path
    ca: Path | None = None  # the server's certificate, for curl ($CURL_CA_BUNDLE)

    def https(self, host: str = "127.0.0.1") -> Env:
        """The same server over https (under ``host``)."""
        port = self.base.rsplit(":", 1)[1]
        return Env(self.state, f"https://{host}:{port}", self.tmp, self.ca)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert(tmp_path_factory.mktemp("tls"))


def _serve(tmp_path: Path, pem: Path) -> Iterator[Env]:
    server = _Server(("127.0.0.1", 0), Handler)
    server.state = State(files={"/m/model.gguf": DATA})
    server.tls = server_context(pem)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Env(server.state, f"http://127.0.0.1:{server.server_address[1]}", tmp_path, pem)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def srv(tmp_path: Path, pem: Path) -> Iterator[Env]:
    yield from _serve(tmp_path, pem)


@pytest.fixture
def other(tmp_path: Path, pem: Path) -> Iterator[Env]:
    """A second server: another port of the same host."""
    yield from _serve(tmp_path, pem)


@pytest.fixture(params=["sh", "busybox"])
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], str]:
    if request.param == "sh":
        return ["/bin/sh", "-c"], os.environ.get("PATH", "/usr/bin:/bin")
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("busybox not installed")
    bindir = tmp_path / "bbbin"
    bindir.mkdir()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        (bindir / applet).symlink_to(BUSYBOX)
    (bindir / "curl").symlink_to(cast(str, CURL))
    return [BUSYBOX, "sh", "-c"], str(bindir)


@dataclass
class Result:
    rc: int
    out: str
    message: str


def run(
    srv: Env,
    shell: tuple[list[str], str],
    path: str = "/m/model.gguf",
    size: int = len(DATA),
    sha: str | None = SHA,
    file: Path | None = None,
    **extra: str,
) -> Result:
    file = file or srv.tmp / "models" / "model.gguf"
    termlog = srv.tmp / "termination-log"
    termlog.unlink(missing_ok=True)
    env = {e["name"]: e["value"] for e in download_env(srv.base + path, str(file), size, sha)}
    env |= {"PATH": shell[1], "HOME": str(srv.tmp), "TERMINATION_LOG": str(termlog), "CURL_RETRY_DELAY": "0"}
    if srv.ca is not None:
        env["CURL_CA_BUNDLE"] = str(srv.ca)
    env |= extra
    p = subprocess.run(
        [*shell[0], DOWNLOAD_SCRIPT], env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    message = termlog.read_text().strip() if termlog.exists() else ""
    return Result(p.returncode, p.stdout + p.stderr, message)


def model(srv: Env) -> Path:
    return srv.tmp / "models" / "model.gguf"


def part(srv: Env) -> Path:
    return srv.tmp / "models" / "model.gguf.part"


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


Shell = tuple[list[str], str]


def test_fresh_download(srv: Env, shell: Shell) -> None:
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert not part(srv).exists()
    assert [q[1] for q in srv.state.requests] == [None]
    assert r.message == f"Verified: sha256 {SHA}"  # what the operator records
    assert verified_digests(r.message) == [SHA]
    assert not list(model(srv).parent.glob(".modelfit-write-test*"))


def test_fresh_download_without_size_or_sha(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, size=0, sha=None)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA


def test_without_a_digest_the_first_download_reports_the_one_it_got(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, size=0, sha=None)
    assert r.rc == 0 and r.message == f"Verified: sha256 {SHA}", r.out


def test_a_recorded_digest_holds_a_later_pod(srv: Env, shell: Shell) -> None:
    """Trust on first use: what an earlier pod verified (the operator's ConfigMap) is required of every later one."""
    digests = srv.tmp / "digest"
    digests.write_text(SHA + "\n")
    r = run(srv, shell, size=0, sha=None, DIGEST_FILE=str(digests))
    assert r.rc == 0 and "sha256 ok" in r.out, r.out
    model(srv).unlink()
    srv.state.wrong = True  # the source changed under the same URL
    r = run(srv, shell, size=0, sha=None, DIGEST_FILE=str(digests))
    assert r.rc != 0 and r.message.startswith(f"ChecksumMismatch: expected {SHA}, got "), r.out
    assert not model(srv).exists()
    digests.write_text("not a digest\n")  # ignored, not trusted
    r = run(srv, shell, size=0, sha=None, DIGEST_FILE=str(digests))
    assert r.rc == 0, r.out


def test_the_spec_digest_wins_over_a_recorded_one(srv: Env, shell: Shell) -> None:
    digests = srv.tmp / "digest"
    digests.write_text("0" * 64 + "\n")
    r = run(srv, shell, DIGEST_FILE=str(digests))
    assert r.rc == 0, r.out


def test_checksum_mismatch(srv: Env, shell: Shell) -> None:
    srv.state.wrong = True
    r = run(srv, shell)
    assert r.rc != 0
    url = srv.base + "/m/model.gguf"
    assert r.message.startswith(f"ChecksumMismatch: expected {SHA}, got "), r.out
    assert r.message.endswith(f" for {url}")
    assert not model(srv).exists()
    assert not part(srv).exists()
    assert len(srv.state.requests) == 1


def test_size_mismatch(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, size=len(DATA) + 10, sha=None)
    assert r.rc != 0
    assert r.message.startswith(f"SizeMismatch: expected {len(DATA) + 10} bytes, got {len(DATA)}"), r.out
    assert not model(srv).exists()


def test_resume_after_cut(srv: Env, shell: Shell) -> None:
    srv.state.cut_first = 2
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    ranges = [q[1] for q in srv.state.requests]
    half = len(DATA) // 2
    assert ranges == [None, f"bytes={half}-", f"bytes={half + (len(DATA) - half) // 2}-"]


def test_complete_part_gets_416(srv: Env, shell: Shell) -> None:
    put(part(srv), DATA)
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert "416" in r.out
    assert model(srv).read_bytes() == DATA
    assert not part(srv).exists()
    assert [q[1] for q in srv.state.requests] == [f"bytes={len(DATA)}-"]


def test_stale_partial_part_with_wrong_bytes_restarts(srv: Env, shell: Shell) -> None:
    put(part(srv), os.urandom(1000))
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == ["bytes=1000-", None]


def test_part_larger_than_size_is_dropped(srv: Env, shell: Shell) -> None:
    put(part(srv), DATA + b"junk")
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == [None]


def test_no_range_server_fresh(srv: Env, shell: Shell) -> None:
    srv.state.ranges = False
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA


def test_no_range_server_with_stale_partial(srv: Env, shell: Shell) -> None:
    srv.state.ranges = False
    put(part(srv), DATA[:1000])
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == ["bytes=1000-", None]


def test_no_range_server_with_cut(srv: Env, shell: Shell) -> None:
    srv.state.ranges = False
    srv.state.cut_first = 1
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == [None, f"bytes={len(DATA) // 2}-", None]


def test_cached_good_file_is_reused(srv: Env, shell: Shell) -> None:
    put(model(srv), DATA)
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert "reusing cached" in r.out
    assert srv.state.requests == []


def test_cached_file_with_wrong_sha_is_downloaded_again(srv: Env, shell: Shell) -> None:
    put(model(srv), bytes(len(DATA)))
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == [None]


def test_cached_truncated_file_is_resumed(srv: Env, shell: Shell) -> None:
    put(model(srv), DATA[:5000])
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert "truncated" in r.out
    assert model(srv).read_bytes() == DATA
    assert [q[1] for q in srv.state.requests] == ["bytes=5000-"]


def test_split_gguf(srv: Env, shell: Shell) -> None:
    shards = [os.urandom(200_000 + i) for i in range(3)]
    names = shard_names("big-00001-of-00003.gguf")
    for name, data in zip(names, shards, strict=True):
        srv.state.files[f"/m/{name}"] = data
    first = srv.tmp / "models" / names[0]
    put(srv.tmp / "models" / names[1], shards[1])  # already there: reused
    r = run(
        srv, shell, path=f"/m/{names[0]}", size=len(shards[0]), sha=hashlib.sha256(shards[0]).hexdigest(), file=first
    )
    assert r.rc == 0, r.out
    for name, data in zip(names, shards, strict=True):
        assert (srv.tmp / "models" / name).read_bytes() == data
    assert sorted(q[0] for q in srv.state.requests) == [f"/m/{names[0]}", f"/m/{names[2]}"]
    assert verified_digests(r.message) == [hashlib.sha256(d).hexdigest() for d in shards]
    # Held to what was recorded: a later shard that changed is caught, not only the first.
    digests = srv.tmp / "digest"
    digests.write_text("".join(f"{d}\n" for d in verified_digests(r.message) or []))
    put(srv.tmp / "models" / names[2], b"x" * len(shards[2]))
    srv.state.files[f"/m/{names[2]}"] = b"y" * len(shards[2])
    r = run(srv, shell, path=f"/m/{names[0]}", size=len(shards[0]), sha=None, file=first, DIGEST_FILE=str(digests))
    assert r.rc != 0 and r.message.startswith("ChecksumMismatch"), r.out


def test_split_gguf_missing_shard_fails(srv: Env, shell: Shell) -> None:
    srv.state.files["/m/big-00001-of-00002.gguf"] = DATA
    r = run(srv, shell, path="/m/big-00001-of-00002.gguf", file=srv.tmp / "models" / "big-00001-of-00002.gguf")
    assert r.rc != 0
    assert r.message == f"HTTPError: HTTP 404 for {srv.base}/m/big-00002-of-00002.gguf"
    assert (srv.tmp / "models" / "big-00001-of-00002.gguf").read_bytes() == DATA


TOKEN = "hf_SeCrEtToKeN1234567890"


def test_hf_token_sent_and_not_printed(srv: Env, shell: Shell) -> None:
    r = run(srv.https(), shell, HF_TOKEN=TOKEN)
    assert r.rc == 0, r.out
    assert [(q[2], q[3]) for q in srv.state.requests] == [(f"Bearer {TOKEN}", "https")]
    assert TOKEN not in r.out


def test_a_token_never_goes_over_http(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, HF_TOKEN=TOKEN)
    assert r.rc != 0
    assert (
        r.message
        == f"InvalidSpec: a token (HF_TOKEN) goes over https only, never in clear text: {srv.base}/m/model.gguf"
    )
    assert srv.state.requests == [] and TOKEN not in r.out


def test_without_a_token_http_is_fine(srv: Env, shell: Shell) -> None:
    r = run(srv, shell)
    assert r.rc == 0, r.out
    assert [(q[2], q[3]) for q in srv.state.requests] == [(None, "http")]


@pytest.mark.parametrize(
    ("where", "sent"),
    [("same origin", True), ("another host", False), ("another port", False)],
)
def test_the_token_does_not_follow_a_redirect_to_another_origin(
    srv: Env, other: Env, shell: Shell, where: str, sent: bool
) -> None:
    """curl drops the token (a custom header) when a redirect changes host or port: a CDN's signed URL needs none."""
    target = {"same origin": srv.https(), "another host": srv.https("localhost"), "another port": other.https()}[where]
    srv.state.redirects["/m/moved.gguf"] = f"{target.base}/m/model.gguf"
    r = run(srv.https(), shell, path="/m/moved.gguf", HF_TOKEN=TOKEN)
    assert r.rc == 0, r.out
    first, *rest = srv.state.requests + (other.state.requests if other.state is not srv.state else [])
    assert first[0] == "/m/moved.gguf" and first[2] == f"Bearer {TOKEN}"
    assert [(q[0], q[2]) for q in rest] == [("/m/model.gguf", f"Bearer {TOKEN}" if sent else None)]
    assert (srv.tmp / "models" / "model.gguf").read_bytes() == DATA


def test_with_a_token_a_redirect_to_http_is_refused(srv: Env, shell: Shell) -> None:
    srv.state.redirects["/m/moved.gguf"] = f"{srv.base}/m/model.gguf"  # same host and port, clear text
    r = run(srv.https(), shell, path="/m/moved.gguf", HF_TOKEN=TOKEN)
    assert r.rc != 0
    assert r.message == (
        f"DownloadFailed: curl exit 1 (a protocol refused: with a token every hop is https) for "
        f"{srv.https().base}/m/moved.gguf"
    )
    assert [q[3] for q in srv.state.requests] == ["https"]  # nothing in clear text, and not retried
    srv.state.requests.clear()
    r = run(srv.https(), shell, path="/m/moved.gguf")  # no token: http is fine
    assert r.rc == 0, r.out
    assert [q[3] for q in srv.state.requests] == ["https", "http"]


def test_no_token_no_header(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, HF_TOKEN="")
    assert r.rc == 0, r.out
    assert [q[2] for q in srv.state.requests] == [None]


def test_http_404(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, path="/m/missing.gguf")
    assert r.rc != 0
    assert r.message == f"HTTPError: HTTP 404 for {srv.base}/m/missing.gguf"
    assert len(srv.state.requests) == 1  # not retried
    assert not model(srv).exists()


def test_http_503_is_retried_then_fails(srv: Env, shell: Shell) -> None:
    srv.state.status = 503
    r = run(srv, shell, DOWNLOAD_ATTEMPTS="3")
    assert r.rc != 0
    assert r.message == f"HTTPError: HTTP 503 for {srv.base}/m/model.gguf after 3 attempts"
    assert len(srv.state.requests) == 3


def test_connection_refused_fails_after_attempts(srv: Env, shell: Shell) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    dead = Env(srv.state, f"http://127.0.0.1:{port}", srv.tmp)
    r = run(dead, shell, DOWNLOAD_ATTEMPTS="2")
    assert r.rc != 0
    assert r.message == f"DownloadFailed: curl exit 7 for {dead.base}/m/model.gguf after 2 attempts"


def test_retry_delay_is_honoured(srv: Env, shell: Shell) -> None:
    srv.state.cut_first = 1
    r = run(srv, shell, CURL_RETRY_DELAY="1")
    assert r.rc == 0, r.out
    assert "retrying in 1s" in r.out


def test_unwritable_directory(srv: Env, shell: Shell) -> None:
    blocker = srv.tmp / "not-a-dir"
    blocker.write_text("x")
    r = run(srv, shell, file=blocker / "models" / "model.gguf")
    assert r.rc != 0
    assert r.message.startswith(f"PermissionDenied: cannot write to {blocker}/models ("), r.out
    assert srv.state.requests == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits")
def test_read_only_directory(srv: Env, shell: Shell) -> None:
    d = srv.tmp / "ro"
    d.mkdir(mode=0o555)
    r = run(srv, shell, file=d / "model.gguf")
    assert r.rc != 0
    assert r.message.startswith(f"PermissionDenied: cannot write to {d} (mode 555"), r.out


def test_termination_log_may_be_unwritable(srv: Env, shell: Shell) -> None:
    r = run(srv, shell, path="/m/missing.gguf", TERMINATION_LOG=str(srv.tmp / "no" / "such" / "dir"))
    assert r.rc == 1
    assert "HTTPError: HTTP 404" in r.out


def test_download_env() -> None:
    assert download_env("http://h/x.gguf", "/models/x.gguf") == [
        {"name": "MODEL_URL", "value": "http://h/x.gguf"},
        {"name": "MODEL_FILE", "value": "/models/x.gguf"},
    ]
    env = download_env("http://h/x.gguf", "/models/x.gguf", 42, "ABC")
    assert env[2:] == [{"name": "MODEL_SIZE", "value": "42"}, {"name": "MODEL_SHA256", "value": "abc"}]


def test_shard_names_and_urls() -> None:
    assert shard_names("m-00001-of-00003.gguf") == [
        "m-00001-of-00003.gguf",
        "m-00002-of-00003.gguf",
        "m-00003-of-00003.gguf",
    ]
    assert shard_names("m-00002-of-00003.gguf") == ["m-00002-of-00003.gguf"]
    assert shard_names("m-00001-of-00001.gguf") == ["m-00001-of-00001.gguf"]
    assert shard_names("m.gguf") == ["m.gguf"]
    url = "https://hf.co/o/r/resolve/main/Q4/m-00001-of-00002.gguf?download=true"
    assert shard_urls(url) == [url, "https://hf.co/o/r/resolve/main/Q4/m-00002-of-00002.gguf?download=true"]
    assert shard_urls("https://h/m-00001-of-00002.gguf") == [
        "https://h/m-00001-of-00002.gguf",
        "https://h/m-00002-of-00002.gguf",
    ]
    assert shard_urls("https://h/m.gguf") == ["https://h/m.gguf"]


def test_a_verified_cached_file_is_not_hashed_again_until_it_changes(srv: Env, shell: Shell) -> None:
    """A node cache's wake: the stamp written after the sha256 matched lets the next start skip hashing the file;
    a changed file (its ctime moves), a stamp of the same second as the file's last change, or another digest
    hash it again."""
    sha = hashlib.sha256(DATA).hexdigest()
    put(model(srv), DATA)
    r = run(srv, shell, sha=sha)
    assert r.rc == 0 and "computing sha256" in r.out, r.out
    stamp = model(srv).with_name(model(srv).name + ".verified")
    assert stamp.read_text().startswith(sha + " ")
    # the stamp's second is the file's: not trusted yet (set so: the download and the stamp may straddle a second)
    same = int(model(srv).stat().st_ctime)
    os.utime(stamp, (same, same))
    r = run(srv, shell, sha=sha)
    assert "computing sha256" in r.out, r.out
    later = time.time() + 5
    os.utime(stamp, (later, later))  # as if a later start wrote it
    r = run(srv, shell, sha=sha)
    assert r.rc == 0 and "computing sha256" not in r.out and "verified by an earlier start" in r.out, r.out
    assert verified_digests(r.message) == [sha]
    # the content changed in place (same size, same inode) after the stamp was written: its ctime moved on (a
    # later second than the stamp's), so it is hashed and refused
    time.sleep(1.1)
    with open(model(srv), "r+b") as f:
        f.write(bytes([DATA[0] ^ 0xFF]))  # a byte that differs (b"X" was DATA's own first byte once in 256 runs)
    r = run(srv, shell, sha=sha)
    assert "computing sha256" in r.out and "is bad" in r.out, r.out
