"""Scale to zero on the real node (issue 16, items 2 and 4): a routed ModelDeployment with autoscaling.minReplicas 0
goes to zero pods after a shortened idle period, keeps its plan, picker and edge; 20 concurrent requests to it at
zero are held by the picker (GIE v1.5.0 flow control), wake it with one scale-up, and are all answered. The model
file is in a node cache (hostPath under the operator's allowed root), as the plan advises for such a model. The
harness gives the picker's pod the host's network and the API server's address, as in the routing scenario; the
operator reads the picker's /metrics at that pod's address.
"""

from __future__ import annotations

import datetime
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from _realnode import RealNode
from _support import HOST_CACHE_ROOT, wait_condition
from test_routing_realnode import NAME, Edge, apply_routed, small  # noqa: F401 - small is a fixture

pytestmark = pytest.mark.realnode
IDLE_S = 20


def _live_pods(real_node: RealNode, ns: str) -> list[dict[str, Any]]:
    return [p for p in real_node.pods(ns, NAME) if not p["metadata"].get("deletionTimestamp")]


def _stages(pod: dict[str, Any], since: float) -> str:
    """Seconds from ``since`` (wall) to the woken pod's creation, scheduling, init containers done (the model file
    verified), llama-server started and Ready."""

    def at(stamp: str | None) -> str:
        if not stamp:
            return "?"
        t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        return f"{max(t - since, 0.0):.0f}"  # whole seconds: a stamp of the burst's own second reads 0

    st = pod["status"]
    cond = {c["type"]: c.get("lastTransitionTime") for c in st.get("conditions") or []}
    inits = [
        (c.get("state") or {}).get("terminated", {}).get("finishedAt") for c in st.get("initContainerStatuses") or []
    ]
    server = next((c for c in st.get("containerStatuses") or [] if c["name"] == "llama-server"), {})
    started = ((server.get("state") or {}).get("running") or {}).get("startedAt")
    return (
        f"created {at(pod['metadata']['creationTimestamp'])}, scheduled {at(cond.get('PodScheduled'))}, "
        f"init done {at(max((x for x in inits if x), default=None))}, llama-server started {at(started)}, "
        f"Ready {at(cond.get('Ready'))}"
    )


def test_an_idle_model_goes_to_zero_and_a_held_burst_wakes_it_once(
    cluster: Any,
    operator: Any,
    real_node: RealNode,
    model_server: Any,
    ns: str,
    small: Path,  # noqa: F811
) -> None:
    key = apply_routed(
        cluster,
        ns,
        model_server,
        small,
        parallel=2,
        replicas=1,
        autoscaling={"minReplicas": 0, "maxReplicas": 2, "idleSeconds": IDLE_S},
        modelCache={"hostPath": {"path": str(HOST_CACHE_ROOT)}},  # the file stays on the node: a wake reads it
    )
    obj = wait_condition(cluster, ns, NAME, "Ready", timeout=300, operator=operator)
    assert obj["status"]["scaleToZero"]["state"] == "Active"
    cluster.kubectl("-n", ns, "rollout", "status", f"deploy/{NAME}-epp", "--timeout=180s", timeout=200)
    edge = Edge(cluster, ns, 8081, key)
    cluster.wait_for(lambda: edge.chat("warm", "hi", "hi")[0] == 200, timeout=120, interval=1, what="the edge serves")
    last_request = time.monotonic()

    # 1. Idle for idleSeconds: zero pods, the plan kept, Ready (ScaledToZero), the HPA's floor still 1.
    def at_zero() -> dict[str, Any] | None:
        got = cluster.get_json("-n", ns, "modeldeployment", NAME)
        st = got.get("status") or {}
        done = (st.get("scaleToZero") or {}).get("state") == "Zero" and not _live_pods(real_node, ns)
        return got if done else None

    try:
        obj = cluster.wait_for(at_zero, timeout=IDLE_S + 90, interval=1, what=f"{NAME} at zero")
    except TimeoutError:
        said = [line for line in operator.log_tail(2000).splitlines() if "picker" in line or "zero" in line]
        pickers = cluster.get_json("-n", ns, "pods", "-l", f"app.kubernetes.io/instance={NAME}-epp")["items"]
        ips = [p["status"].get("podIP") for p in pickers]
        raise AssertionError(f"not at zero; picker pods at {ips}; the operator said:\n" + "\n".join(said[-20:]))
    to_zero_s = time.monotonic() - last_request
    assert obj["spec"]["replicas"] == 0 and obj["status"]["plan"]["fits"]
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    assert cluster.get_json("-n", ns, "hpa", NAME)["spec"]["minReplicas"] == 1
    assert cluster.get_json("-n", ns, "deploy", f"{NAME}-epp")["spec"]["replicas"] == 1  # the picker holds
    wakes_before = obj["status"]["scaleToZero"].get("wakes", 0)
    print(f"\n[zero] last request -> zero pods: {to_zero_s:.0f} s (idleSeconds {IDLE_S})")

    # 2. 20 concurrent requests at zero: held, one pod started, every one answered.
    seen_pods: set[str] = set()
    stop = threading.Event()

    def watch_pods() -> None:
        while not stop.is_set():
            seen_pods.update(p["metadata"]["name"] for p in real_node.pods(ns, NAME))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    results: dict[int, tuple[int, float]] = {}
    bodies: dict[int, str] = {}

    def one(i: int) -> None:
        t = time.monotonic()
        code, body = edge.chat(f"wake-{i}", f"wake {i}", "q")
        results[i] = (code, time.monotonic() - t)
        if code != 200:
            bodies[i] = body[:300]

    t0, wall0 = time.monotonic(), time.time()
    burst = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for th in burst:
        th.start()
    for th in burst:
        th.join(timeout=300)
    stop.set()
    watcher.join(timeout=5)
    codes = sorted(code for code, _ in results.values())
    took = sorted(s for _, s in results.values())
    print(
        f"[zero] 20 held requests at zero: {codes.count(200)}/20 answered; request -> answer p50 "
        f"{statistics.median(took):.1f} s, max {took[-1]:.1f} s; pods started {sorted(seen_pods)}; "
        f"burst wall {time.monotonic() - t0:.1f} s"
    )
    assert codes == [200] * 20, (results, bodies)
    assert len(seen_pods) == 1, seen_pods  # one scale-up for the whole burst
    obj = cluster.get_json("-n", ns, "modeldeployment", NAME)
    st = obj["status"]["scaleToZero"]
    assert st["state"] == "Active" and st["wakes"] == wakes_before + 1, st
    assert obj["spec"]["replicas"] == 1
    (woken,) = [p for p in real_node.pods(ns, NAME) if p["metadata"]["name"] in seen_pods]
    print(f"[zero] the wake by stage, from the burst (API timestamps: whole seconds): {_stages(woken, wall0)}")
    print(f"[zero] first answer {took[0]:.1f} s after the burst")
    measured = obj["status"].get("coldStart", {})
    print(
        f"[zero] cold start predicted {measured.get('predictedSeconds')} s (warm page cache "
        f"{measured.get('predictedWarmSeconds')} s), measured {measured.get('lastMeasuredSeconds')} s"
    )


