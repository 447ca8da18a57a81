import asyncio
import logging

import pytest

from modelfit import api, handlers, kube, reconciler, sources
from modelfit.gguf_reader import GGUFError
from modelfit.kube import path_for
from modelfit.reconciler import OperatorState, reconcile, resync_loop

LOG = logging.getLogger("test")


def node(name, cpu="16", memory="64Gi", labels=None, gpus=0, gpu_mem=None, taints=None):
    lab = {"kubernetes.io/hostname": name, "kubernetes.io/arch": "amd64", **(labels or {})}
    alloc = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
        lab["nvidia.com/gpu.memory"] = str(gpu_mem)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": lab},
        "spec": {"taints": taints or []},
        "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": "True"}]},
    }


CPU_SMALL = node("cpu-small", "2", "4Gi")
CPU_LARGE = node("cpu-large", "16", "64Gi")
GPU = node(
    "gpu-24g",
    "8",
    "32Gi",
    gpus=1,
    gpu_mem=24576,
    taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
)


def md(spec, name="qwen", status=None, generation=1):
    return {
        "apiVersion": "modelfit.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default", "uid": "uid-1", "generation": generation},
        "spec": spec,
        "status": status or {},
    }


SEED = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 32768, "adapt": True}


class FakeKube:
    """Stores applied objects by path; lists nodes and pods; keeps the status writes (merge patches)."""

    def __init__(self, nodes, pods=()):
        self.nodes = list(nodes)
        self.pods = list(pods)
        self.objects = {}
        self.applies = 0
        self.deletes = []
        self.fail_apply = {}  # kind -> KubeError raised by apply
        self.fail_get = {}  # path -> KubeError raised by get
        self.status_writes = []  # (path, merge patch)

    async def create(self, path, body):
        return body

    async def list(self, path, **params):
        return list(self.nodes) if path.endswith("/nodes") else list(self.pods)

    async def get(self, path):
        if path in self.fail_get:
            raise self.fail_get[path]
        return self.objects.get(path)

    async def apply(self, obj):
        if obj["kind"] in self.fail_apply:
            raise self.fail_apply[obj["kind"]]
        self.applies += 1
        m = obj["metadata"]
        self.objects[path_for(obj["apiVersion"], obj["kind"], m["namespace"], m["name"])] = obj
        return obj

    async def delete(self, path):
        self.deletes.append(path)
        return self.objects.pop(path, None) is not None

    async def merge_patch(self, path, body):
        self.status_writes.append((path, body))
        return body


def status_path(name="qwen"):
    return path_for(api.API_VERSION, api.KIND, "default", name) + "/status"


def go(body, k, state):
    """One reconcile; its status patch, checked to be what it wrote (once, on the status subresource)."""
    before = len(k.status_writes)
    patch = asyncio.run(reconcile(body, LOG, k, state))
    name = body["metadata"]["name"]
    assert k.status_writes[before:] == ([(status_path(name), {"status": patch})] if patch else [])
    return patch


