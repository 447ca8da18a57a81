"""The custom-metrics pipeline of the e2e cluster (``e2e/metrics.sh``: Prometheus + prometheus-adapter
as host processes) and a loop that turns real-node pods into Prometheus ``file_sd`` targets.

In a real cluster, Prometheus finds the pods itself (``kubernetes_sd_configs`` or the operator's
PodMonitor); here Prometheus is built with ``-tags remove_all_sd`` and the pod list comes from the API
server: every Running pod of a label selector on the real node (its IP on the node bridge
10.88.0.0/16 is reachable from this machine) becomes ``<podIP>:8080`` with labels namespace and pod,
the labels the adapter maps to the Pod resource.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

E2E_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
BIN = CACHE / "bin"
BINARIES = ("prometheus", "prometheus-adapter")
CUSTOM_METRICS = "/apis/custom.metrics.k8s.io/v1beta2"
REAL_NODE_NET = "10.88."  # e2e/node.sh's bridge subnet 10.88.0.0/16
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not os.access(BIN / b, os.X_OK)]


def ensure_built(timeout: float = 3600) -> None:
    """``e2e/build.sh prometheus prometheus-adapter`` when a binary is missing (stamp-cached)."""
    if not missing_binaries():
        return
    proc = subprocess.run(
        [str(E2E_DIR / "build.sh"), *BINARIES], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0 or missing_binaries():
        raise RuntimeError(f"e2e/build.sh {' '.join(BINARIES)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


class Pipeline:
    """``e2e/metrics.sh up|down`` for the cluster of ``kubeconfig`` (an ``e2e/cluster.sh`` state dir:
    ``<state>/kubeconfig`` and ``<state>/pki/ca.{crt,key}``), on free ports, state in ``<state>/metrics``."""

    def __init__(self, cluster: Any, scrape: str = "2s", relist: str = "5s") -> None:
        self.cluster = cluster
        self.state = Path(cluster.kubeconfig).resolve().parent
        self.ca = self.state / "pki" / "ca"
        self.dir = self.state / "metrics"
        self.targets = self.dir / "targets"
        self.prom_port = free_port()
        self.adapter_port = free_port()
        self.env = dict(
            os.environ,
            MODELFIT_STATE=str(self.state),
            MODELFIT_KUBECONFIG=str(cluster.kubeconfig),
            MODELFIT_METRICS_CA=str(self.ca),
            MODELFIT_METRICS_DIR=str(self.dir),
            MODELFIT_PROMETHEUS_PORT=str(self.prom_port),
            MODELFIT_ADAPTER_PORT=str(self.adapter_port),
            MODELFIT_SCRAPE_INTERVAL=scrape,
            MODELFIT_ADAPTER_RELIST=relist,
        )
        self.up_s = 0.0

    def _sh(self, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(E2E_DIR / "metrics.sh"), cmd], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def up(self) -> Pipeline:
        if not (self.ca.with_suffix(".crt").exists() and self.ca.with_suffix(".key").exists()):
            raise RuntimeError(f"no cluster CA at {self.ca}.{{crt,key}}: the pipeline needs an e2e/cluster.sh cluster")
        ensure_built()
        t0 = time.monotonic()
        proc = self._sh("up")
        if proc.returncode != 0:
            self._sh("down")
            raise RuntimeError(f"e2e/metrics.sh up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        self.up_s = time.monotonic() - t0
        return self

    def down(self) -> None:
        self._sh("down")

    def log_tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- reads ------------------------------------------------------------------------
    def query(self, promql: str) -> list[dict[str, Any]]:
        """Prometheus instant query: the result vector."""
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with _NO_PROXY.open(url, timeout=10) as r:
            return list(json.loads(r.read())["data"]["result"])

    def pod_metric(self, ns: str, metric: str, selector: str | None = None) -> dict[str, float]:
        """``kubectl get --raw /apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/*/METRIC``: pod -> value."""
        path = f"{CUSTOM_METRICS}/namespaces/{ns}/pods/*/{metric}"
        if selector:
            path += "?" + urllib.parse.urlencode({"labelSelector": selector})
        proc = self.cluster.kubectl("get", "--raw", path, check=False, timeout=20)
        if proc.returncode != 0:
            return {}
        return {i["describedObject"]["name"]: quantity(i["value"]) for i in json.loads(proc.stdout).get("items", [])}


