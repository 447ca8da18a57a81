"""Load-based autoscaling on real pods: the operator's HorizontalPodAutoscaler, KCM's real HPA controller,
and the custom-metrics pipeline (e2e/metrics.sh: Prometheus + prometheus-adapter) on llama-server's own
gauges.

A ModelDeployment with ``spec.autoscaling`` runs a small generated model on the real node. Clients send
chat completions back to back, more of them than the pods have slots, so requests queue; the adapter
serves ``llamacpp_requests_inflight`` (processing + deferred, per pod), the HPA adds a pod, the new pod
becomes Ready and serves; when the load stops the queue drains and the HPA removes the pod again.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _metrics import ChatLoad, Pipeline, PodTargets, chat_stream
from _realnode import RealNode, pinned, sha256_of
from _support import wait_condition
from modelfit_dev.synth import ensure_model

pytestmark = pytest.mark.realnode

NAME = "chat"
METRIC = os.environ.get("MODELFIT_HPA_METRIC", "llamacpp_requests_inflight")
SELECTOR = f"app.kubernetes.io/name=llama-server,app.kubernetes.io/instance={NAME}"
PARALLEL = 1
UTILIZATION = 50  # target 500m per pod: one busy slot is above it, an idle pod below
MAX_REPLICAS = 2
CLIENTS = 3  # > MAX_REPLICAS x PARALLEL: requests keep queueing until the load stops
MAX_TOKENS = 768  # ~0.5 s per request for the tiny model on one thread: far longer than a client's turnaround


@pytest.fixture(scope="module")
def model() -> Path:
    return ensure_model("qwen3-tiny", "Q4_0")


@pytest.fixture(scope="module")
def metrics(cluster: Any, real_node: RealNode) -> Iterator[Pipeline]:
    """Prometheus (2 s scrapes) + prometheus-adapter (5 s relist), custom.metrics.k8s.io Available."""
    pipeline = Pipeline(cluster, scrape="2s", relist="5s")
    try:
        pipeline.up()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    print(f"\n[hpa] metrics pipeline up in {pipeline.up_s:.1f}s (prometheus :{pipeline.prom_port})")
    try:
        yield pipeline
    finally:
        pipeline.down()


def _hpa(cluster: Any, ns: str) -> dict[str, Any] | None:
    obj = cluster.get_json("-n", ns, "hpa", NAME, check=False)
    return dict(obj) if obj else None


def _hpa_events(cluster: Any, ns: str) -> list[dict[str, Any]]:
    items = cluster.get_json("-n", ns, "events", "--field-selector", f"involvedObject.name={NAME}")["items"]
    return [e for e in items if e.get("involvedObject", {}).get("kind") == "HorizontalPodAutoscaler"]


def _ready_pods(real_node: RealNode, ns: str) -> dict[str, str]:
    out = {}
    for p in real_node.pods(ns, NAME):
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions") or []}
        if conds.get("Ready") == "True" and p["status"].get("podIP"):
            out[p["metadata"]["name"]] = p["status"]["podIP"]
    return out


def _crd_has_autoscaling(cluster: Any) -> bool:
    crd = cluster.get_json("crd", "modeldeployments.modelfit.io")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return "autoscaling" in spec


def test_hpa_scales_out_under_queued_requests_and_back_in(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, metrics: Pipeline, ns: str, model: Path
) -> None:
    if not _crd_has_autoscaling(cluster):
        pytest.fail("the ModelDeployment CRD has no spec.autoscaling", pytrace=False)
    url = model_server.serve(f"/{ns}/model.gguf", model)
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": MAX_REPLICAS,
        "targetUtilization": UTILIZATION,
        "scaleDownStabilizationSeconds": 0,
    }
    spec = pinned(
        model={"url": url, "sha256": sha256_of(model)},
        context=1024,
        parallel=PARALLEL,
        # One thread, one core requested: the real node (2 CPUs) holds MAX_REPLICAS pods, none oversubscribed.
        threads=1,
        autoscaling=autoscaling,
    )
    md = {"apiVersion": "modelfit.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": NAME, "namespace": ns}}
    cluster.apply({**md, "spec": spec})
    t_apply = time.monotonic()
    wait_condition(cluster, ns, NAME, "Ready", timeout=240, operator=operator)
    first = real_node.ready_pod(ns, NAME)
    ready_s = time.monotonic() - t_apply

    # The operator's HPA, as the contract says.
    hpa = cluster.wait_for(lambda: _hpa(cluster, ns), timeout=60, what="the HPA")
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref["name"] == NAME and ref["kind"] in ("Deployment", "ModelDeployment"), ref
    assert (hpa["spec"].get("minReplicas"), hpa["spec"]["maxReplicas"]) == (1, MAX_REPLICAS)
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == METRIC, m
    target = m["pods"]["target"]
    assert target["type"] == "AverageValue" and target["averageValue"] == f"{PARALLEL * UTILIZATION * 10}m", target
    down = (hpa["spec"].get("behavior") or {}).get("scaleDown") or {}
    assert down.get("stabilizationWindowSeconds") == 0, hpa["spec"].get("behavior")

    with PodTargets(cluster, metrics, ns, SELECTOR) as targets:
        # Idle first: the series of the first pod reaches the API and the HPA reads it (ScalingActive).
        cluster.wait_for(
            lambda: first["metadata"]["name"] in metrics.pod_metric(ns, METRIC, SELECTOR),
            timeout=60,
            interval=1,
            what=f"{METRIC} of {first['metadata']['name']} in custom.metrics.k8s.io",
        )

        def active() -> bool:
            h = _hpa(cluster, ns) or {}
            conds = {c["type"]: c["status"] for c in (h.get("status") or {}).get("conditions") or []}
            return conds.get("ScalingActive") == "True"

        cluster.wait_for(active, timeout=60, interval=1, what="HPA ScalingActive=True")
        idle = metrics.pod_metric(ns, METRIC, SELECTOR)
        assert all(v == 0 for v in idle.values()), idle

        def urls() -> list[str]:
            return [f"http://{ip}:8080" for name, ip in sorted(targets.pods.items()) if name in targets.ready]

        t: dict[str, float] = {}
        seen: dict[str, Any] = {}
        load = ChatLoad(urls, clients=CLIENTS, max_tokens=MAX_TOKENS)
        load.start()
        t0 = load.started
        wall0 = time.time()
        try:

            def metric_up() -> bool:
                vals = metrics.pod_metric(ns, METRIC, SELECTOR)
                if vals and max(vals.values()) > PARALLEL * UTILIZATION / 100:
                    seen["metric"] = vals
                    return True
                return False

            cluster.wait_for(metric_up, timeout=60, interval=0.5, what=f"{METRIC} above the target")
            t["metric visible"] = time.monotonic()

            def decided() -> bool:
                h = _hpa(cluster, ns) or {}
                st = h.get("status") or {}
                if int(st.get("desiredReplicas") or 0) >= 2:
                    seen["hpa"] = st
                    return True
                return False

            cluster.wait_for(decided, timeout=90, interval=0.5, what="HPA desiredReplicas >= 2")
            t["HPA decision"] = time.monotonic()
            cluster.wait_for(lambda: len(real_node.pods(ns, NAME)) >= 2, timeout=60, interval=0.5, what="a 2nd pod")
            t["new pod created"] = time.monotonic()
            ready = cluster.wait_for(
                lambda: len(_ready_pods(real_node, ns)) >= 2 and _ready_pods(real_node, ns),
                timeout=180,
                interval=1,
                what="a second Ready pod",
            )
            t["new pod Ready"] = time.monotonic()
            new = next(n for n in ready if n != first["metadata"]["name"])
            # The new replica serves (a request of its own, beside the load that reaches it through `urls`).
            r = chat_stream(f"http://{ready[new]}:8080", "Say hello.", 4)
            assert r.ok, f"the new pod {new} did not answer"
            t["new pod served"] = time.monotonic()
            cluster.wait_for(
                lambda: new in targets.ready and any(x.target.endswith(f"{ready[new]}:8080") for x in load.results),
                timeout=60,
                interval=1,
                what="load reaching the new pod",
            )

            def both() -> dict[str, float] | None:
                vals = metrics.pod_metric(ns, METRIC, SELECTOR)
                return vals if len(vals) >= 2 and all(v > 0 for v in vals.values()) else None

            # The new pod's own series reaches the API (adapter relist) while the load is spread over both.
            during = cluster.wait_for(both, timeout=30, interval=1, what=f"{METRIC} of both pods under load")
            t["new pod's metric visible"] = time.monotonic()
            hpa_during = (_hpa(cluster, ns) or {}).get("status") or {}
        finally:
            load.stop()
        t["load stopped"] = load.stopped
        t["requests done"] = load.drained

        def drained() -> bool:
            vals = metrics.pod_metric(ns, METRIC, SELECTOR)
            return bool(vals) and all(v == 0 for v in vals.values())

        cluster.wait_for(drained, timeout=60, interval=0.5, what=f"{METRIC} back to 0 on every pod")
        t["queue drained (metric 0)"] = time.monotonic()

        def scaled_in() -> bool:
            h = _hpa(cluster, ns) or {}
            return int((h.get("status") or {}).get("desiredReplicas") or 0) == 1

        cluster.wait_for(scaled_in, timeout=120, interval=0.5, what="HPA desiredReplicas back to 1")
        t["HPA scale-in decision"] = time.monotonic()
        cluster.wait_for(lambda: len(real_node.pods(ns, NAME)) == 1, timeout=120, interval=1, what="one pod left")
        t["one pod left"] = time.monotonic()

    events = _hpa_events(cluster, ns)
    rescales = [e for e in events if e.get("reason") == "SuccessfulRescale"]
    messages = [e.get("message", "") for e in rescales]
    assert any("New size: 2" in msg for msg in messages), messages
    assert any("New size: 1" in msg for msg in messages), messages
    assert not load.errors or len(load.errors) < len(load.results) / 10, f"{len(load.errors)} failed requests"
    s = load.summary()

    print(
        f"\n[hpa] apply -> first pod Ready {ready_s:.1f}s; target {target['averageValue']} per pod, {CLIENTS} clients"
    )
    print(f"[hpa] timeline (s after load start; HPA sync period {os.environ.get('MODELFIT_HPA_SYNC_PERIOD', '15s')}):")
    print("[hpa]   load start                      0.0")
    for k, v in t.items():
        print(f"[hpa]   {k:<31} {v - t0:5.1f}")
    print(f"[hpa] metric at scale-out {json.dumps(seen['metric'])}, with 2 pods {json.dumps(during)}")
    print(f"[hpa] HPA status at decision {json.dumps(seen['hpa'].get('currentMetrics'))}")
    print(f"[hpa] HPA status with 2 pods {json.dumps(hpa_during.get('currentMetrics'))}")
    for e in rescales:
        ts = e.get("lastTimestamp") or e.get("eventTime") or ""
        at = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() - wall0 if ts else float("nan")
        print(f"[hpa] event {ts} (+{at:.0f}s) {e['reason']}: {e.get('message')}")
    print(
        f"[hpa] load: {s['requests']} requests, {s['tok_s']:.0f} tok/s, TTFT p50 {s['ttft_p50']:.2f}s "
        f"p95 {s['ttft_p95']:.2f}s, latency p50 {s['lat_p50']:.2f}s; failed {len(load.errors)}; "
        f"wall clock at load start {time.strftime('%H:%M:%S', time.localtime(wall0))}"
    )