def _merge(old, patch):
    """``old`` with a status patch applied as the API server applies a merge patch: maps merge, null deletes."""
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = _merge(old[key] if isinstance(old.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def deploy_path(name="qwen"):
    return path_for("apps/v1", "Deployment", "default", name)


def test_create_plans_applies_and_reports():
    k, st = FakeKube([CPU_SMALL, CPU_LARGE]), OperatorState()
    patch = go(md(SEED), k, st)
    d = k.objects[deploy_path()]
    assert path_for("v1", "Service", "default", "qwen") in k.objects
    plan = patch["plan"]
    assert plan["backend"] == "cpu" and plan["context"] == 32768 and plan["nodeClass"] == "cpu-large"
    assert plan["model"].startswith("Qwen3.5-0.8B") and plan["quant"] == "Q4_0" and plan["memoryRequest"].endswith("Mi")
    assert d["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["-m", "/models/Qwen3.5-0.8B-Q4_0.gguf"]
    conds = {c["type"]: c for c in patch["conditions"]}
    assert conds["Planned"]["status"] == "True" and conds["Planned"]["reason"] == "Planned"
    assert conds["Ready"]["status"] == "False" and conds["Progressing"]["reason"] == "RollingOut"
    assert patch["endpoint"] == "http://qwen.default.svc:8080" and patch["observedGeneration"] == 1
    assert k.deletes == []  # before our first Deployment nothing of ours can exist: no DELETE of the absent PDB, HPA


def test_unchanged_plan_is_not_reapplied_and_node_change_rolls_out():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(SEED), k, st)
    first = k.applies
    k.objects[deploy_path()]["status"] = {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
    again = go(md(SEED, status=status), k, st)
    assert k.applies == first  # nothing written when nothing changed
    assert {c["type"]: c["status"] for c in again["conditions"]}["Ready"] == "True"
    # A GPU node arrives: backend auto re-plans to cuda with full offload.
    k.nodes.append(GPU)
    st.node_changed("ADDED", GPU)
    assert st.due(("default", "qwen"))
    gpu = go(md({**SEED, "backend": "auto"}, status={**status, **again}), k, st)
    plan = {**status["plan"], **gpu["plan"]}
    assert plan["backend"] == "cuda" and plan["gpuLayers"] == plan["totalLayers"]
    assert k.applies > first
    pod = k.objects[deploy_path()]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "gpu-24g"}


def test_own_pods_do_not_shrink_the_plan():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    status = go(md(SEED), k, st)
    running = {
        "metadata": {"name": "qwen-1", "namespace": "default", "labels": {"modelfit.io/modeldeployment": "qwen"}},
        "spec": {"nodeName": "cpu-small", "containers": [{"resources": {"requests": {"memory": "3Gi", "cpu": "2"}}}]},
        "status": {"phase": "Running"},
    }
    k.pods.append(running)
    st.snapshot.invalidate()
    again = go(md(SEED, status=status), k, st)
    assert again.get("plan", status["plan"])["context"] == status["plan"]["context"]


def test_a_status_that_does_not_parse_is_read_as_empty_and_written_over(caplog):
    """A hand-edited status (a condition of no known type, a count that is not a number) does not stop the
    reconcile: the decision reads it as empty, the log says so, and the status written replaces it."""
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    garbage = {"oomKills": "many", "conditions": [{"type": "Bogus", "status": "True", "reason": "x"}]}
    with caplog.at_level(logging.WARNING):
        patch = go(md(SEED, status=garbage), k, st)
    assert [r for r in caplog.records if "the status does not parse; read as empty" in r.getMessage()]
    assert patch["oomKills"] == 0 and patch["plan"]["nodeClass"] == "cpu-large"
    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Planned", "Progressing", "Degraded", "Unschedulable"]


def test_bad_spec_and_owned_flags_become_conditions():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    p = go(md({"model": {"url": "https://x/m.gguf"}, "context": "lots"}), k, st)
    planned = next(c for c in p["conditions"] if c["type"] == "Planned")
    assert planned["status"] == "False" and planned["reason"] == "InvalidSpec"
    p = go(md({**SEED, "serverArgs": ["--ctx-size=9", "--jinja"]}), k, st)
    planned = next(c for c in p["conditions"] if c["type"] == "Planned")
    assert planned["reason"] == "InvalidSpec" and "--ctx-size" in planned["message"]
    assert k.applies == 0


def test_unreadable_model(monkeypatch):
    def boom(url, *_):
        raise GGUFError(f"{url}: HTTP 404")

    monkeypatch.setattr(sources, "read_gguf", boom)
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    p = go(md({"model": {"url": "https://example.invalid/m.gguf"}}), k, st)
    conds = {c["type"]: c for c in p["conditions"]}
    assert conds["Planned"]["reason"] == "ModelUnreadable" and "404" in conds["Planned"]["message"]
    assert conds["Degraded"]["status"] == "True" and k.applies == 0


def test_nothing_fits_is_unschedulable():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    p = go(md({"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072}), k, st)
    conds = {c["type"]: c for c in p["conditions"]}
    assert conds["Unschedulable"]["status"] == "True" and conds["Unschedulable"]["reason"] == "NoNodeFits"
    assert p["plan"]["fits"] is False and k.applies == 0


def test_oom_raises_headroom_once():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(SEED), k, st)
    template = k.objects[deploy_path()]["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    k.pods.append(_oom_pod(template))
    p = go(md(SEED, status=status), k, st)
    assert p["plan"]["headroomBoost"] == 0.25 and p["oomKills"] == 1
    assert p["plan"]["memoryRequestBytes"] > status["plan"]["memoryRequestBytes"]
    merged = {**status, **p, "plan": {**status["plan"], **p["plan"]}}
    p2 = go(md(SEED, status=merged), k, st)
    assert "oomKills" not in p2 and p2.get("plan", {}).get("headroomBoost") is None  # old pods don't count twice


def test_failed_scheduling_with_adapt_moves_elsewhere():
    other = node("cpu-other", "8", "32Gi")
    k, st = FakeKube([CPU_LARGE, other]), OperatorState()
    status = go(md(SEED), k, st)
    first = status["plan"]["nodeClass"]
    pod_template = k.objects[deploy_path()]["spec"]["template"]
    k.pods.append(
        {
            "metadata": {
                "name": "qwen-1",
                "namespace": "default",
                "labels": {"modelfit.io/modeldeployment": "qwen"},
                "annotations": pod_template["metadata"]["annotations"],
            },
            "spec": {"nodeSelector": pod_template["spec"]["nodeSelector"]},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/2 nodes: Insufficient cpu",
                    }
                ],
            },
        }
    )
    p = go(md(SEED, status=status), k, st)
    assert p["plan"]["nodeClass"] != first
    unsched = next(c for c in p["conditions"] if c["type"] == "Unschedulable")
    assert unsched["reason"] == "FailedScheduling" and "Insufficient cpu" in unsched["message"]


def test_node_signature_changes():
    st = OperatorState()
    assert st.node_changed("ADDED", CPU_LARGE)
    assert not st.node_changed("MODIFIED", CPU_LARGE)  # heartbeats don't re-plan
    relabeled = {**CPU_LARGE, "metadata": {**CPU_LARGE["metadata"], "labels": {"x": "y"}}}
    assert st.node_changed("MODIFIED", relabeled)
    assert st.node_changed("DELETED", relabeled) and not st.node_changed("DELETED", relabeled)


def test_burst_plans_see_each_other_and_a_full_node_does_not_fit():
    """Plans made on one node list count each other's pods (reserved until the list shows them), and a node
    without the CPU a plan requests does not fit: the scheduler would refuse the pod."""
    hosts = [node(f"h{i}", "8", "32Gi") for i in range(2)]  # one class per host, 8 CPUs each
    k, st = FakeKube(hosts), OperatorState()
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 4096}
    patches = [go(md(spec, name=f"m{i}"), k, st) for i in range(5)]
    cpu = st.reservations[("default", "m0")].requests.cpu_millis
    per_host = 8000 // cpu
    planned = [p for p in patches if {c["type"]: c for c in p["conditions"]}["Planned"]["reason"] == "Planned"]
    fitting = [p["plan"]["nodeSelector"]["kubernetes.io/hostname"] for p in planned]
    # the node list never changed, yet no host gets more pods than its CPU holds
    assert sorted(set(fitting)) == ["h0", "h1"] and all(fitting.count(h) == per_host for h in ("h0", "h1"))
    # the fifth waits for room on a host (a pending pod the scheduler places when room frees up)
    last = {c["type"]: c for c in patches[-1]["conditions"]}
    assert (
        per_host * 2 < 5 and last["Planned"]["status"] == "True" and last["Unschedulable"]["reason"] == "WaitingForNode"
    )
    assert "short by" in last["Planned"]["message"] and "CPU" in last["Planned"]["message"]
    assert (
        k.objects[deploy_path("m4")]["spec"]["template"]["spec"]["nodeSelector"] == patches[-1]["plan"]["nodeSelector"]
    )


# ---- kopf against kmock's Kubernetes emulator ----------------------------------------------------


async def _wait(predicate, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_kopf_operator_on_kmock(kmock):
    import aiohttp
    import kopf
    from kmock import ResourceInfo

    kmock.resources.load_bundled()
    kmock.resources["modelfit.io/v1alpha1/modeldeployments"] = ResourceInfo(
        kind="ModelDeployment",
        singular="modeldeployment",
        namespaced=True,
        subresources={"status", "scale"},
        verbs={"get", "list", "watch", "patch", "update", "create", "delete"},
    )
    kmock.objects["v1/nodes", None, "cpu-large"] = {
        **CPU_LARGE,
        "metadata": {**CPU_LARGE["metadata"], "resourceVersion": "1"},
    }
    body = md({**SEED, "backend": "auto"})
    body["metadata"]["resourceVersion"] = "1"
    kmock.objects["modelfit.io/v1alpha1/modeldeployments", "default", "qwen"] = body
    kube.set_client(kube.Kube(str(kmock.url)))
    reconciler.STATE.__init__()
    registry = kopf.get_default_registry()

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"), insecure=True)

    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True, stop_flag=stop))
    try:
        key = ("apps/v1/deployments", "default", "qwen")

        def has(k):
            try:
                return not kmock.objects[k].deleted
            except KeyError:
                return False

        assert await _wait(lambda: has(key)), "no Deployment was created"
        mdkey = ("modelfit.io/v1alpha1/modeldeployments", "default", "qwen")

        def status():
            return kmock.objects[mdkey].raw.get("status") or {}

        assert await _wait(lambda: (status().get("plan") or {}).get("backend") == "cpu")
        assert has(("v1/services", "default", "qwen"))
        assert not kmock.objects[mdkey].raw["metadata"].get("finalizers")  # deletable without the operator
        deployment = kmock.objects[key].raw
        assert deployment["metadata"]["ownerReferences"][0]["name"] == "qwen"
        conds = {c["type"]: c for c in status()["conditions"]}
        assert conds["Planned"]["status"] == "True"

        # A GPU node joins: the timer re-plans to cuda with every layer on the GPU and rolls out.
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{str(kmock.url).rstrip('/')}/api/v1/nodes", json=GPU)
            assert resp.status < 300

        def on_gpu():
            spec = kmock.objects[key].raw["spec"]["template"]["spec"]
            return spec["nodeSelector"] == {"kubernetes.io/hostname": "gpu-24g"}

        assert await _wait(on_gpu, 30), "the Deployment did not move to the GPU node"
        assert await _wait(lambda: status()["plan"]["backend"] == "cuda")
        c = kmock.objects[key].raw["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await kube.get_client().close()
        kube.set_client(None)


def _oom_pod(template):
    return {
        "metadata": {
            "name": "qwen-1",
            "namespace": "default",
            "annotations": {"modelfit.io/plan-hash": template},
            "labels": {"modelfit.io/modeldeployment": "qwen"},
        },
        "spec": {"nodeName": "cpu-large"},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "llama-server", "lastState": {"terminated": {"reason": "OOMKilled"}}}],
        },
    }