def quantity(q: str) -> float:
    """A metrics API quantity ("3", "1500m", "2k") as a float."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    if q and q[-1] in suffixes:
        return float(q[:-1]) * suffixes[q[-1]]
    return float(q)


@dataclass
class Result:
    start: float  # time.monotonic() when the request was sent
    ttft: float  # seconds to the first generated token (streamed)
    end: float
    token_times: list[float]  # time.monotonic() of every streamed token
    target: str
    ok: bool

    @property
    def tokens(self) -> int:
        return len(self.token_times)


class ChatLoad:
    """``clients`` threads, each sending streamed /v1/chat/completions back to back (no think time),
    spread round-robin over ``targets()`` (base URLs, re-read before every request so that load follows
    scaling, as a Service would spread it). Every request decodes exactly ``max_tokens`` (EOS ignored).
    """

    def __init__(
        self,
        targets: Callable[[], list[str]],
        clients: int,
        max_tokens: int = 32,
        prompt: str = "Write a short story about a robot.",
        timeout: float = 120,
        stream: bool = True,
    ) -> None:
        self.targets = targets
        self.stream = stream
        self.clients = clients
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.timeout = timeout
        self.results: list[Result] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: set[Any] = set()  # open responses, closed by abort()
        self._n = 0
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"load-{i}") for i in range(clients)]
        self.started = self.stopped = self.drained = 0.0

    def __enter__(self) -> ChatLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self, join: bool = True) -> None:
        """Stop sending; with ``join``, wait for the requests in flight (``.drained`` is when the last ended)."""
        if not self.stopped:
            self.stopped = time.monotonic()
        self._stop.set()
        if join:
            for t in self._threads:
                t.join(self.timeout + 10)
            self.drained = time.monotonic()

    def abort(self) -> None:
        """Stop sending and close the open requests (llama-server cancels a task whose client went away)."""
        self.stop(join=False)
        with self._lock:
            active = list(self._active)
        for resp in active:
            try:
                resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            except (AttributeError, OSError):
                pass
        for t in self._threads:
            t.join(10)
        self.drained = time.monotonic()

    def _next(self) -> tuple[str | None, int]:
        urls = self.targets()
        with self._lock:
            self._n += 1
            return (urls[self._n % len(urls)] if urls else None), self._n

    def _track(self, resp: Any, add: bool) -> None:
        with self._lock:
            (self._active.add if add else self._active.discard)(resp)

    def _run(self) -> None:
        while not self._stop.is_set():
            url, n = self._next()
            if url is None:
                time.sleep(0.2)
                continue
            # A prompt of its own (numbered first): no request reuses another's cached prefix.
            r = chat_stream(url, f"Request {n}. {self.prompt}", self.max_tokens, self.timeout, self._track, self.stream)
            with self._lock:
                if r.token_times or self._stop.is_set():  # an aborted request counts (its tokens, its wait)
                    self.results.append(r)
                if not r.ok and not self._stop.is_set():
                    self.errors.append(url)
            if not r.ok:
                time.sleep(0.5)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        """Over [since, until): generated tokens/s (every streamed token in the window, finished request or
        not), and TTFT and latency p50/p95 of the requests sent in the window. A request aborted before its
        first token counts with its wait so far as TTFT (a lower bound), so queueing is not hidden."""
        with self._lock:
            results = list(self.results)
        rs = [r for r in results if since <= r.start < until]
        stamps = [t for r in results for t in r.token_times if since <= t < until]
        if until != float("inf"):
            span = until - since
        else:
            span = (max(stamps) - min(r.start for r in results)) if stamps else 0.0
        ttft = sorted(r.ttft if r.token_times else r.end - r.start for r in rs)
        lat = sorted(r.end - r.start for r in rs if r.ok)
        return {
            "requests": sum(r.ok for r in rs),
            "tok_s": len(stamps) / span if span > 0 else 0.0,
            "ttft_p50": _pct(ttft, 50),
            "ttft_p95": _pct(ttft, 95),
            "lat_p50": _pct(lat, 50),
            "lat_p95": _pct(lat, 95),
        }


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def chat_stream(
    base_url: str,
    prompt: str,
    max_tokens: int,
    timeout: float = 120,
    track: Callable[[Any, bool], None] | None = None,
    stream: bool = True,
) -> Result:
    """One chat completion. Streamed: every chunk that carries content is a token. Not streamed (less
    client CPU for fast models): the tokens are spread over llama-server's own decode time
    (``timings.predicted_ms``) before the response, so TTFT = latency - decode time."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    req = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.monotonic()
    times: list[float] = []
    done = False
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            if track:
                track(resp, True)
            try:
                if not stream:
                    out = json.loads(resp.read())
                    end = time.monotonic()
                    n = int(out["usage"]["completion_tokens"])
                    decode = float(out["timings"]["predicted_ms"]) / 1000
                    first = max(t0, end - decode)
                    times = [first + i * (end - first) / max(1, n - 1) for i in range(n)]
                    done = True
                for raw in resp if stream else ():
                    line = raw.strip()
                    if line == b"data: [DONE]":
                        done = True
                    if not line.startswith(b"data:") or done:
                        continue
                    chunk = json.loads(line[5:])
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                        times.append(time.monotonic())
            finally:
                if track:
                    track(resp, False)
    except (OSError, ValueError, KeyError):
        pass
    return Result(t0, (times[0] - t0) if times else 0.0, time.monotonic(), times, base_url, done and bool(times))


