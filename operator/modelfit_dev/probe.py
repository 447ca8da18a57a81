"""Run a real llama-server with a plan's arguments and measure what it uses.

Used by the tests and benchmarks that hold the sizing core to the real server:
start it, wait for /health, send prompts (one per slot, concurrently, so every
slot allocates what it would in service), then read VmHWM, RssAnon and RssFile
from /proc.
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
from dataclasses import dataclass, field
from pathlib import Path


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


def read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


class LlamaServer:
    """A llama-server subprocess on 127.0.0.1 (context manager)."""

    def __init__(self, binary: str | Path, args: list[str], timeout: float = 600.0) -> None:
        self.binary = str(binary)
        self.args = args
        self.port = int(args[args.index("--port") + 1])
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = bytearray()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self._log.decode(errors="replace")

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.stop()
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

    def complete(self, prompt: str, n_predict: int = 8, timeout: float = 600.0) -> dict[str, object]:
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "cache_prompt": True, "temperature": 0}).encode()
        req = urllib.request.Request(self.url + "/completion", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            result: dict[str, object] = json.loads(r.read())
        return result

    def measure(self, prompts: list[str], n_predict: int = 8) -> Measurement:
        """Send prompts concurrently, then read the process' memory."""
        results: list[dict[str, object]] = []
        errors: list[BaseException] = []

        def run(p: str) -> None:
            try:
                results.append(self.complete(p, n_predict))
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
        )
        timings = [r.get("timings") for r in results if isinstance(r.get("timings"), dict)]
        if timings:
            t0 = timings[0]
            assert isinstance(t0, dict)
            m.prompt_tps = float(t0.get("prompt_per_second", 0.0))
            m.decode_tps = float(t0.get("predicted_per_second", 0.0))
        return m


def filler_prompt(n_words: int, seed: int = 0) -> str:
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud", "light", "tree"]
    return " ".join(words[(i * 7 + seed) % len(words)] for i in range(n_words))
