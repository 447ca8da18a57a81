"""Real pods on one real node: the operator's own manifests run the real llama-server image.

What kwok cannot show: the image's entrypoint and arguments, the download init container, the
restricted securityContext, probes, a memory limit as a real cgroup, OOM kills, Pod Security
admission, and the operator itself running in the cluster under its chart's RBAC.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from _realnode import (
    NODE_LABEL,
    NODE_TAINT,
    RealNode,
    drop_page_cache,
    host_path_dir,
    http,
    pinned,
    prompt_of,
    sha256_of,
)
from _support import HOST_CACHE_ROOT, REPO, condition, free_port, md, wait_condition
from modelfit_dev.synth import ensure_model

pytestmark = pytest.mark.realnode
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def qwen35() -> Path:
    """The seed's architecture and shapes (Qwen3.5 0.8B hybrid) at Q4_0, random weights."""
    return ensure_model("qwen35-0.8b", "Q4_0")


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_model("llama-tiny", "F16")


def status(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("-n", ns, "modeldeployment", name).get("status") or {})


def test_seed_shape_serves_chat_and_authenticated_metrics(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, qwen35: Path
) -> None:
    """The seed's ModelDeployment (qwen35 0.8B Q4_0, full context) over HTTP with sha256 and an API key."""
    # A Prometheus Operator stack: the operator then renders an authenticated PodMonitor.
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "e2e" / "podmonitor-crd.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/podmonitors.monitoring.coreos.com", "--timeout=60s")
    operator.stop()
    operator.start()
    key = uuid.uuid4().hex
    cluster.kubectl("-n", ns, "create", "secret", "generic", "llm-key", f"--from-literal=api-key={key}")
    url = model_server.serve(f"/{ns}/Qwen3.5-0.8B-Q4_0.gguf", qwen35)
    t0 = time.monotonic()
    cluster.apply(
        md("seed", ns, **pinned(model={"url": url, "sha256": sha256_of(qwen35)}, apiKeySecretRef={"name": "llm-key"}))
    )
    obj = wait_condition(cluster, ns, "seed", "Ready", timeout=300, operator=operator)
    ready_s = time.monotonic() - t0
    plan = obj["status"]["plan"]
    assert plan["context"] == 262144 and plan["nodeClass"]
    pod = real_node.ready_pod(ns, "seed")
    out = real_node.chat(pod, "Say hello.", key=key)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["message"]["content"] is not None
    assert http(f"{real_node.base_url(pod)}/v1/models")[0] == 401  # the key is enforced
    # Scrape as Prometheus would from the PodMonitor: its port, path and Bearer credentials Secret.
    pm = cluster.get_json("-n", ns, "podmonitor", "seed")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    cred = ep["authorization"]["credentials"]
    secret = cluster.get_json("-n", ns, "secret", cred["name"])
    token = base64.b64decode(secret["data"][cred["key"]]).decode()
    port = next(p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == ep["port"])
    code, text = http(f"http://{pod['status']['podIP']}:{port}{ep['path']}", key=token)
    assert code == 200 and "llamacpp:prompt_tokens_total" in text, text[:300]
    assert http(f"http://{pod['status']['podIP']}:{port}{ep['path']}")[0] == 401
    annotations = pod["metadata"]["annotations"]
    assert annotations.get("prometheus.io/scrape") == "false"  # no unauthenticated scrape that would 401
    print(f"\n[realnode] seed: apply -> Ready {ready_s:.1f}s; memory request {plan['memoryRequest']}")