class PodTargets:
    """A thread that keeps ``<targets>/<ns>-<name>.json`` equal to the Running real-node pods of a selector.

    ``.pods`` is the current {pod name: pod IP}, for callers that spread load over the replicas.
    """

    def __init__(
        self, cluster: Any, pipeline: Pipeline, ns: str, selector: str, port: int = 8080, period: float = 1.0
    ) -> None:
        self.cluster = cluster
        self.file = pipeline.targets / f"{ns}-{hashlib.sha256(selector.encode()).hexdigest()[:8]}.json"
        self.ns, self.selector, self.port, self.period = ns, selector, port, period
        self.pods: dict[str, str] = {}
        self.ready: set[str] = set()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"targets-{ns}", daemon=True)

    def __enter__(self) -> PodTargets:
        self.refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.file.unlink(missing_ok=True)

    def refresh(self) -> None:
        out = self.cluster.get_json("-n", self.ns, "pods", "-l", self.selector)
        pods: dict[str, str] = {}
        ready: set[str] = set()
        for p in out["items"]:
            ip = (p.get("status") or {}).get("podIP") or ""
            if p["metadata"].get("deletionTimestamp") or p["status"].get("phase") != "Running":
                continue
            if not ip.startswith(REAL_NODE_NET):
                continue  # a kwok pod: nothing listens there
            pods[p["metadata"]["name"]] = ip
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []):
                ready.add(p["metadata"]["name"])
        groups = [
            {"targets": [f"{ip}:{self.port}"], "labels": {"namespace": self.ns, "pod": name}}
            for name, ip in sorted(pods.items())
        ]
        text = json.dumps(groups)
        if not self.file.exists() or self.file.read_text() != text:
            tmp = self.file.with_suffix(".tmp")  # file_sd reads *.json: write then rename
            tmp.write_text(text)
            tmp.replace(self.file)
        self.pods, self.ready = pods, ready

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.refresh()
            except (subprocess.SubprocessError, OSError, ValueError, KeyError):  # a slow API server: keep the targets
                self.errors += 1