def test_a_pod_still_downloading_is_never_scaled_down(
    cluster: Any,
    operator: Any,
    real_node: RealNode,
    model_server: Any,
    ns: str,
    small: Path,  # noqa: F811
) -> None:
    """KServe's failure mode: a pod scaled away before it was ever Ready. With idleSeconds 10 and a first start
    that downloads for about 20 s, the one pod stays until Ready; idleSeconds after its Ready the model goes to
    zero."""
    idle = 10
    apply_routed(
        cluster,
        ns,
        model_server,
        small,
        rate=small.stat().st_size // 20,
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "idleSeconds": idle},
        modelCache={"emptyDir": {}},  # a download on this start
    )
    uids: set[str] = set()
    deleting: list[str] = []
    replicas: set[int] = set()

    def ready_pod() -> dict[str, Any] | None:
        pods = real_node.pods(ns, NAME, terminating=True)
        uids.update(p["metadata"]["uid"] for p in pods)
        deleting.extend(p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp"))
        replicas.add(cluster.get_json("-n", ns, "modeldeployment", NAME)["spec"].get("replicas", 1))
        ready = [
            p
            for p in pods
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
        ]
        return ready[0] if ready else None

    pod = cluster.wait_for(ready_pod, timeout=300, interval=0.5, what=f"{NAME}'s first pod Ready")
    created = datetime.datetime.fromisoformat(pod["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    ready_at = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")["lastTransitionTime"]
    took = (datetime.datetime.fromisoformat(ready_at.replace("Z", "+00:00")) - created).total_seconds()
    print(f"\n[zero] a first start of {took:.0f} s (idleSeconds {idle}): pods {len(uids)}, deleted {deleting}")
    assert took > idle + 5, "the start was not longer than the idle period: the scenario proves nothing"
    assert len(uids) == 1 and not deleting and replicas == {1}, (uids, deleting, replicas)
    t0 = time.monotonic()

    def at_zero() -> bool:
        st = (cluster.get_json("-n", ns, "modeldeployment", NAME).get("status") or {}).get("scaleToZero") or {}
        return st.get("state") == "Zero"

    cluster.wait_for(at_zero, timeout=idle + 90, interval=1, what=f"{NAME} at zero after its idle period")
    print(f"[zero] Ready -> zero: {time.monotonic() - t0 + 0:.0f} s after the wait began")