def _limit(k):
    return k.objects[deploy_path()]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]


def test_oom_under_a_tight_memory_override_drops_the_override_not_the_plan():
    spec = {**SEED, "loadMode": "none", "resources": {"limits": {"memory": "96Mi"}}}
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(spec), k, st)
    assert _limit(k) == "96Mi"  # --load-mode none: tried, the kernel will tell
    template = k.objects[deploy_path()]["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    k.pods.append(_oom_pod(template))
    p = go(md(spec, status=status), k, st)
    assert p["oomKills"] == 1 and p["memoryOverrideRejected"] == 96 * 1024 * 1024
    assert "headroomBoost" not in p.get("plan", {})  # the plan was right; the override was not
    assert _limit(k) == status["plan"]["resources"]["limits"]["memory"]
    planned = {c["type"]: c for c in p["conditions"]}["Planned"]
    assert planned["reason"] == "MemoryOverrideIgnored" and "OOM-killed" in planned["message"]
    merged = {**status, **p, "plan": {**status["plan"], **p.get("plan", {})}}
    p2 = go(md(spec, status=merged), k, st)
    assert "oomKills" not in p2 and _limit(k) == status["plan"]["resources"]["limits"]["memory"]


def test_tight_memory_override_under_mmap_is_never_applied():
    spec = {**SEED, "loadMode": "mmap", "resources": {"limits": {"memory": "256Mi"}}}
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    p = go(md(spec), k, st)
    assert _limit(k) == p["plan"]["resources"]["limits"]["memory"] != "256Mi"
    planned = {c["type"]: c for c in p["conditions"]}["Planned"]
    assert planned["reason"] == "MemoryOverrideIgnored" and "thrashes" in planned["message"]


# ---- API errors become conditions ---------------------------------------------------------------

INVALID = (
    'Deployment.apps "qwen" is invalid: spec.template.spec.containers[0].resources.requests: '
    'Invalid value: "8Gi": must be less than or equal to memory limit of 1Gi'
)


def conds_of(patch):
    return {c["type"]: c for c in patch["conditions"]}


def test_invalid_child_is_a_condition_not_a_retry():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    k.fail_apply["Deployment"] = kube.KubeError(422, INVALID)
    spec = {**SEED, "resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "1Gi"}}}
    p = go(md(spec), k, st)  # returns: nothing for kopf to retry
    c = conds_of(p)
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "ApplyFailed"
    assert c["Degraded"]["message"] == f"Deployment qwen: HTTP 422: {INVALID}"
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "ApplyFailed"
    assert c["Progressing"]["status"] == "False"
    assert c["Planned"]["status"] == "True" and p["plan"]["fits"] is True  # the plan is fine; its child was not
    seen = st.seen[("default", "qwen")]
    assert seen.retry_at == 0 and not st.due(("default", "qwen"))  # not retried until something changes
    # fixed: the next reconcile applies and clears the condition
    del k.fail_apply["Deployment"]
    p2 = go(md(SEED, status=p, generation=2), k, st)
    assert conds_of({"conditions": p2["conditions"]})["Degraded"]["reason"] == "AsExpected"
    assert deploy_path() in k.objects


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_every_permanent_error_names_the_child(status):
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    k.fail_apply["Service"] = kube.KubeError(status, "the server said no")
    p = go(md(SEED), k, st)
    c = conds_of(p)["Degraded"]
    assert (c["reason"], c["message"]) == ("ApplyFailed", f"Service qwen: HTTP {status}: the server said no")
    assert deploy_path() not in k.objects  # the Deployment goes last


@pytest.mark.parametrize("status", [0, 409, 429, 500, 503])
def test_transient_error_is_reported_and_retried_with_backoff(status):
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    k.fail_apply["Deployment"] = kube.KubeError(status, "try again")
    with pytest.raises(reconciler.ApiRetry) as err:
        go(md(SEED), k, st)
    c = conds_of(err.value.patch)["Degraded"]
    assert c["reason"] == "ApiUnavailable" and "try again" in c["message"] and "retrying" in c["message"]
    seen = st.seen[("default", "qwen")]
    assert seen.failures == 1 and seen.retry_at > 0 and not st.due(("default", "qwen"))
    seen.retry_at = 1.0  # the backoff has passed
    assert st.due(("default", "qwen"))
    with pytest.raises(reconciler.ApiRetry):
        go(md(SEED), k, st)
    assert st.seen[("default", "qwen")].failures == 2
    del k.fail_apply["Deployment"]
    go(md(SEED), k, st)
    assert (st.seen[("default", "qwen")].failures, st.seen[("default", "qwen")].retry_at) == (0, 0.0)


def test_failed_read_is_a_condition():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    k.fail_get[deploy_path()] = kube.KubeError(403, 'deployments.apps "qwen" is forbidden')
    c = conds_of(go(md(SEED), k, st))["Degraded"]
    assert c["reason"] == "ApiError" and c["message"].startswith("reading Deployment qwen: HTTP 403")


def test_kopf_handler_writes_the_condition_then_raises_a_temporary_error():
    import kopf

    k = FakeKube([CPU_LARGE])
    k.fail_apply["Deployment"] = kube.KubeError(503, "etcdserver: leader changed")
    kube.set_client(k)
    reconciler.STATE.__init__()
    patch = kopf.Patch()
    try:
        with pytest.raises(kopf.TemporaryError) as err:
            asyncio.run(handlers.modeldeployment_changed(body=md(SEED), patch=patch, logger=LOG, retry=2))
        assert err.value.delay == 40.0
        ((path, written),) = k.status_writes
        c = conds_of(written["status"])["Degraded"]
        assert path == status_path() and c["reason"] == "ApiUnavailable" and "leader changed" in c["message"]
        assert not patch  # kopf's own patch stays empty: the reconciler is the status's one writer
        # a permanent error: the condition, and the handler succeeds (kopf does not retry it)
        k.fail_apply["Deployment"] = kube.KubeError(422, INVALID)
        asyncio.run(handlers.modeldeployment_changed(body=md(SEED), patch=patch, logger=LOG, retry=0))
        assert conds_of(k.status_writes[-1][1]["status"])["Degraded"]["reason"] == "ApplyFailed" and not patch
    finally:
        kube.set_client(None)
        reconciler.STATE.__init__()


def test_the_resync_loop_writes_through_the_same_writer_a_transient_failure_too():
    k = FakeKube([CPU_LARGE])
    body, key = md(SEED), ("default", "qwen")

    async def run():
        st = OperatorState()
        await reconcile(body, LOG, k, st)  # kopf's first reconcile: the loop leaves objects it has not seen
        k.fail_get[deploy_path()] = kube.KubeError(503, "etcdserver: leader changed")
        st.bodies[key], st.seen[key].pods_dirty = body, True
        loop = asyncio.create_task(resync_loop(st, tick=0.02))
        try:
            assert await _wait(lambda: len(k.status_writes) == 2, 5.0)
        finally:
            loop.cancel()
        return st

    kube.set_client(k)
    try:
        st = asyncio.run(run())
    finally:
        kube.set_client(None)
    (path, first), (again, failed) = k.status_writes
    assert path == again == status_path() and conds_of(first["status"])["Planned"]["status"] == "True"
    c = conds_of(failed["status"])["Degraded"]
    assert c["reason"] == "ApiUnavailable" and "retrying" in c["message"]
    assert st.seen[key].failures == 1 and not st.due(key)  # the loop comes back after the backoff


def test_a_status_write_for_an_object_gone_meanwhile_is_dropped_other_refusals_raise():
    k, refusal = FakeKube([CPU_LARGE]), [kube.KubeError(404, 'modeldeployments.modelfit.io "qwen" not found')]

    async def refuse(path, body):
        raise refusal[0]

    k.merge_patch = refuse
    assert asyncio.run(reconcile(md(SEED), LOG, k, OperatorState()))["plan"]["fits"]  # deleted: nothing to report
    refusal[0] = kube.KubeError(422, "status.plan.context: Invalid value")
    with pytest.raises(kube.KubeError, match="422"):
        asyncio.run(reconcile(md(SEED), LOG, k, OperatorState()))


@pytest.mark.parametrize("name", ["x" * 64, "1model", "my.model", "-a", "a-"])
def test_names_that_cannot_make_children_are_refused(name):
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    c = conds_of(go(md(SEED, name=name), k, st))
    assert c["Planned"]["reason"] == "InvalidSpec" and "metadata.name" in c["Planned"]["message"]
    assert k.applies == 0


def test_63_character_name_is_fine():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    name = "m" * 63
    c = conds_of(go(md(SEED, name=name), k, st))
    assert c["Planned"]["status"] == "True"
    assert k.objects[deploy_path(name)]["metadata"]["labels"]["modelfit.io/modeldeployment"] == name


def test_missing_secret_key_and_pvc_are_reported():
    secret = path_for("v1", "Secret", "default", "llm-key")
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    spec = {**SEED, "apiKeySecretRef": {"name": "llm-key"}}
    c = conds_of(go(md(spec), k, st))["Degraded"]
    assert c["reason"] == "SecretNotFound" and "llm-key" in c["message"]
    assert deploy_path() in k.objects  # the pods start once it exists
    k.objects[secret] = {"data": {"other": "eA=="}}
    c = conds_of(go(md(spec), k, st))["Degraded"]
    assert c["reason"] == "SecretKeyNotFound" and "api-key" in c["message"]
    k.objects[secret] = {"data": {"api-key": "eA=="}}
    assert conds_of(go(md(spec), k, st))["Degraded"]["reason"] == "AsExpected"
    # no RBAC on Secrets (a chart without get on secrets): the check is skipped, the kubelet will tell
    k.fail_get[secret] = kube.KubeError(403, "secrets is forbidden")
    assert conds_of(go(md(spec), k, st))["Degraded"]["reason"] == "AsExpected"
    pvc_spec = {"model": {"pvc": {"claimName": "models", "path": "/Qwen3.5-0.8B-Q4_0.gguf"}}, "context": 4096}
    k, st = FakeKube([CPU_LARGE]), OperatorState()  # a node of its own: qwen's pod takes every core of this one
    c = conds_of(go(md(pvc_spec, name="onpvc"), k, st))["Degraded"]
    assert c["reason"] == "PvcNotFound" and "models" in c["message"]


def test_planner_warnings_are_in_the_planned_message():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    c = conds_of(go(md({**SEED, "context": 16777216, "adapt": False}), k, st))["Planned"]
    assert c["reason"] == "Planned" and "exceeds the model's trained 262144; capped" in c["message"]


def test_malformed_affinity_is_invalid_not_a_crash():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    for affinity in (
        {"nodeAffinity": "x"},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": ["x"]}}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"matchExpressions": []}]}},
    ):
        c = conds_of(go(md({**SEED, "affinity": affinity}), k, st))["Planned"]
        assert c["reason"] == "InvalidSpec" and "nodeAffinity" in c["message"]


def test_non_http_answer_is_model_unreadable(monkeypatch):
    import http.client

    def garbage(url, *_):
        raise http.client.BadStatusLine("SSH-2.0-OpenSSH")

    monkeypatch.setattr(sources, "read_gguf", garbage)
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    c = conds_of(go(md({"model": {"url": "http://127.0.0.1:22/m.gguf"}}), k, st))["Planned"]
    assert c["reason"] == "ModelUnreadable" and "not an HTTP answer" in c["message"]


def test_unreachable_api_server_is_a_transient_kube_error():
    async def run():
        client = kube.Kube("http://127.0.0.1:1")
        try:
            await client.get("/api/v1/nodes")
        finally:
            await client.close()

    with pytest.raises(kube.KubeError) as err:
        asyncio.run(run())
    assert err.value.status == 0 and err.value.transient and "cannot reach the API server" in str(err.value)
    assert not kube.KubeError(422, "x").transient and kube.KubeError(429, "x").transient


def test_every_kopf_handler_has_an_explicit_stable_id():
    """kopf keeps handler progress under the handler id: a renamed function must not re-run handlers."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(handlers))
    ids = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for deco in fn.decorator_list:
            if isinstance(deco, ast.Call) and ast.unparse(deco.func).startswith("kopf.on."):
                given = [k.value for k in deco.keywords if k.arg == "id"]
                assert given and isinstance(given[0], ast.Constant), f"{fn.name}: {ast.unparse(deco)} has no id="
                ids.setdefault(fn.name, set()).add(given[0].value)
    assert ids == {
        "configure": {"configure"},
        "close_client": {"close-client"},
        # the id kopf derived from the function name before: progress stored by older operators stays valid
        "modeldeployment_changed": {"modeldeployment_changed"},
        "modeldeployment_event": {"modeldeployment-events"},
        "node_event": {"node-events"},
        "pod_event": {"pod-events"},
        "deployment_event": {"deployment-events"},
        "service_event": {"service-events"},
        "node_facts_age": {"nodeFactsAgeSeconds"},
    }


def test_hand_edits_of_the_deployment_are_restored():
    """A spec edit bumps the Deployment's generation but not our applied hash: the next reconcile re-applies."""
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(SEED), k, st)
    d = k.objects[deploy_path()]
    image = d["spec"]["template"]["spec"]["containers"][0]["image"]
    d["metadata"]["generation"] = 1  # what the API server says after our apply
    merged = {**status}
    applies = k.applies
    p = go(md(SEED, status=merged), k, st)  # the first generation seen is the baseline: nothing to do
    assert k.applies == applies
    d = k.objects[deploy_path()]
    d["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/hand-edited:1"
    d["metadata"]["generation"] = 2
    go(md(SEED, status={**merged, **p}), k, st)
    assert k.applies > applies, "the hand edit was not reverted"
    assert k.objects[deploy_path()]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    applies = k.applies
    k.objects[deploy_path()]["metadata"]["generation"] = 3  # our own apply bumped it
    st.seen[("default", "qwen")].deploy_generation = 3
    go(md(SEED, status={**merged, **p}), k, st)
    assert k.applies == applies, "no drift, no write"


# ---- hand-off to cluster autoscalers: node shapes ------------------------------------------------

SHAPE_LABEL = "modelfit.io/node-shape"


def _shapes():
    from modelfit.nodes import parse_node_shapes

    return parse_node_shapes(
        [
            {"name": "tiny", "labels": {SHAPE_LABEL: "tiny"}, "cpu": 2, "memory": "4Gi"},
            {"name": "huge", "labels": {SHAPE_LABEL: "huge"}, "cpu": 64, "memory": "512Gi"},
            {"name": "large", "labels": {SHAPE_LABEL: "large"}, "cpu": "16", "memory": "64Gi"},
        ]
    )


def _pod(name, template, node_name=None):
    scheduled = {"type": "PodScheduled", "status": "True"}
    if node_name is None:
        scheduled = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector",
        }
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"modelfit.io/plan-hash": template},
            "labels": {"modelfit.io/modeldeployment": "qwen"},
        },
        "spec": {"nodeName": node_name} if node_name else {},
        "status": {"phase": "Running" if node_name else "Pending", "conditions": [scheduled]},
    }


