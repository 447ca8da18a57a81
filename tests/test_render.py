import kubernetes_validate
import pytest

from modelfit import catalog
from modelfit.api import ModelDeploymentSpec
from modelfit.coldstart import init_containers
from modelfit.download import DOWNLOAD_SCRIPT
from modelfit.nodes import GiB, MiB, NodeFacts, format_memory
from modelfit.placement import place
from modelfit.render import IMAGES, model_file, render, startup_failure_threshold

META = {"name": "qwen", "namespace": "ml", "uid": "1234-5678"}
CPU = NodeFacts(
    name="cpu-large", cpu_millis=16000, memory_bytes=64 * GiB, labels={"kubernetes.io/hostname": "cpu-large"}
)
GPU = NodeFacts(
    name="gpu",
    cpu_millis=8000,
    memory_bytes=32 * GiB,
    gpus=1,
    gpu_vendor="nvidia",
    gpu_memory_bytes=24576 * MiB,
    taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}],
)


def build(node=CPU, **kw):
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192, **kw}
    )
    facts = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0")
    mf = model_file(spec, facts.file_bytes)
    p = place(spec, facts, [node], mf.path)
    assert p.fits
    return spec, p, render(META, spec, p, mf)


def pod(r):
    return r.by_kind("Deployment")["spec"]["template"]["spec"]


def test_children_and_owner_refs():
    _, _, r = build()
    kinds = [o["kind"] for o in r.objects]
    assert kinds == ["ConfigMap", "Deployment", "Service"]  # the ConfigMap: the model digests downloads are held to
    assert r.absent == [
        ("policy/v1", "PodDisruptionBudget", "qwen"),
        ("autoscaling/v2", "HorizontalPodAutoscaler", "qwen"),
        ("networking.k8s.io/v1", "NetworkPolicy", "qwen"),  # rendered with the admin's --network-policy only
    ]
    for o in r.objects:
        ref = o["metadata"]["ownerReferences"][0]
        assert ref["uid"] == "1234-5678" and ref["controller"] and ref["kind"] == "ModelDeployment"
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelfit"
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "qwen"
        assert o["metadata"]["namespace"] == "ml"


def test_args_resources_image_and_probes():
    _, p, r = build(serverArgs=["--jinja"])
    c = pod(r)["containers"][0]
    assert c["args"] == [*p.result.plan.args, "--jinja"]
    assert "--metrics" in c["args"] and c["args"][c["args"].index("-m") + 1] == "/models/Qwen3.5-0.8B-Q4_0.gguf"
    assert c["resources"]["requests"]["memory"] == p.result.resources.requests["memory"]
    assert c["resources"]["limits"]["memory"] == p.result.resources.limits["memory"]
    assert c["image"] == IMAGES["cpu"] and IMAGES["cpu"].endswith("server-b11434")
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]
    size = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0").file_bytes
    assert c["startupProbe"]["failureThreshold"] == startup_failure_threshold(size)
    assert c["startupProbe"]["periodSeconds"] == 2  # the load's end is seen within 2 s
    assert pod(r)["nodeSelector"] == {"kubernetes.io/hostname": "cpu-large"}


def test_startup_budget_grows_with_size():
    """A minute plus 30 s per GiB, capped at an hour, in probes of 2 s (coldstart.STARTUP_PERIOD_S)."""
    assert startup_failure_threshold(40 * GiB) > startup_failure_threshold(1 * GiB) == 45
    assert startup_failure_threshold(10_000 * GiB) == 1800
    assert startup_failure_threshold(10_000 * GiB, period=10) == 360


def test_restricted_security():
    _, _, r = build()
    ps = pod(r)
    assert ps["securityContext"]["runAsNonRoot"] and ps["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in ps["containers"] + ps["initContainers"]:
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in ps["volumes"])


def test_init_download_with_resume_and_checksum():
    sha = "a" * 64
    spec = ModelDeploymentSpec.model_validate({"model": {"url": "https://h/m/model.gguf?x=1", "sha256": sha}})
    mf = model_file(spec, 2 * GiB)
    assert mf.file_name == "model.gguf" and mf.path == "/models/model.gguf"
    _, p, _ = build()
    r = render(META, spec, p, mf)
    init = pod(r)["initContainers"][0]
    assert init["command"][-1] == DOWNLOAD_SCRIPT  # its behaviour is tested by running it: test_download.py
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env == {
        "MODEL_URL": "https://h/m/model.gguf?x=1",
        "MODEL_FILE": "/models/model.gguf",
        "MODEL_SHA256": sha,
        "MODEL_SIZE": str(2 * GiB),
    }
    vol = next(v for v in pod(r)["volumes"] if v["name"] == "model-cache")
    assert vol["emptyDir"]["sizeLimit"] == format_memory(int(2 * GiB * 1.1) + 512 * MiB)
    ann = r.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "true"


