"""The cold start of the seed's shape by stage on the real node (issue 16, item 5): run by ``bench/coldstart_stages.py``
(not by the test command: its file name is not test_*). Qwen3.5 0.8B's shapes at Q4_0 (random weights), scaling to
zero, woken by one streamed request at its edge, three ways: the file in the node's hostPath cache with the page
cache warm, the same after dropping the page cache, and not cached (an emptyDir: every wake downloads it from the
harness's file server on the node bridge). Each stage is measured against the operator's prediction
(``status.coldStart``), from the request: pod created, scheduled, init containers done (the file fetched or its
sha256 verified), llama-server started, model loaded (its own log line), Ready, first token.

API timestamps are whole seconds; the model-loaded line (the container runtime's timestamp) and the first token
(the client's clock) are not. The kubelet's own log (``--v=2``) gives its view to the microsecond: when its PLEG
relist saw each container start and end, and its probes' results; ``MODELFIT_BENCH_KUBELET`` names the
file where those rows go.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from _realnode import NODE_DIR, RealNode, drop_page_cache
from _support import HOST_CACHE_ROOT, wait_condition
from modelfit_dev.synth import ensure_model
from test_routing_realnode import NAME, apply_routed

pytestmark = pytest.mark.realnode
IDLE_S = 10
RUNS = int(os.environ.get("MODELFIT_BENCH_RUNS", "2"))
OUT = Path(os.environ.get("MODELFIT_BENCH_OUT", "/tmp/coldstart-stages.md"))
KUBELET_OUT = Path(os.environ.get("MODELFIT_BENCH_KUBELET", "/tmp/coldstart-kubelet.md"))
KUBELET_LOG = NODE_DIR / "kubelet" / "kubelet.log"
_KLOG = re.compile(r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}\.\d{6})")


def _at(stamp: str | None, since: float) -> float | None:
    if not stamp:
        return None
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - since


def _loaded_at(cluster: Any, ns: str, pod: str, since: float) -> float | None:
    """When llama-server logged that the model was loaded (the runtime's timestamp of that line)."""
    logs = cluster.kubectl("-n", ns, "logs", pod, "-c", "llama-server", "--timestamps", check=False).stdout
    for line in logs.splitlines():
        if "model loaded" in line:
            stamp = line.split(" ", 1)[0]
            return datetime.datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp() - since
    return None


def _kubelet_saw(pod: dict[str, Any], since: float) -> list[tuple[float, str]]:
    """(seconds from ``since``, what) for each PLEG event and probe result the kubelet logged for ``pod``:
    its own clock to the microsecond (klog's local time, this machine's UTC). Container IDs are named from the
    pod's status."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    st = pod.get("status") or {}
    names = {
        str(c.get("containerID") or "").split("://")[-1]: c["name"]
        for c in list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])
        if c.get("containerID")
    }
    year = datetime.datetime.fromtimestamp(since, datetime.UTC).year
    out: list[tuple[float, str]] = []
    for line in KUBELET_LOG.read_text(errors="replace").splitlines():
        if f'pod="{ns}/{name}"' not in line or ("SyncLoop (PLEG)" not in line and "SyncLoop (probe)" not in line):
            continue
        m = _KLOG.match(line)
        if not m:
            continue
        mo, d, h, mi, sec = m.groups()
        t = datetime.datetime(year, int(mo), int(d), int(h), int(mi), tzinfo=datetime.UTC).timestamp()
        t += float(sec)
        if "SyncLoop (probe)" in line:
            probe = re.search(r'probe="(\w+)" status="([^"]*)"', line)
            what = f"{probe.group(1)} probe {probe.group(2) or 'unknown'}" if probe else "probe"
        else:
            ev = re.search(r'"Type":"(\w+)","Data":"(\w+)"', line)
            what = f"{ev.group(1)} {names.get(ev.group(2), 'sandbox')}" if ev else "PLEG"
        out.append((t - since, what))
    return out


def _first_token(port: int, key: str) -> tuple[int, float, float]:
    """A streamed request at the edge: its status, seconds to the first token, to the end."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    t0, first = time.monotonic(), 0.0
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=600) as r:
        status = r.status
        for line in r:
            if line.startswith(b"data: ") and b'"content"' in line and not first:
                first = time.monotonic() - t0
    return status, first, time.monotonic() - t0


def _wait_zero(cluster: Any, real_node: RealNode, ns: str) -> None:
    def zero() -> bool:
        st = (cluster.get_json("-n", ns, "modeldeployment", NAME).get("status") or {}).get("scaleToZero") or {}
        return st.get("state") == "Zero" and not real_node.pods(ns, NAME, terminating=True)

    cluster.wait_for(zero, timeout=IDLE_S + 180, interval=1, what=f"{NAME} at zero, its pod gone")


