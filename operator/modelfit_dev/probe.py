"""Run a real llama-server with a plan's arguments and measure what it uses.

Used by the tests and benchmarks that hold the sizing core to the real server:
start it, wait for /health, send prompts (one per slot, concurrently, so every
slot allocates what it would in service), then read VmHWM, RssAnon and RssFile
from /proc. With ``cgroup=True`` the server runs in a memory cgroup of its own
(a child of this process' cgroup, where the kernel lets us make one), whose peak
(cgroup v1 memory.max_usage_in_bytes, v2 memory.peak) is what a pod's container
limit is held to: anonymous memory plus the page cache charged to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_endpoint(args: list[str], model_path: str, port: int) -> list[str]:
    """A plan's args with the model path, host and port replaced for a local run."""
    out = list(args)
    for flag, value in (("-m", model_path), ("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


@dataclass
class Measurement:
    vm_hwm: int
    rss_anon: int
    rss_file: int
    rss: int
    log: str = ""
    completions: list[str] = field(default_factory=list)
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    cgroup_peak: int = 0  # 0 when the server has no cgroup of its own
    prompt_tokens: int = 0  # prompt tokens evaluated, all requests (the rest came from the slots' caches)


def read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


class MemoryCgroup:
    """A memory cgroup made for one process under this process' own (v1 or v2), removed on close.

    The child joins it before exec (``enter``), so every page it faults or reads is charged there.
    """

    def __init__(self, path: Path, v1: bool) -> None:
        self.path = path
        self.v1 = v1

    @classmethod
    def create(cls, name: str) -> MemoryCgroup | None:
        """A new cgroup, or None where there is no writable memory hierarchy (not root, no delegation)."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            v1 = "memory" in controllers.split(",")
            if not v1 and controllers != "":
                continue
            base = _CGROUP_ROOT / "memory" if v1 else _CGROUP_ROOT
            parent = base / rel.lstrip("/")
            if v1 and not (parent / "memory.max_usage_in_bytes").exists():
                continue
            if not v1 and not (_CGROUP_ROOT / "cgroup.controllers").exists():
                continue
            try:
                path = parent / name
                path.mkdir()
            except OSError:
                return None
            if not v1 and not (path / "memory.peak").exists():
                path.rmdir()
                return None
            return cls(path, v1)
        return None

    def enter(self) -> None:
        """Move the calling process into the cgroup (a Popen preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        """The most memory ever charged to the cgroup: anonymous memory plus page cache."""
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / name).read_text())

    def close(self) -> None:
        """Remove the cgroup once its processes are gone; its page cache charges move to the parent."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def drop_file_cache(path: str | Path) -> None:
    """Evict one file's clean page-cache pages (where no process maps them): the next process to read or
    map it is charged for them, as a pod's container is when it is the first to touch the model."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class LlamaServer:
    """A llama-server subprocess on 127.0.0.1 (context manager)."""

    def __init__(self, binary: str | Path, args: list[str], timeout: float = 600.0, cgroup: bool = False) -> None:
        self.binary = str(binary)
        self.args = args
        self.port = int(args[args.index("--port") + 1])
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = bytearray()
        self._reader: threading.Thread | None = None
        self._want_cgroup = cgroup
        self.cgroup: MemoryCgroup | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self._log.decode(errors="replace")

    def __enter__(self) -> LlamaServer:
        if self.proc is not None and self.proc.poll() is None:
            # A second start would put another process on the same port and lose this one's handle.
            raise RuntimeError(f"llama-server on port {self.port} is already running (pid {self.proc.pid})")
        if self._want_cgroup and self.cgroup is None:
            self.cgroup = MemoryCgroup.create(f"modelfit-probe-{os.getpid()}-{self.port}")
        self.proc = subprocess.Popen(
            [self.binary, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=self.cgroup.enter if self.cgroup else None,  # writes cgroup.procs, then exec
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()  # never leave a process behind, not even on Ctrl-C during loading
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"llama-server not healthy after {self.timeout}s:\n{self.log[-4000:]}")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._log += chunk

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cgroup is not None:
            self.cgroup.close()
            self.cgroup = None

    def complete(self, prompt: str | Sequence[int], n_predict: int = 8, timeout: float = 600.0) -> dict[str, object]:
        """One /completion; a prompt of token ids is taken as is (an exact number of KV cells)."""
        if not isinstance(prompt, str):
            prompt = list(prompt)
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "cache_prompt": True, "temperature": 0}).encode()
        req = urllib.request.Request(self.url + "/completion", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            result: dict[str, object] = json.loads(r.read())
        return result

    def measure(
        self, prompts: Sequence[str | Sequence[int]], n_predict: int = 8, timeout: float = 600.0
    ) -> Measurement:
        """Send prompts concurrently, then read the process' memory (and its cgroup's peak, if it has one)."""
        results: list[dict[str, object]] = []
        errors: list[BaseException] = []

        def run(p: str) -> None:
            try:
                results.append(self.complete(p, n_predict, timeout=timeout))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"completion failed: {errors[0]}\n{self.log[-3000:]}")
        assert self.proc is not None
        st = read_status(self.proc.pid)
        m = Measurement(
            vm_hwm=st.get("VmHWM", 0),
            rss_anon=st.get("RssAnon", 0),
            rss_file=st.get("RssFile", 0),
            rss=st.get("VmRSS", 0),
            log=self.log,
            completions=[str(r.get("content", "")) for r in results],
            cgroup_peak=self.cgroup.peak() if self.cgroup else 0,
        )
        timings = [r.get("timings") for r in results if isinstance(r.get("timings"), dict)]
        m.prompt_tokens = sum(int(t.get("prompt_n", 0)) for t in timings if isinstance(t, dict))
        if timings:
            t0 = timings[0]
            assert isinstance(t0, dict)
            m.prompt_tps = float(t0.get("prompt_per_second", 0.0))
            m.decode_tps = float(t0.get("predicted_per_second", 0.0))
        return m


def filler_prompt(n_words: int, seed: int = 0) -> str:
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud", "light", "tree"]
    return " ".join(words[(i * 7 + seed) % len(words)] for i in range(n_words))


def token_prompt(n_tokens: int, n_vocab: int, seed: int = 0) -> list[int]:
    """``n_tokens`` pseudo-random ordinary token ids: a prompt that takes exactly that many KV cells.

    Ids are drawn from [256, n_vocab - 64): past the byte tokens, short of the specials at either end.
    A longer prompt of the same seed extends a shorter one, so a slot reuses what it already holds.
    """
    lo, hi = 256, max(n_vocab - 64, 257)
    x, out = 2463534242 + 7919 * seed, []
    for _ in range(n_tokens):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out.append(lo + x % (hi - lo))
    return out
