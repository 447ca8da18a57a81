"""Scenario 1: CRD install and the seed example (Qwen3.5 0.8B Q4_0 on CPU nodes) via kubectl apply."""

from __future__ import annotations

from _support import REPO, arg_value, container, wait_condition

SEED = REPO / "examples" / "qwen3.5-0.8b-q4_0-cpu.yaml"
NAME = "qwen3-5-0-8b"


def test_crd_established(cluster, crd):
    obj = cluster.get_json("crd", crd)
    conds = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"
    version = obj["spec"]["versions"][0]
    assert set(version["subresources"]) == {"status", "scale"}
    # kubectl explain is served from the published OpenAPI schema
    explain = cluster.kubectl("explain", "modeldeployment.spec.model", timeout=60).stdout
    assert "The GGUF model to serve" in explain
    for field in ("catalog", "quant", "url", "huggingFace", "pvc", "sha256"):
        assert f"  {field}\t<" in explain, explain


def test_seed_example(cluster, operator, pool, namespace):
    small = pool.add("cpu-small", cpu="2", memory="4Gi")
    large = pool.add(
        "cpu-large", cpu="16", memory="64Gi", labels={"feature.node.kubernetes.io/cpu-cpuid.AVX512F": "true"}
    )
    ns = ["-n", namespace]
    cluster.kubectl(*ns, "apply", "-f", str(SEED))
    obj = wait_condition(cluster, namespace, NAME, "Ready", timeout=90, operator=operator)

    st = obj["status"]
    plan = st["plan"]
    assert plan["backend"] == "cpu" and plan["gpuLayers"] == 0
    assert plan["quant"] == "Q4_0" and plan["model"].startswith("Qwen3.5-0.8B")
    assert plan["nodeClass"] in (small, large)
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert st["readyReplicas"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Ready": "True", "Planned": "True", "Progressing": "False", "Degraded": "False", "Unschedulable": "False",
    }  # fmt: skip

    deploy = cluster.get_json(*ns, "deployment", NAME)
    c = container(deploy)
    args = c["args"]
    assert args[: len(plan["args"])] == plan["args"]
    assert arg_value(args, "-c") == str(plan["context"])
    assert arg_value(args, "-ngl") == "0"
    assert arg_value(args, "--cache-ram") == str(plan["cacheRamMib"])
    assert "--metrics" in args
    res = c["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == plan["memoryRequest"]
    assert "nvidia.com/gpu" not in res.get("limits", {})
    assert deploy["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"

    svc = cluster.get_json(*ns, "service", NAME)
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert svc["metadata"]["ownerReferences"][0]["name"] == NAME
    assert st["endpoint"] == f"http://{NAME}.{namespace}.svc:8080"

    pods = cluster.get_json(*ns, "pods", "-l", f"modelfit.io/modeldeployment={NAME}")["items"]
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running"
    node = cluster.get_json("node", pods[0]["spec"]["nodeName"])
    assert "nvidia.com/gpu" not in node["status"]["allocatable"]
    assert pods[0]["spec"]["nodeName"] == plan["nodeClass"]

    table = cluster.kubectl(*ns, "get", "modeldeployments").stdout.splitlines()
    header = table[0].split()
    for col in ("NAME", "MODEL", "QUANT", "BACKEND", "GPU", "LAYERS", "CONTEXT", "MEMORY", "READY", "AGE"):
        assert col in header, table[0]
    row = table[1].split()
    assert row[0] == NAME and "Q4_0" in row and "cpu" in row and "True" in row and plan["memoryRequest"] in row
    wide = cluster.kubectl(*ns, "get", "md", "-o", "wide").stdout
    assert "NODE" in wide.splitlines()[0] and plan["nodeClass"] in wide