@pytest.mark.parametrize("load_mode", ["none", "mmap"])
def test_cgroup_peak_matches_the_plan(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, qwen35: Path, load_mode: str
) -> None:
    """After a prompt that fills a ubatch, the container's cgroup peak against memory.total_bytes.

    memory.max_usage_in_bytes of the llama-server container's cgroup (cgroup v1) is what its limit is held
    to: anonymous memory plus the page cache charged to it. Less the charged page cache nothing maps (the
    model file's header and the tail the loader unmapped, under mmap: clean pages the kernel reclaims at
    the limit before anything else), it is never above the predicted peak and at most 3% under it (the
    peak counts a full context; this prompt fills about a quarter). Measured here: none -1.58% (raw peak
    +17.4%: 145 MiB of the file read() charged); under mmap the downloader's sha256 check reads the cached file
    first, so its pages are charged to the init container: there VmHWM is held to it (-0.76%; the container's
    charge -25%). Before the downloader verified cached files: mmap -0.54% (raw +0.87%, 14.5 MiB unmapped);
    the same plan in a cgroup of its own on the development host (modelfit_dev.probe): -1.92% and -0.97%.
    """
    name = f"mem-{load_mode}"
    shutil.rmtree(host_path_dir(ns, name), ignore_errors=True)
    url = model_server.serve(f"/{ns}/qwen35.gguf", qwen35)
    cache = {"hostPath": {"path": str(HOST_CACHE_ROOT)}}
    spec = pinned(model={"url": url}, context=8192, loadMode=load_mode, modelCache=cache)
    if load_mode == "mmap":
        # First let a pod download the file, then measure a pod whose llama-server is the first to touch it.
        cluster.apply(md(name, ns, **spec))
        wait_condition(cluster, ns, name, "Ready", timeout=300, operator=operator)
        scale = ["-n", ns, "patch", "modeldeployment", name, "--type=merge", "-p"]
        cluster.kubectl(*scale, '{"spec": {"replicas": 0}}')
        # Wait for the old pod to be gone for good: a process still mapping the file keeps its pages cached.
        cluster.wait_for(lambda: not real_node.pods(ns, name, terminating=True), timeout=120, what="pods gone")
        drop_page_cache()
        cluster.kubectl(*scale, '{"spec": {"replicas": 1}}')
    else:
        cluster.apply(md(name, ns, **spec))
    wait_condition(cluster, ns, name, "Ready", timeout=300, operator=operator)
    pod = real_node.ready_pod(ns, name)
    real_node.chat(pod, prompt_of(700))
    used = real_node.usage(pod)
    mem = status(cluster, ns, name)["plan"]["memory"]
    limit = pod["spec"]["containers"][0]["resources"]["limits"]["memory"]
    total = int(mem["totalBytes"])
    unmapped_cache = max(used.cache - used.mapped_file, 0)
    peak = used.cgroup_peak - unmapped_cache
    err = peak / total - 1
    print(
        f"\n[realnode] memory {load_mode}: predicted {total / MiB:.1f} MiB, cgroup peak {used.cgroup_peak / MiB:.1f} "
        f"MiB ({used.cgroup_peak / total - 1:+.2%}), less {unmapped_cache / MiB:.1f} MiB unmapped page cache "
        f"{peak / MiB:.1f} MiB ({err:+.2%}), VmHWM {used.vm_hwm / MiB:.1f} MiB ({used.vm_hwm / total - 1:+.2%}), "
        f"rss {used.rss / MiB:.0f} MiB, mapped file {used.mapped_file / MiB:.0f} MiB, limit {limit}, failcnt {used.failcnt}"
    )
    if load_mode == "mmap":
        # The downloader verifies the cached file (its sha256, recorded from the first download) before
        # llama-server starts, so the file's pages are charged to the init container's cgroup, not to this
        # one: here the check is what llama-server maps and touches (VmHWM, file pages included), and the
        # container's charge is never above the plan.
        hwm = used.vm_hwm / total - 1
        assert -0.03 <= hwm <= 0.0 and err <= 0.0, (
            f"VmHWM {used.vm_hwm} vs predicted {total} ({hwm:+.2%}); cgroup peak less cache {err:+.2%}"
        )
    else:
        assert -0.03 <= err <= 0.0, (
            f"cgroup peak {used.cgroup_peak} less {unmapped_cache} vs predicted {total} ({err:+.2%})"
        )
    if load_mode == "mmap":
        # The weights are clean file pages: hitting the limit would mean evicting them (thrashing). Here
        # they are mapped by llama-server (VmHWM above), charged to whichever cgroup read them first.
        # Under none, hitting it only reclaims the page cache read() left behind, which is harmless.
        assert used.vm_hwm > 0.8 * int(mem["weightsFileBytes"] or 0), "the weights are not mapped"
        assert used.failcnt == 0, "the planned limit was hit"


