"""The shared gateway on the real node (issue 16, items 1 and 4): the chart's gateway (Envoy, the GIE v1.5.0
body-based router, `modelfit gateway` listing routes) in front of two models, each routed by the name in the
body: ``alpha`` behind its Service (two pods) and ``chat`` behind its picker and edge, scaling to zero. Through the
one endpoint: /v1/models with states, names and aliases, OpenAI's errors, keys, a stream, a model woken from zero,
and a pod deletion and a rollout under a bounded load that lose no request.

As in the routing scenarios, the node has no kube-proxy, no DNS and an API server on 127.0.0.1 only: the gateway's
pod gets the host's network and the API server's address through the chart's own values (hostNetwork, extraEnv).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from _realnode import NODE_LABEL, NODE_TAINT, RealNode, http, pinned
from _support import HOST_CACHE_ROOT, md, wait_condition
from test_routing_realnode import NAME as CHAT
from test_routing_realnode import apply_routed, small  # noqa: F401 - small is a fixture
from test_scale_to_zero_realnode import _stages

pytestmark = pytest.mark.realnode
REPO = Path(__file__).resolve().parents[1]
ALPHA = "alpha"
GATEWAY = "http://127.0.0.1:8088"
IDLE_S = 10


def deploy_gateway(cluster: Any, ns: str, key: str) -> None:
    """`helm template charts/modelfit` with gateway.enabled for ``ns``, only the gateway's objects, applied there."""
    helm = shutil.which("helm", path=str(Path(cluster.kubectl_bin).parent))
    assert helm, "helm not built (e2e/build.sh helm)"
    cluster.kubectl("-n", ns, "create", "secret", "generic", "gw-key", f"--from-literal=api-key={key}")
    server = json.loads(cluster.kubectl("config", "view", "--minify", "-o", "json").stdout)["clusters"][0]["cluster"]
    values = {
        "image": {"repository": "localhost/modelfit/operator", "tag": "dev"},
        "gateway": {
            "enabled": True,
            "namespaces": [ns],
            "apiKeySecretRef": {"name": "gw-key"},
            "hostNetwork": True,
            "extraEnv": [
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": server["server"].rsplit(":", 1)[1]},
            ],
            "nodeSelector": {NODE_LABEL: "true"},
            "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
    vfile = Path(f"/tmp/{ns}-gateway-values.json")
    vfile.write_text(json.dumps(values))
    proc = subprocess.run(
        [helm, "template", "mf", str(REPO / "charts" / "modelfit"), "-n", ns, "-f", str(vfile),
         "--show-only", "templates/gateway.yaml"],
        capture_output=True, text=True, env=cluster.env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cluster.kubectl("-n", ns, "apply", "-f", "-", input=proc.stdout)


def call(path: str, body: dict[str, Any] | None = None, key: str | None = None, tag: str = "") -> tuple[int, Any]:
    status, text = http(f"{GATEWAY}{path}", body, key=key, timeout=300, headers={"x-request-id": tag or "-"})
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def chat(model: str, key: str | None, tag: str = "", max_tokens: int = 4) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return call("/v1/chat/completions", body, key, tag)


def models(key: str) -> dict[str, str]:
    status, body = call("/v1/models", key=key)
    assert status == 200, body
    return {m["id"]: m["state"] for m in body["data"]}


def first_event_and_end(model: str, key: str) -> tuple[float, float, list[bytes]]:
    """A streamed answer through the gateway: seconds to its first event, to its end, and the events."""
    body = {"model": model, "messages": [{"role": "user", "content": "count"}], "max_tokens": 24, "stream": True}
    req = urllib.request.Request(
        f"{GATEWAY}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    t0 = time.monotonic()
    first, events = 0.0, []
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                first = first or time.monotonic() - t0
                events.append(line.strip())
    return first, time.monotonic() - t0, events


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


class Load:
    """``clients`` threads sending short requests back to back through the gateway until stopped."""

    def __init__(self, model: str, key: str, clients: int = 2) -> None:
        self.model, self.key = model, key
        self.results: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            status, body = chat(self.model, self.key, tag=f"load-{i}-{n}", max_tokens=8)
            self.results.append((time.monotonic(), status, "" if status == 200 else str(body)[:200]))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


def test_one_endpoint_serves_two_models_by_name_through_zero_deletion_and_rollout(
    cluster: Any,
    operator: Any,
    real_node: RealNode,
    model_server: Any,
    ns: str,
    small: Path,  # noqa: F811
) -> None:
    gw_key = uuid.uuid4().hex
    chat_key = apply_routed(
        cluster,
        ns,
        model_server,
        small,
        parallel=2,
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "idleSeconds": IDLE_S},
        modelCache={"hostPath": {"path": str(HOST_CACHE_ROOT)}},
    )
    url = model_server.serve(f"/{ns}/alpha-{small.name}", small)
    alpha_spec = pinned(
        model={"url": url},
        context=2048,
        threads=1,
        replicas=2,
        resources={"requests": {"cpu": "300m"}},
        aliases=["org/alpha:q4_0"],
    )
    cluster.apply(md(ALPHA, ns, **alpha_spec))
    deploy_gateway(cluster, ns, gw_key)
    wait_condition(cluster, ns, ALPHA, "Ready", timeout=300, operator=operator)
    wait_condition(cluster, ns, CHAT, "Ready", timeout=300, operator=operator)
    cluster.kubectl("-n", ns, "rollout", "status", "deploy/mf-modelfit-gateway", "--timeout=180s", timeout=200)
    cluster.wait_for(lambda: chat(ALPHA, gw_key)[0] == 200, timeout=120, interval=1, what="the gateway serves alpha")

    # 1. One endpoint, each model by its name (or alias); the model at zero listed too, with its state
    listed = models(gw_key)
    assert set(listed) == {ALPHA, "org/alpha:q4_0", CHAT}, listed
    assert chat("org/alpha:q4_0", gw_key)[0] == 200
    status, err = chat("no-such-model", gw_key)
    assert status == 404 and err["error"]["code"] == "model_not_found", err
    assert call("/v1/chat/completions", {"messages": []}, gw_key)[0] == 400
    assert chat(ALPHA, None)[0] == 401 and call("/v1/models")[0] == 401  # the gateway's key
    assert chat(CHAT, gw_key)[0] == 401  # chat's own key, checked by its edge
    assert chat(CHAT, chat_key)[0] == 200

    # 2. A stream passes unbuffered: its first event long before its end
    first, total, events = first_event_and_end(ALPHA, gw_key)
    print(f"\n[gateway] stream: first event {first:.2f} s, end {total:.2f} s, {len(events)} events")
    assert events[-1] == b"data: [DONE]" and len(events) > 5 and first < total / 2

    # 3. chat goes to zero; the gateway says so; a request through it wakes chat and is answered
    def at_zero() -> bool:  # and the old pod gone (its drain holds its CPU request on this full node)
        obj = cluster.get_json("-n", ns, "modeldeployment", CHAT)
        state = (obj.get("status", {}).get("scaleToZero") or {}).get("state")
        return state == "Zero" and not real_node.pods(ns, CHAT, terminating=True)

    cluster.wait_for(at_zero, timeout=IDLE_S + 120, interval=1, what="chat at zero")
    cluster.wait_for(lambda: models(gw_key).get(CHAT) == "Zero", timeout=30, interval=1, what="/v1/models: Zero")
    t0, wall = time.monotonic(), time.time()
    status, body = chat(CHAT, chat_key, tag="wake")
    woke_s = time.monotonic() - t0
    (pod,) = real_node.pods(ns, CHAT)
    print(f"[gateway] chat woken from zero through the gateway: {status} in {woke_s:.1f} s ({_stages(pod, wall)})")
    assert status == 200, body

    # 4. Under a bounded load (2 clients back to back), a deleted alpha pod and then a rollout lose no request
    before = {p["metadata"]["name"] for p in real_node.pods(ns, ALPHA)}
    with Load(ALPHA, gw_key) as load:
        time.sleep(3)
        victim = sorted(before)[0]
        cluster.kubectl("-n", ns, "delete", "pod", victim, "--wait=false")
        deleted_at = time.monotonic()

        def replaced() -> bool:
            pods = real_node.pods(ns, ALPHA, terminating=True)
            return len(pods) == 2 and victim not in {p["metadata"]["name"] for p in pods} and all(map(_ready, pods))

        cluster.wait_for(replaced, timeout=180, interval=1, what="the deleted pod replaced")
        during_delete = [r for r in load.results if r[0] >= deleted_at]
        before = {p["metadata"]["name"] for p in real_node.pods(ns, ALPHA)}
        rolled_at = time.monotonic()
        cluster.kubectl("-n", ns, "patch", "modeldeployment", ALPHA, "--type=merge", "-p", '{"spec":{"parallel":2}}')

        def all_new_ready() -> bool:
            pods = real_node.pods(ns, ALPHA, terminating=True)  # the old ones gone, their drain done
            return len(pods) == 2 and not before & {p["metadata"]["name"] for p in pods} and all(map(_ready, pods))

        cluster.wait_for(all_new_ready, timeout=300, interval=1, what="alpha's new pods Ready, the old ones gone")
        time.sleep(5)
    during_rollout = [r for r in load.results if r[0] >= rolled_at]
    failed = [r for r in load.results if r[1] != 200]
    print(
        f"[gateway] under load: {len(load.results)} requests, {len(during_delete)} from the deletion on, "
        f"{len(during_rollout)} during the rollout; failed {len(failed)}: {failed[:3]}"
    )
    assert len(during_delete) >= 10 and len(during_rollout) >= 10, "too few requests: the load proves nothing"
    assert not failed