BIG = {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072}


def test_no_present_node_fits_plans_for_the_smallest_fitting_shape():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    st.node_shapes = _shapes()
    p = go(md(BIG), k, st)
    conds = {c["type"]: c for c in p["conditions"]}
    assert conds["Planned"]["status"] == "True" and conds["Planned"]["reason"] == "WaitingForNode"
    assert "node shape large" in conds["Planned"]["message"] and "cluster autoscaler" in conds["Planned"]["message"]
    assert conds["Unschedulable"]["status"] == "True" and conds["Unschedulable"]["reason"] == "WaitingForNode"
    assert p["plan"]["nodeClass"] == "large" and p["plan"]["nodeSelector"] == {SHAPE_LABEL: "large"}
    pod = k.objects[deploy_path()]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {SHAPE_LABEL: "large"}
    assert p["plan"]["context"] == 131072 and p["plan"]["fits"] is True
    # the next reconcile keeps the plan, and still says it waits for a node (not "Planned")
    template = k.objects[deploy_path()]["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    k.pods = [_pod("qwen-1", template)]
    again = _merge(p, go(md(BIG, status=p), k, st))
    conds = {c["type"]: c for c in again["conditions"]}
    assert conds["Planned"]["reason"] == "WaitingForNode" and "node shape large" in conds["Planned"]["message"]
    assert again["plan"]["hash"] == p["plan"]["hash"]


def test_without_shapes_or_fitting_shape_nothing_changes():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    st.node_shapes = _shapes()[:1]  # only tiny: too small too
    p = go(md(BIG), k, st)
    conds = {c["type"]: c for c in p["conditions"]}
    assert conds["Planned"]["status"] == "False" and conds["Unschedulable"]["reason"] == "NoNodeFits"
    assert k.applies == 0


@pytest.mark.parametrize("scheduled_first", [True, False])
def test_a_node_of_the_shape_arrives_and_the_plan_stays(scheduled_first):
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    st.node_shapes = _shapes()
    status = go(md(BIG), k, st)
    planned = status["plan"]["hash"]
    template = k.objects[deploy_path()]["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    k.pods = [_pod("qwen-1", template)]
    status = _merge(status, go(md(BIG, status=status), k, st))
    applies = k.applies
    assert status["plan"]["hash"] == planned
    unsched = next(c for c in status["conditions"] if c["type"] == "Unschedulable")
    assert unsched["reason"] == "WaitingForNode" and "shape large" in unsched["message"]
    # The cluster autoscaler adds a node of the shape; the re-plan (before or after the pod binds) keeps the plan.
    new = node("ca-large-1", "16", "64Gi", labels={SHAPE_LABEL: "large"})
    k.nodes.append(new)
    st.node_changed("ADDED", new)
    if scheduled_first:
        k.pods = [_pod("qwen-1", template, "ca-large-1")]
    status = _merge(status, go(md(BIG, status=status), k, st))
    k.pods = [_pod("qwen-1", template, "ca-large-1")]
    status = _merge(status, go(md(BIG, status=status), k, st))
    assert k.applies == applies and status["plan"]["hash"] == planned
    assert status["plan"]["nodeSelector"] == {SHAPE_LABEL: "large"}
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Planned"]["status"] == "True" and conds["Unschedulable"]["status"] == "False"
    # Scale-out: the second replica does not fit the node and asks for another node of the shape; the pod
    # template (and so the running pod) is the same.
    pod_hash = template
    status = _merge(status, go(md({**BIG, "replicas": 2}, status=status, generation=2), k, st))
    d = k.objects[deploy_path()]
    assert (
        d["spec"]["replicas"] == 2
        and d["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"] == pod_hash
    )
    assert d["spec"]["template"]["spec"]["nodeSelector"] == {SHAPE_LABEL: "large"}
    k.pods.append(_pod("qwen-2", pod_hash))
    applies = k.applies
    status = _merge(status, go(md({**BIG, "replicas": 2}, status=status, generation=2), k, st))
    assert k.applies == applies
    unsched = next(c for c in status["conditions"] if c["type"] == "Unschedulable")
    assert unsched["reason"] == "WaitingForNode" and "shape large" in unsched["message"]


def test_unreadable_model_is_retried_with_backoff_until_it_answers(monkeypatch):
    """A model server that is not up yet must not wait for the 5-minute full resync."""
    import time as _time

    from modelfit_dev.synth import ensure_model

    tiny = ensure_model("llama-tiny", "F16")  # a real GGUF header once the "server" is up
    answers = {"up": False}
    real = sources.read_gguf

    def reader(url, *a, **kw):
        if not answers["up"]:
            raise GGUFError(f"{url}: cannot fetch ([Errno 111] Connection refused)")
        return real(str(tiny), *a, **kw)

    monkeypatch.setattr(sources, "read_gguf", reader)
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    body = md({"model": {"url": "http://10.88.0.1:18080/m.gguf"}})
    go(body, k, st)
    seen = st.seen[("default", "qwen")]
    first = seen.retry_at - _time.monotonic()
    assert 5 < first <= 10 and st.due(("default", "qwen")) is False
    go(body, k, st)
    assert 10 < seen.retry_at - _time.monotonic() <= 20  # backoff doubles
    seen.retry_at = _time.monotonic() - 1
    assert st.due(("default", "qwen"))
    answers["up"] = True
    p = go(body, k, st)
    assert seen.retry_at == 0.0 and k.applies > 0 and p["plan"]["fits"]


# ---- no churn, surge, scaling (decide.keep_running, decide.surge_fits) ------------------------------

SMALL_SPEC = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192}


def _running_pod(node_name, template=None):
    return {
        "metadata": {
            "name": "qwen-1",
            "namespace": "default",
            "labels": {"modelfit.io/modeldeployment": "qwen"},
            "annotations": {"modelfit.io/plan-hash": template} if template else {},
        },
        "spec": {"nodeName": node_name, "containers": [{"resources": {"requests": {"memory": "1Gi", "cpu": "1"}}}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _serving(k, status):
    d = k.objects[deploy_path()]
    d["status"] = {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
    k.pods[:] = [_running_pod(status["plan"]["nodeClass"])]


def test_a_roomier_node_does_not_move_a_running_plan():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    status = go(md(SMALL_SPEC), k, st)
    assert status["plan"]["nodeClass"] == "cpu-small" and status["plan"]["rollout"] == "Surge"
    _serving(k, status)
    applies = k.applies
    k.nodes.append(CPU_LARGE)
    st.node_changed("ADDED", CPU_LARGE)
    st.snapshot.invalidate()
    p = go(md(SMALL_SPEC, status=status), k, st)
    status = _merge(status, p)
    assert status["plan"]["nodeClass"] == "cpu-small" and k.applies == applies  # same context: not worth a move
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    assert "kept: a re-plan (cpu on cpu-large" in planned["message"] and "WhenBetter" in planned["message"]
    # Always: any better class moves the pods (the old behaviour)
    p = go(md({**SMALL_SPEC, "rebalance": {"policy": "Always"}}, status=status, generation=2), k, st)
    assert p["plan"]["nodeClass"] == "cpu-large" and k.applies > applies


def test_a_gpu_node_moves_a_running_plan_unless_rebalance_never():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(SMALL_SPEC), k, st)
    _serving(k, status)
    k.nodes.append(GPU)
    st.node_changed("ADDED", GPU)
    st.snapshot.invalidate()
    never = {**SMALL_SPEC, "rebalance": {"policy": "Never"}}
    kept = go(md(never, status=status, generation=2), k, st)  # a new policy is not a new plan
    kept_status = _merge(status, kept)
    assert kept_status["plan"]["backend"] == "cpu"
    planned = next(c for c in kept_status["conditions"] if c["type"] == "Planned")
    assert "rebalance Never keeps a running plan" in planned["message"]
    moved = go(md(SMALL_SPEC, status=kept_status, generation=3), k, st)
    plan = _merge(kept_status, moved)["plan"]
    assert plan["backend"] == "cuda" and plan["gpuLayers"] == plan["totalLayers"]
    planned = next(c for c in moved["conditions"] if c["type"] == "Planned")
    assert "moved: GPU share 0% -> 100%" in planned["message"]
    assert plan["rollout"] == "Surge"  # another node class: the new pod starts before the old one stops


def test_an_in_place_change_without_room_replaces():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    status = go(md(SMALL_SPEC), k, st)
    _serving(k, status)
    bigger = {**SMALL_SPEC, "context": 16384}
    p = go(md(bigger, status=status, generation=2), k, st)
    plan = _merge(status, p)["plan"]
    assert plan["context"] == 16384 and plan["rollout"] == "Replace"  # 4Gi holds one pod of this size, not two
    rolling = k.objects[deploy_path()]["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}


def test_scaling_is_not_a_new_plan():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    spec = {**SMALL_SPEC, "autoscaling": {"maxReplicas": 3}}
    status = go(md(spec), k, st)
    _serving(k, status)
    hpa = k.objects[path_for("autoscaling/v2", "HorizontalPodAutoscaler", "default", "qwen")]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    events = []
    k.create = lambda path, body: _record(events, body)
    applies = k.applies
    p = go(md({**spec, "replicas": 2}, status=status, generation=2), k, st)  # the HPA wrote spec.replicas
    assert k.objects[deploy_path()]["spec"]["replicas"] == 2 and k.applies > applies
    assert "hash" not in (p.get("plan") or {}) and not events  # same plan: no PlanChanged
    assert any("autoscaling 1-3 replicas" in r for r in status["plan"]["reasons"])


async def _record(events, body):
    events.append(body)
    return body


def test_a_kept_plan_moves_when_its_node_class_goes():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    status = go(md(SMALL_SPEC), k, st)
    _serving(k, status)
    k.nodes.append(CPU_SMALL)
    st.node_changed("ADDED", CPU_SMALL)
    st.snapshot.invalidate()
    k.nodes.remove(CPU_LARGE)  # the autoscaler removed the node; its pod still reads Running for a while
    st.node_changed("DELETED", CPU_LARGE)
    p = go(md(SMALL_SPEC, status=status), k, st)
    assert _merge(status, p)["plan"]["nodeClass"] == "cpu-small"


def test_more_replicas_than_the_class_holds_is_said_before_the_scheduler_does():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    p = go(md({**SMALL_SPEC, "replicas": 5}), k, st)
    unsched = next(c for c in p["conditions"] if c["type"] == "Unschedulable")
    assert unsched["status"] == "True" and unsched["reason"] == "InsufficientCapacity"
    assert unsched["message"].startswith("5 replicas wanted, the 1 present node(s) of kubernetes.io/hostname=cpu-small")
    p = go(md({**SMALL_SPEC, "replicas": 1}, generation=2), k, st)
    assert next(c for c in p["conditions"] if c["type"] == "Unschedulable")["status"] == "False"


def test_capacity_counts_the_rendered_requests_not_only_the_plan():
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    spec = {**SMALL_SPEC, "replicas": 2, "resources": {"requests": {"cpu": "100m"}}}
    p = go(md(spec), k, st)
    unsched = next(c for c in p["conditions"] if c["type"] == "Unschedulable")
    assert unsched["reason"] != "InsufficientCapacity", unsched  # 2 x 100m fit where the plan's threads would not


def test_a_full_node_gets_a_pending_pod_and_keeps_its_plan_when_room_frees():
    """Another tenant's pod holds the node's CPU: the Deployment is made anyway for an empty node of the class
    (WaitingForNode), its pod pends until room frees up (or an autoscaler adds a node); no re-plan then."""
    busy = {
        "metadata": {"name": "other", "namespace": "team-b", "labels": {}},
        "spec": {"nodeName": "cpu-small", "containers": [{"resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}]},
        "status": {"phase": "Running"},
    }
    k, st = FakeKube([CPU_SMALL], pods=[busy]), OperatorState()
    p = go(md(SMALL_SPEC), k, st)
    conds = {c["type"]: c for c in p["conditions"]}
    assert conds["Planned"]["status"] == "True" and conds["Unschedulable"]["reason"] == "WaitingForNode"
    assert "short by" in conds["Planned"]["message"] and "CPU" in conds["Planned"]["message"]
    assert p["plan"]["nodeSelector"] == {"kubernetes.io/hostname": "cpu-small"}
    applies = k.applies
    k.pods.clear()  # the other pod is gone
    st.snapshot.invalidate()
    p2 = go(md(SMALL_SPEC, status=p), k, st)
    assert p2.get("plan", p["plan"])["hash"] == p["plan"]["hash"] and k.applies == applies


def test_a_plan_no_node_fits_is_retried_with_backoff():
    """A model too big for any node, even empty, is tried again with backoff (not on every resync tick)."""
    big = {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072}
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    p = go(md(big), k, st)
    assert next(c for c in p["conditions"] if c["type"] == "Planned")["reason"] == "NoNodeFits"
    seen = st.seen[("default", "qwen")]
    assert seen.failures == 1 and seen.retry_at > 0 and not st.due(("default", "qwen"))
    k.nodes.append(node("cpu-big", "16", "64Gi"))  # a node joins: its event re-plans at once
    st.snapshot.invalidate()
    seen.retry_at = 1.0  # the backoff has passed
    assert st.due(("default", "qwen"))
    p = go(md(big, status=p), k, st)
    assert p["plan"]["fits"] and (seen.failures, seen.retry_at) == (0, 0.0)


def test_a_terminating_namespace_is_not_an_error(caplog):
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    msg = (
        'services "qwen" is forbidden: unable to create new content in namespace default because it is being terminated'
    )
    k.fail_apply["Service"] = kube.KubeError(403, msg)
    with caplog.at_level(logging.WARNING):
        p = go(md(SMALL_SPEC), k, st)
    assert p == {} and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    k.fail_apply["Service"] = kube.KubeError(403, 'services "qwen" is forbidden: User cannot create services')
    p = go(md(SMALL_SPEC), k, st)
    assert next(c for c in p["conditions"] if c["type"] == "Degraded")["reason"] == "ApplyFailed"  # RBAC still reported


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072},  # NoNodeFits
        {"model": {"url": "https://example.invalid/m.gguf"}},  # ModelUnreadable
        {**SMALL_SPEC, "nodeSelector": {"pool": "nowhere"}},  # NoEligibleNodes
    ],
    ids=["no-node-fits", "unreadable", "no-eligible-nodes"],
)
def test_a_verdict_is_logged_once_not_on_every_resync(caplog, spec):
    """Re-reconciling to the same Planned=False verdict logs at debug; a new verdict is logged again."""
    k, st = FakeKube([CPU_SMALL]), OperatorState()
    with caplog.at_level(logging.INFO):
        p = go(md(spec), k, st)
        first = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        caplog.clear()
        go(md(spec, status=p), k, st)
        again = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(next(c for c in p["conditions"] if c["type"] == "Planned")["reason"] in m for m in first)
    assert again == []
    caplog.clear()
    k.nodes.append(node("cpu-tiny", "1", "1Gi"))  # the message names every node: a new verdict
    st.snapshot.invalidate()
    with caplog.at_level(logging.INFO):
        go(md(spec, status=p), k, st)
    if spec["model"].get("url") is None:
        assert [r for r in caplog.records if r.levelno == logging.WARNING]


# ---- a burst larger than the cluster ---------------------------------------------------------------


class MiniCluster(FakeKube):
    """FakeKube with a Deployment controller and a scheduler in miniature: each Deployment gets its replicas as
    pods of its current template (older ones go), and each unbound pod, oldest first, is bound to the matching
    node (nodeSelector, taints) with the most CPU left, or marked Unschedulable as kube-scheduler does."""

    def __init__(self, nodes, binds=None):
        super().__init__(nodes)
        self.created = 0
        self.binds = binds  # a random.Random: bind unbound pods in a shuffled order, not the oldest first

    async def list(self, path, **params):
        items = await super().list(path, **params)
        want = dict(kv.split("=", 1) for kv in (params.get("labelSelector") or "").split(",") if kv)
        return [p for p in items if all((p["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]

    def schedule(self):
        from modelfit.nodes import Requests, node_facts_from_k8s
        from modelfit.occupancy import pod_requests, usage
        from modelfit.placement import tolerates
        from modelfit.render import HASH_ANNOTATION, MD_LABEL

        pods = []
        for d in (o for o in self.objects.values() if o["kind"] == "Deployment"):
            template, name = d["spec"]["template"], d["metadata"]["name"]
            current = template["metadata"]["annotations"][HASH_ANNOTATION]
            mine = [
                p
                for p in self.pods
                if p["metadata"]["labels"].get(MD_LABEL) == name
                and p["metadata"]["annotations"][HASH_ANNOTATION] == current
            ]
            for _ in range(int(d["spec"].get("replicas", 1)) - len(mine)):
                self.created += 1
                meta = {**template["metadata"], "name": f"{name}-{self.created}", "namespace": "default"}
                mine.append({"metadata": meta, "spec": dict(template["spec"]), "status": {"phase": "Pending"}})
            pods += mine
        self.pods = sorted(pods, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1]))
        for p in self.binds.sample(self.pods, len(self.pods)) if self.binds else self.pods:
            if p["spec"].get("nodeName"):
                continue
            used, _ = usage(self.pods, "")
            want, tolerations = p["spec"].get("nodeSelector") or {}, p["spec"].get("tolerations") or []
            room = [
                f
                for f in (node_facts_from_k8s(n, used.get(n["metadata"]["name"])) for n in self.nodes)
                if all(f.labels.get(k) == v for k, v in want.items())
                and all(tolerates(tolerations, t) for t in f.taints)
                and Requests(f.cpu_millis, f.memory_bytes or 0, f.gpus).covers(pod_requests(p))
            ]
            if room:
                p["spec"] = {**p["spec"], "nodeName": max(room, key=lambda f: (f.cpu_millis, f.name)).name}
                p["status"] = {"phase": "Running"}
            else:
                refused = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                p["status"] = {"phase": "Pending", "conditions": [{**refused, "message": "0/3 nodes are available"}]}


REAL_NODE = node(
    "real-0", "4", "8Gi", taints=[{"key": "modelfit.io/real-node", "value": "true", "effect": "NoSchedule"}]
)


def _burst(specs, seed, rounds=4):
    """``specs`` (by name) created at once (kopf's handlers, concurrently, in a shuffled order), then ``rounds`` of the
    resync loop with the scheduler between them (binding the oldest pods first for an even ``seed``, in a
    shuffled order for an odd one); each one's final conditions, pods and the applies per round."""
    import random

    rnd, names = random.Random(seed), sorted(specs)
    hosts = [node("h0", "8", "32Gi"), node("h1", "8", "32Gi"), REAL_NODE]
    k, st = MiniCluster(hosts, binds=rnd if seed % 2 else None), OperatorState()
    status = {x: {} for x in names}

    async def one(x):
        status[x] = _merge(status[x], await reconcile(md(specs[x], name=x, status=status[x]), LOG, k, st))

    async def burst():
        order = rnd.sample(names, len(names))
        await asyncio.gather(*(one(x) for x in order))

    asyncio.run(burst())
    applies = []
    for _ in range(rounds):
        k.schedule()
        st.snapshot.invalidate()
        before = k.applies
        for x in rnd.sample(names, len(names)):
            asyncio.run(one(x))
        applies.append(k.applies - before)
    k.schedule()
    out = {}
    for x in names:
        conds = {c["type"]: c for c in status[x]["conditions"]}
        phases = sorted(
            p["status"]["phase"] for p in k.pods if p["metadata"]["labels"].get("modelfit.io/modeldeployment") == x
        )
        out[x] = (conds, deploy_path(x) in k.objects, phases)
    return out, applies


@pytest.mark.parametrize("adapt", [True, False], ids=["adapt", "strict"])
def test_a_burst_larger_than_the_cluster_leaves_every_model_a_pending_pod_whatever_the_order(adapt):
    """13 models at once where 4 fit (two 8-CPU hosts, 2 each; a tainted node none tolerates): the 4 run, 8
    others each get a Deployment whose pod pends (WaitingForNode: the scheduler or an autoscaler acts on it),
    one too big for any node reads NoNodeFits naming why, in any order of arrival and of binding; none reads
    NoEligibleNodes while the hosts are eligible but full, and the plans settle (no Deployment re-applied
    once the scheduler has placed what fits)."""
    specs = {f"m{i:02d}": {**SMALL_SPEC, "context": 4096, "adapt": adapt} for i in range(12)}
    specs["big"] = {"model": {"catalog": "qwen3-30b-a3b", "quant": "Q8_0"}, "context": 131072}
    outcomes = set()
    for seed in range(4):
        out, applies = _burst(specs, seed)
        conds, has_deploy, phases = out.pop("big")
        assert conds["Planned"]["reason"] == "NoNodeFits" and not has_deploy and not phases
        assert all(h in conds["Planned"]["message"] for h in ("h0", "h1", "short by", "real-0"))
        for name, (conds, has_deploy, phases) in out.items():
            planned, unsched = conds["Planned"], conds["Unschedulable"]
            assert planned["reason"] != "NoEligibleNodes", (seed, name, planned)
            assert planned["status"] == "True" and has_deploy and len(phases) == 1, (seed, name, planned, phases)
            if phases == ["Pending"]:
                assert (unsched["status"], unsched["reason"]) == ("True", "WaitingForNode"), (seed, name, unsched)
        assert applies[-1] == 0, (seed, applies)
        outcomes.add(tuple(sorted((v[2][0], v[0]["Unschedulable"]["reason"]) for v in out.values())))
    assert outcomes == {(("Pending", "WaitingForNode"),) * 8 + (("Running", "Scheduled"),) * 4}


def test_a_drained_node_is_named_in_the_condition():
    """kubectl drain cordons the node: the condition names the cordon, beside the taint that keeps the pods off
    the other node (before, the cordoned node was left out of the node facts and so out of the message)."""
    drained = {**CPU_LARGE, "spec": {**CPU_LARGE["spec"], "unschedulable": True}}
    k, st = FakeKube([drained, REAL_NODE]), OperatorState()
    planned = {c["type"]: c for c in go(md(SMALL_SPEC), k, st)["conditions"]}["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "NoEligibleNodes") and k.applies == 0
    assert planned["message"] == (
        "no node is eligible: cpu-large: cordoned (spec.unschedulable); real-0: taint "
        "modelfit.io/real-node=true:NoSchedule is not tolerated"
    )