def test_replicas_are_evicted_one_at_a_time_and_a_loading_pod_never_blocks_a_drain():
    _, _, r = build(replicas=2)
    budget = r.by_kind("PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    _, _, r = build(autoscaling={"minReplicas": 1, "maxReplicas": 3})  # the HPA may add replicas
    assert r.by_kind("PodDisruptionBudget") is not None


def test_pvc_cache_pdb_and_service():
    _, _, r = build(
        replicas=3,
        modelCache={"pvc": {"storageClass": "fast", "size": "5Gi"}},
        service={"type": "NodePort", "port": 80},
    )
    assert [o["kind"] for o in r.objects] == [
        "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"
    ]  # fmt: skip
    claim = r.by_kind("PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast" and claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    vol = next(v for v in pod(r)["volumes"] if v["name"] == "model-cache")
    assert vol["persistentVolumeClaim"]["claimName"] == "qwen-models"
    assert (
        "cluster-autoscaler.kubernetes.io/safe-to-evict"
        not in r.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    )
    assert r.by_kind("Deployment")["spec"]["replicas"] == 3 and r.absent == [
        ("autoscaling/v2", "HorizontalPodAutoscaler", "qwen"),
        ("networking.k8s.io/v1", "NetworkPolicy", "qwen"),
    ]
    svc = r.by_kind("Service")["spec"]
    assert svc["type"] == "NodePort" and svc["ports"][0]["port"] == 80 and svc["ports"][0]["targetPort"] == "http"


def test_pvc_model_source_has_no_init():
    spec = ModelDeploymentSpec.model_validate({"model": {"pvc": {"claimName": "models", "path": "/q/m.gguf"}}})
    mf = model_file(spec, GiB)
    _, p, _ = build()
    r = render(META, spec, p, mf)
    assert "initContainers" not in pod(r) and mf.path == "/model-source/q/m.gguf"
    assert init_containers(spec) == 0  # the predicted cold start counts none
    vol = next(v for v in pod(r)["volumes"] if v["name"] == "model-source")
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_gpu_plan_requests_and_tolerates_gpu():
    _, p, r = build(node=GPU)
    assert p.result.plan.backend == "cuda"
    ps = pod(r)
    c = ps["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["image"] == IMAGES["cuda"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ps["tolerations"]


def test_overrides_api_key_and_image():
    _, _, r = build(
        resources={"limits": {"cpu": "3"}}, image={"cpu": "my/llama:1"}, apiKeySecretRef={"name": "keys", "key": "k"}
    )
    c = pod(r)["containers"][0]
    assert c["resources"]["limits"]["cpu"] == "3" and c["image"] == "my/llama:1"
    env = next(e for e in c["env"] if e["name"] == "LLAMA_API_KEY")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "k"}


def test_hash_is_stable_and_tracks_changes():
    _, _, a = build()
    _, _, b = build()
    _, _, c = build(parallel=2)
    _, _, d = build(replicas=2)
    assert a.hash == b.hash and a.hash != c.hash
    # scaling is not a new plan: the plan hash leaves replicas (and the PDB) out, the applied hash does not
    assert a.hash == d.hash and a.applied != d.applied and a.applied == b.applied
    ta = a.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    td = d.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"]
    assert ta == td  # scaling does not roll the pods


@pytest.mark.parametrize(
    "kw", [{}, {"replicas": 2, "modelCache": {"pvc": {}}}, {"modelCache": {"hostPath": {"path": "/data"}}}]
)
def test_children_validate_against_kubernetes_schemas(kw):
    _, _, r = build(**kw)
    for obj in r.objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# ---- found on a real node --------------------------------------------------------------------


def test_host_path_cache_is_handed_to_the_downloader_uid():
    """kubelet makes a DirectoryOrCreate hostPath root 0755; fsGroup skips hostPath: chown it first."""
    _, _, r = build(modelCache={"hostPath": {"path": "/var/cache/models"}})
    init = pod(r)["initContainers"]
    assert [c["name"] for c in init] == ["prepare-cache", "fetch-model"]
    prep = init[0]["securityContext"]
    assert prep["runAsUser"] == 0 and prep["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert prep["allowPrivilegeEscalation"] is False and "chown 1000:1000 /models" in init[0]["command"][-1]
    _, _, r = build()  # emptyDir: fsGroup applies, no root step
    assert [c["name"] for c in pod(r)["initContainers"]] == ["fetch-model"]


def test_limit_override_below_the_request_keeps_the_pod_valid():
    _, _, r = build(resources={"limits": {"memory": "256Mi"}}, loadMode="none")
    res = pod(r)["containers"][0]["resources"]
    assert res["limits"]["memory"] == "256Mi" and res["requests"]["memory"] == "256Mi"
    kubernetes_validate.validate(r.by_kind("Deployment"), "1.33", strict=True)


def test_tight_memory_override_under_mmap_is_never_applied():
    from modelfit.render import memory_override_verdict

    spec, p, r = build(resources={"limits": {"memory": "256Mi"}}, loadMode="mmap")
    why = memory_override_verdict(p, spec, oom_under_override=False)
    assert why is not None and "thrashes" in why
    mf = model_file(spec, p.result.memory.total_bytes)
    r = render(META, spec, p, mf, honour_memory_override=False)
    res = pod(r)["containers"][0]["resources"]
    assert res["limits"]["memory"] == p.result.resources.limits["memory"]
    # under --load-mode none the kernel OOM-kills a tight limit: tried once, dropped after the kill
    spec, p, _ = build(resources={"limits": {"memory": "256Mi"}}, loadMode="none")
    assert memory_override_verdict(p, spec, oom_under_override=False) is None
    assert "OOM-killed" in (memory_override_verdict(p, spec, oom_under_override=True) or "")
    spec, p, _ = build(resources={"limits": {"memory": "64Gi"}}, loadMode="mmap")
    assert memory_override_verdict(p, spec, oom_under_override=True) is None


def test_metrics_with_an_api_key_go_through_an_authenticated_pod_monitor():
    spec = {"apiKeySecretRef": {"name": "llm-key", "key": "token"}}
    s, p, _ = build(**spec)
    mf = model_file(s, 0)
    r = render(META, s, p, mf, with_pod_monitor=True)
    annotations = r.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"  # an unauthenticated scrape would get 401
    pm = r.by_kind("PodMonitor")
    assert pm is not None and pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "qwen"
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics"
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "llm-key", "key": "token"}}
    _, _, plain = build()
    assert plain.by_kind("PodMonitor") is None
    assert plain.by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_autoscaling_renders_an_hpa_on_the_scale_subresource():
    _, p, r = build(parallel=4, replicas=1, autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetUtilization": 75})
    hpa = r.by_kind("HorizontalPodAutoscaler")
    assert hpa is not None and ("autoscaling/v2", "HorizontalPodAutoscaler", "qwen") not in r.absent
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "modelfit.io/v1alpha1", "kind": "ModelDeployment", "name": "qwen"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 5)
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "llamacpp_requests_inflight"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3000m"}  # 4 slots x 75%
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    # minReplicas holds from the start; a PDB guards the replicas the HPA may add
    assert r.by_kind("Deployment")["spec"]["replicas"] == 2 and r.by_kind("PodDisruptionBudget") is not None
    spec_obj = ModelDeploymentSpec.model_validate(
        {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "autoscaling": {"maxReplicas": 3}}
    )
    r2 = render(META, spec_obj, p, model_file(spec_obj, GiB), hpa_metric="my_inflight")
    (metric,) = r2.by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "my_inflight"
    assert metric["pods"]["target"]["averageValue"] == f"{p.result.plan.parallel * 800}m"


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValueError, match="minReplicas must not exceed maxReplicas"):
        ModelDeploymentSpec.model_validate(
            {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}
        )


def test_surge_or_replace():
    _, p, _ = build()
    spec = ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}})
    mf = model_file(spec, GiB)
    surge = render(META, spec, p, mf, surge=True).by_kind("Deployment")["spec"]["strategy"]["rollingUpdate"]
    replace = render(META, spec, p, mf, surge=False).by_kind("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert surge == {"maxSurge": 1, "maxUnavailable": 0} and replace == {"maxSurge": 0, "maxUnavailable": 1}