def test_cold_start_by_stage(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tmp_path: Path
) -> None:
    seed = ensure_model("qwen35-0.8b", "Q4_0")
    rows: list[str] = []
    kubelet_rows: list[str] = []
    for where in ("node cache", "not cached"):
        cache = {"hostPath": {"path": str(HOST_CACHE_ROOT)}} if where == "node cache" else {"emptyDir": {}}
        if where == "not cached":
            cluster.kubectl("-n", ns, "delete", "modeldeployment", NAME, "--wait=true", timeout=180)
            cluster.kubectl("-n", ns, "delete", "secret", "chat-key")
            cluster.wait_for(lambda: not real_node.pods(ns, NAME, terminating=True), timeout=120, what="pods gone")
        key = apply_routed(
            cluster,
            ns,
            model_server,
            seed,
            context=4096,
            parallel=1,
            resources={"requests": {"cpu": "1"}},
            autoscaling={"minReplicas": 0, "maxReplicas": 1, "idleSeconds": IDLE_S},
            modelCache=cache,
        )
        wait_condition(cluster, ns, NAME, "Ready", timeout=600, operator=operator)
        cluster.kubectl("-n", ns, "rollout", "status", f"deploy/{NAME}-epp", "--timeout=180s", timeout=200)
        conditions = ["page cache warm", "page cache cold"] if where == "node cache" else ["downloaded"]
        for run in range(RUNS):
            for cond in conditions:
                _wait_zero(cluster, real_node, ns)
                if cond == "page cache warm":
                    for f in HOST_CACHE_ROOT.rglob("*.gguf"):
                        with open(f, "rb") as fh:
                            while fh.read(1 << 24):
                                pass
                elif cond == "page cache cold":
                    drop_page_cache()
                wall = time.time()
                status, first, _ = _first_token(8081, key)
                assert status == 200
                (pod,) = real_node.pods(ns, NAME)
                st = pod["status"]
                conds = {c["type"]: c.get("lastTransitionTime") for c in st.get("conditions") or []}
                inits = [
                    (c.get("state") or {}).get("terminated", {}).get("finishedAt")
                    for c in st.get("initContainerStatuses") or []
                ]
                server = next(c for c in st["containerStatuses"] if c["name"] == "llama-server")
                started = ((server.get("state") or {}).get("running") or {}).get("startedAt")
                stages = [
                    _at(pod["metadata"]["creationTimestamp"], wall),
                    _at(conds.get("PodScheduled"), wall),
                    _at(max((x for x in inits if x), default=None), wall),
                    _at(started, wall),
                    _loaded_at(cluster, ns, pod["metadata"]["name"], wall),
                    _at(conds.get("Ready"), wall),
                    first,
                ]
                cs = cluster.get_json("-n", ns, "modeldeployment", NAME)["status"].get("coldStart") or {}
                predicted = cs.get("predictedWarmSeconds") if cond == "page cache warm" else cs.get("predictedSeconds")
                shown = " | ".join("?" if s is None else f"{max(s, 0.0):.1f}" for s in stages)
                row = f"| {where}, {cond} | {run + 1} | {shown} | {predicted:.1f} | {cs.get('lastMeasuredSeconds')} |"
                print(row, flush=True)
                rows.append(row)
                saw = " ; ".join(f"{what} {t:.2f}" for t, what in _kubelet_saw(pod, wall) if t >= -1)
                kubelet_rows.append(f"| {where}, {cond} | {run + 1} | {first:.2f} | {saw} |")
                print(kubelet_rows[-1], flush=True)
    size_mib = seed.stat().st_size / 2**20
    head = (
        f"Seed shape: {seed.name} ({size_mib:.0f} MiB), context 4096, 1 slot, 1 CPU requested, on the real node "
        f"(2 shared cores); seconds from the request, API stages in whole seconds.\n\n"
        "| where the file is | run | created | scheduled | init done | llama-server started | model loaded "
        "| Ready | first token | predicted Ready | measured Ready (status) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    OUT.write_text(head + "\n" + "\n".join(rows) + "\n")
    print("\n" + OUT.read_text())
    KUBELET_OUT.write_text(
        "What the kubelet saw (its log, seconds from the request): PLEG events and probe results.\n\n"
        "| where the file is | run | first token | kubelet saw |\n|---|---|---|---|\n" + "\n".join(kubelet_rows) + "\n"
    )
    print("\n" + KUBELET_OUT.read_text())