def test_oom_kill_is_reported_and_converges(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, qwen35: Path
) -> None:
    """A memory override far below the plan with loadMode none: the kernel kills it, the operator recovers."""
    url = model_server.serve(f"/{ns}/qwen35.gguf", qwen35)
    t0 = time.monotonic()
    cluster.apply(
        md(
            "oom",
            ns,
            **pinned(model={"url": url}, context=4096, loadMode="none", resources={"limits": {"memory": "96Mi"}}),
        )
    )
    obj = wait_condition(cluster, ns, "oom", "Planned", reason="MemoryOverrideIgnored", timeout=300, operator=operator)
    killed_s = time.monotonic() - t0
    assert obj["status"]["oomKills"] >= 1 and obj["status"]["memoryOverrideRejected"] == 96 * MiB
    assert "OOM-killed" in condition(obj, "Planned")["message"]
    wait_condition(cluster, ns, "oom", "Ready", timeout=300, operator=operator)
    pod = real_node.ready_pod(ns, "oom")
    assert (
        pod["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == obj["status"]["plan"]["resources"]["limits"]["memory"]
    )
    real_node.chat(pod, "hello")
    events = cluster.get_json("-n", ns, "events")["items"]
    ooms = [e for e in events if "OOM" in (e.get("message") or "") or e.get("reason") == "OOMKilling"]
    restarts = sum(int(c.get("restartCount") or 0) for c in pod["status"]["containerStatuses"])
    final = status(cluster, ns, "oom")
    assert final["oomKills"] <= 2, final
    print(
        f"\n[realnode] oom: OOMKilled and reported after {killed_s:.1f}s, Ready {time.monotonic() - t0:.1f}s after apply; "
        f"oomKills {final['oomKills']}, restarts of the final pod {restarts}, OOM events {len(ooms)}"
    )


def test_tight_limit_under_mmap_is_not_applied(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, qwen35: Path
) -> None:
    """Under mmap a limit below the plan is never OOM-killed, it thrashes: the operator does not apply it."""
    url = model_server.serve(f"/{ns}/qwen35.gguf", qwen35)
    cluster.apply(
        md(
            "tight",
            ns,
            **pinned(model={"url": url}, context=4096, loadMode="mmap", resources={"limits": {"memory": "256Mi"}}),
        )
    )
    obj = wait_condition(cluster, ns, "tight", "Ready", timeout=300, operator=operator)
    c = condition(obj, "Planned")
    assert c["reason"] == "MemoryOverrideIgnored" and "thrashes" in c["message"]
    pod = real_node.ready_pod(ns, "tight")
    limit = pod["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit == obj["status"]["plan"]["resources"]["limits"]["memory"]
    t = time.monotonic()
    real_node.chat(pod, prompt_of(100))
    usage = real_node.usage(pod)
    print(
        f"\n[realnode] mmap tight override: limit kept at {limit}; 100-token prompt in {time.monotonic() - t:.1f}s, failcnt {usage.failcnt}"
    )
    assert usage.failcnt == 0


def test_downloads(cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path) -> None:
    """Wrong sha256, a download cut half-way, a server without Range, a corrupt cached file, hostPath cache
    (content-addressed under the allowed root), and a hostPath outside the allowed roots refused."""
    sha = sha256_of(tiny)
    root = str(HOST_CACHE_ROOT)
    cases = {
        "badsum": (model_server.serve(f"/{ns}/bad.gguf", tiny), "0" * 64, None),
        "cut": (model_server.serve(f"/{ns}/cut.gguf", tiny, cut_first=1), sha, None),
        "norange": (model_server.serve(f"/{ns}/norange.gguf", tiny, ranges=False), sha, None),
        "cached": (model_server.serve(f"/{ns}/cached.gguf", tiny), sha, root),
        # The reproduction: /etc as the cache and a URL ending in passwd (with a size that differs).
        "escape": (model_server.serve(f"/{ns}/passwd", tiny), sha, "/etc"),
    }
    # A corrupt file already in the node's cache, with the right size: it must be verified, not served.
    cached_dir = host_path_dir(ns, "cached", sha)
    shutil.rmtree(cached_dir, ignore_errors=True)
    cached_dir.mkdir(parents=True)
    bad = bytearray(tiny.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (cached_dir / "cached.gguf").write_bytes(bytes(bad))
    for name, (url, sum_, cache) in cases.items():
        # Four pods at once on a 2-CPU node: one thread and a quarter core each (the plan alone asks for 2 cores).
        spec = pinned(
            model={"url": url, "sha256": sum_}, context=512, threads=1, resources={"requests": {"cpu": "250m"}}
        )
        if cache is not None:
            spec["modelCache"] = {"hostPath": {"path": cache}}
        cluster.apply(md(name, ns, **spec))
    passwd = Path("/etc/passwd").read_bytes()
    obj = wait_condition(
        cluster, ns, "escape", "Planned", status="False", reason="HostPathNotAllowed", operator=operator
    )
    assert "not an allowed cache root" in condition(obj, "Planned")["message"], condition(obj, "Planned")
    assert cluster.get_json("-n", ns, "deployment", "escape", check=False) is None
    assert not model_server.gets(f"/{ns}/passwd") and Path("/etc/passwd").read_bytes() == passwd
    obj = wait_condition(
        cluster, ns, "badsum", "Degraded", reason="ModelDownloadFailed", timeout=180, operator=operator
    )
    assert "ChecksumMismatch" in condition(obj, "Degraded")["message"]
    cluster.kubectl("-n", ns, "delete", "modeldeployment", "badsum", "--wait=false")
    results = {"badsum": condition(obj, "Degraded")["message"][:90]}
    for name in ("cut", "norange", "cached"):
        wait_condition(cluster, ns, name, "Ready", timeout=240, operator=operator)
        pod = real_node.ready_pod(ns, name)
        real_node.chat(pod, "hi", max_tokens=2)
        gets = model_server.gets(f"/{ns}/{name}.gguf")
        results[name] = f"Ready after {len(gets)} GETs ({', '.join(str(g.range) for g in gets)})"
        cluster.kubectl("-n", ns, "delete", "modeldeployment", name, "--wait=false")
    cut = model_server.gets(f"/{ns}/cut.gguf")
    assert any(g.range and not g.range.startswith("bytes=0-") for g in cut), "the cut download did not resume"
    assert sha256_of_bytes((cached_dir / "cached.gguf").read_bytes()) == sha
    assert model_server.gets(f"/{ns}/cached.gguf"), "the corrupt cached file was served without a download"
    owner = (cached_dir / "cached.gguf").stat().st_uid
    assert owner == 1000, "hostPath cache file not written by the downloader uid"
    for k, v in results.items():
        print(f"\n[realnode] download {k}: {v}")


def test_api_key_rotation_rolls_the_pods(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path
) -> None:
    """A changed API-key Secret: the operator rolls the pods (it reads the Secret by name every 10 s); measured:
    time until the new key works, and until the old one fails on every Ready pod."""
    old, new = uuid.uuid4().hex, uuid.uuid4().hex

    def key_secret(value: str) -> dict[str, Any]:
        data = {"api-key": base64.b64encode(value.encode()).decode()}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rot-key", "namespace": ns}, "data": data}

    cluster.apply(key_secret(old))
    url = model_server.serve(f"/{ns}/rot.gguf", tiny)
    spec = pinned(model={"url": url}, context=512, threads=1, apiKeySecretRef={"name": "rot-key"})
    cluster.apply(md("rot", ns, **spec))
    wait_condition(cluster, ns, "rot", "Ready", timeout=240, operator=operator)
    pod = real_node.ready_pod(ns, "rot")
    assert http(f"{real_node.base_url(pod)}/v1/models", key=old)[0] == 200
    assert http(f"{real_node.base_url(pod)}/v1/models", key=new)[0] == 401

    def answers(key: str) -> list[int]:
        ready = [p for p in real_node.pods(ns, "rot") if p["status"].get("podIP") and _ready(p)]
        return [http(f"{real_node.base_url(p)}/v1/models", key=key, timeout=5)[0] for p in ready]

    t0 = time.monotonic()
    cluster.apply(key_secret(new))
    cluster.wait_for(lambda: 200 in answers(new), timeout=180, interval=0.5, what="the new key accepted")
    new_works = time.monotonic() - t0
    cluster.wait_for(lambda: set(answers(old)) == {401}, timeout=120, interval=0.5, what="the old key refused")
    old_fails = time.monotonic() - t0
    events = cluster.kubectl("-n", ns, "get", "events", "--field-selector", "reason=ApiKeyRotated").stdout
    assert "rolling the pods" in events, events
    print(
        f"\n[realnode] API key rotation: new key works after {new_works:.1f}s, old key refused after {old_fails:.1f}s"
    )


def test_first_verified_download_is_recorded_and_holds_later_pods(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path, tmp_path: Path
) -> None:
    """No sha256 in the spec: the first pod's verified download reports its digest, the operator records it in
    status.modelDigest (no roll), and a later pod whose download differs (the file changed under the same URL)
    is refused with ChecksumMismatch."""
    url = model_server.serve(f"/{ns}/tofu.gguf", tiny)
    cluster.apply(md("tofu", ns, **pinned(model={"url": url}, context=512, threads=1)))
    wait_condition(cluster, ns, "tofu", "Ready", timeout=240, operator=operator)
    first = real_node.ready_pod(ns, "tofu")

    def recorded() -> dict[str, Any] | None:
        return status(cluster, ns, "tofu").get("modelDigest")

    rec = cluster.wait_for(recorded, timeout=60, interval=1, what="status.modelDigest")
    assert rec["sha256"] == [sha256_of(tiny)] and rec["url"] == url and rec["pod"] == first["metadata"]["name"]
    assert [p["metadata"]["name"] for p in real_node.pods(ns, "tofu")] == [first["metadata"]["name"]]  # no roll
    changed = tmp_path / "changed.gguf"
    data = bytearray(tiny.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    model_server.serve(f"/{ns}/tofu.gguf", changed)
    cluster.kubectl("-n", ns, "delete", "pod", first["metadata"]["name"], "--wait=false")
    obj = wait_condition(cluster, ns, "tofu", "Degraded", reason="ModelDownloadFailed", timeout=180, operator=operator)
    assert "ChecksumMismatch" in condition(obj, "Degraded")["message"], condition(obj, "Degraded")
    print(
        f"\n[realnode] trust on first use: recorded {rec['sha256'][0][:12]} from {rec['pod']}; a changed file refused"
    )


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pod_security_restricted(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path
) -> None:
    """Every pod the operator makes is admitted by `enforce: restricted` and runs."""
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", "--overwrite")
    url = model_server.serve(f"/{ns}/tiny.gguf", tiny)
    cluster.apply(md("pss", ns, **pinned(model={"url": url}, context=512)))
    wait_condition(cluster, ns, "pss", "Ready", timeout=180, operator=operator)
    real_node.chat(real_node.ready_pod(ns, "pss"), "hi", max_tokens=2)
    failed = [e for e in cluster.get_json("-n", ns, "events")["items"] if e.get("reason") == "FailedCreate"]
    assert not failed, [e.get("message") for e in failed]


def test_a_full_node_gets_a_pending_pod_that_runs_when_room_frees(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path
) -> None:
    """Two models that each ask for the real node's 2 CPUs: the second is planned for the node as if empty
    (WaitingForNode), its pod pends on the real scheduler, and runs once the first is deleted, with no re-plan."""
    url = model_server.serve(f"/{ns}/tiny.gguf", tiny)
    cluster.apply(md("first", ns, **pinned(model={"url": url}, context=512, threads=2)))
    wait_condition(cluster, ns, "first", "Ready", timeout=180, operator=operator)
    cluster.apply(md("second", ns, **pinned(model={"url": url}, context=512, threads=2)))
    obj = wait_condition(
        cluster, ns, "second", "Unschedulable", "True", "WaitingForNode", timeout=60, operator=operator
    )
    planned = condition(obj, "Planned")
    assert planned["status"] == "True" and "no present node has room now" in planned["message"], planned
    plan_hash = obj["status"]["plan"]["hash"]

    def pending() -> dict[str, Any] | None:
        for p in real_node.pods(ns, "second"):
            sched = next((c for c in p["status"].get("conditions") or [] if c["type"] == "PodScheduled"), {})
            if sched.get("reason") == "Unschedulable" and "cpu" in sched.get("message", ""):
                return p
        return None

    waiting = cluster.wait_for(pending, timeout=60, what="the second pod pending for CPU")
    t0 = time.monotonic()
    cluster.kubectl("-n", ns, "delete", "modeldeployment", "first", "--wait=false")
    pod = real_node.ready_pod(ns, "second", timeout=180)
    print(f"\n[realnode] first deleted -> second's pending pod Ready in {time.monotonic() - t0:.1f}s")
    assert pod["metadata"]["uid"] == waiting["metadata"]["uid"]  # the pod that waited, not a re-planned one
    obj = wait_condition(cluster, ns, "second", "Ready", timeout=60, operator=operator)
    assert obj["status"]["plan"]["hash"] == plan_hash
    real_node.chat(pod, "hi", max_tokens=2)


def test_operator_restart_keeps_serving_pods(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path
) -> None:
    url = model_server.serve(f"/{ns}/tiny.gguf", tiny)
    cluster.apply(md("keep", ns, **pinned(model={"url": url}, context=512)))
    wait_condition(cluster, ns, "keep", "Ready", timeout=180, operator=operator)
    before = real_node.ready_pod(ns, "keep")
    operator.kill()
    operator.start()
    time.sleep(20)  # several resync ticks of the new process
    after = real_node.ready_pod(ns, "keep")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [c["restartCount"] for c in after["status"]["containerStatuses"]] == [0]
    for kind in ("deployments", "services", "replicasets"):
        items = cluster.get_json("-n", ns, kind)["items"]
        assert len(items) == 1, f"{kind}: {[i['metadata']['name'] for i in items]}"
    real_node.chat(after, "hi", max_tokens=2)


def test_operator_in_cluster_with_its_chart(
    cluster: Any, operator: Any, real_node: RealNode, model_server: Any, ns: str, tiny: Path
) -> None:
    """`helm install charts/modelfit` with the locally built operator image, under its ServiceAccount."""
    helm = shutil.which("helm", path=str(Path(cluster.kubectl_bin).parent))
    if helm is None:
        pytest.fail("helm not built (e2e/build.sh helm)")
    server = json.loads(cluster.kubectl("config", "view", "--minify", "-o", "json").stdout)["clusters"][0]["cluster"]
    api_port = server["server"].rsplit(":", 1)[1]
    values = {
        "image": {"repository": "localhost/modelfit/operator", "tag": "dev"},  # IfNotPresent: never pulled
        "hostNetwork": True,  # the API server listens on 127.0.0.1 only, and there is no kube-proxy
        "replicaCount": 1,  # one node and the host's ports: one replica (it still takes the leader Lease)
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
        ],
        "health": {"port": free_port()},
        "metrics": {"port": free_port(), "service": {"enabled": False}},
        "logFormat": "plain",
        "nodeSelector": {NODE_LABEL: "true"},
        "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    }
    vfile = Path(f"/tmp/{ns}-values.json")
    vfile.write_text(json.dumps(values))
    operator.stop()  # one operator at a time
    release = "modelfit"
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [helm, "install", release, str(REPO / "charts" / "modelfit"), "-n", "modelfit-system",
             "--create-namespace", "-f", str(vfile), "--wait", "--timeout", "180s"],
            capture_output=True, text=True, env=cluster.env, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr + proc.stdout
        up_s = time.monotonic() - t0
        url = model_server.serve(f"/{ns}/tiny.gguf", tiny)
        cluster.apply(md("incluster", ns, **pinned(model={"url": url}, context=512)))
        wait_condition(cluster, ns, "incluster", "Ready", timeout=180)
        logs = cluster.kubectl("-n", "modelfit-system", "logs", "deploy/modelfit", check=False).stdout
        assert "forbidden" not in logs.lower() and "Traceback" not in logs, logs[-3000:]
        sa = cluster.get_json("-n", "modelfit-system", "pods", "-l", "app.kubernetes.io/name=modelfit")["items"][0]
        assert sa["spec"]["serviceAccountName"] == "modelfit"
        lease = cluster.get_json("-n", "modelfit-system", "lease", "modelfit")
        assert lease["spec"]["holderIdentity"].startswith(sa["metadata"]["name"]), lease["spec"]
        print(f"\n[realnode] operator via helm: install --wait {up_s:.1f}s; ModelDeployment Ready through it")
    finally:
        subprocess.run(
            [helm, "uninstall", release, "-n", "modelfit-system", "--wait", "--timeout", "120s"],
            capture_output=True, env=cluster.env, timeout=180,
        )  # fmt: skip
        operator.start()
