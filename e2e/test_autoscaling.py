"""Scenario 3: reactions to cluster autoscaling. Nodes come and go in a private pool (the
ModelDeployments select it with nodeSelector), as an autoscaler's node group would."""

from __future__ import annotations

import time

from _support import GPU_TAINT, arg_value, condition, container, md, wait_condition, wait_plan

GiB = 1024**3


def _deploy(cluster, ns, name):
    return cluster.get_json("-n", ns, "deployment", name)


def _pod_nodes(cluster, ns, name):
    pods = cluster.get_json("-n", ns, "pods", "-l", f"modelfit.io/modeldeployment={name}")["items"]
    return {
        p["spec"].get("nodeName")
        for p in pods
        if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
    }


def test_gpu_node_added_then_removed(cluster, operator, pool, namespace):
    cpu = pool.add("cpu", cpu="8", memory="16Gi")
    cluster.apply(md("chat", namespace, backend="auto", context=32768, kvCacheType="f16", nodeSelector=pool.selector))
    obj = wait_condition(cluster, namespace, "chat", "Ready", timeout=60, operator=operator)
    assert obj["status"]["plan"]["backend"] == "cpu" and obj["status"]["plan"]["nodeClass"] == cpu
    cpu_hash = obj["status"]["plan"]["hash"]

    # the autoscaler adds a GPU node (GPU feature discovery labels, the usual taint)
    t0 = time.monotonic()
    gpu = pool.add("gpu-24g", cpu="8", memory="32Gi", gpus=1, gpu_memory_mib=24576, taints=[GPU_TAINT])
    obj = wait_plan(cluster, namespace, "chat", timeout=60, backend="cuda", nodeClass=gpu)
    replanned = time.monotonic() - t0
    plan = obj["status"]["plan"]
    assert plan["gpuLayers"] == plan["totalLayers"] > 0, plan  # full offload
    assert plan["hash"] != cpu_hash
    deploy = _deploy(cluster, namespace, "chat")
    c = container(deploy)
    assert arg_value(c["args"], "-ngl") == str(plan["totalLayers"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cuda" in c["image"]
    tolerations = deploy["spec"]["template"]["spec"].get("tolerations") or []
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), tolerations
    cluster.wait_for(lambda: _pod_nodes(cluster, namespace, "chat") == {gpu}, timeout=60, what="pod on the GPU node")
    wait_condition(cluster, namespace, "chat", "Ready", timeout=60, operator=operator)
    events = cluster.kubectl("-n", namespace, "get", "events", "--field-selector", "reason=PlanChanged").stdout
    assert "cuda" in events, events
    print(f"GPU node added -> cuda plan in {replanned:.1f}s")

    # scale-down removes it: back to the CPU plan, rolled out again
    cluster.delete_node(gpu)
    obj = wait_plan(cluster, namespace, "chat", timeout=60, backend="cpu", nodeClass=cpu, gpuLayers=0)
    c = container(_deploy(cluster, namespace, "chat"))
    assert arg_value(c["args"], "-ngl") == "0"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert obj["status"]["plan"]["hash"] == cpu_hash  # the same plan as before the GPU came
    cluster.wait_for(lambda: _pod_nodes(cluster, namespace, "chat") == {cpu}, timeout=90, what="pod back on CPU")
    wait_condition(cluster, namespace, "chat", "Ready", timeout=60, operator=operator)


def test_node_removed_adapt_and_new_node(cluster, operator, pool, namespace):
    tiny = pool.add("tiny", cpu="2", memory="1Gi")
    only = pool.add("cpu", cpu="8", memory="16Gi")
    spec = {"context": 32768, "kvCacheType": "f16", "backend": "cpu", "nodeSelector": pool.selector}
    cluster.apply(md("strict", namespace, adapt=False, **spec))
    obj = wait_condition(cluster, namespace, "strict", "Ready", timeout=60, operator=operator)
    assert obj["status"]["plan"]["nodeClass"] == only

    # the only node that fits goes away
    cluster.delete_node(only)
    obj = wait_condition(cluster, namespace, "strict", "Planned", "False", "NoNodeFits", timeout=60, operator=operator)
    assert condition(obj, "Unschedulable")["status"] == "True"
    assert condition(obj, "Ready")["status"] == "False"
    assert tiny in condition(obj, "Planned")["message"]

    # with adapt: true a smaller plan fits the small node that is left
    cluster.kubectl("-n", namespace, "patch", "md", "strict", "--type=merge", "-p", '{"spec":{"adapt":true,"minContext":2048}}')  # fmt: skip
    obj = wait_condition(cluster, namespace, "strict", "Planned", "True", "Adapted", timeout=60, operator=operator)
    plan = obj["status"]["plan"]
    assert plan["adapted"] and plan["nodeClass"] == tiny
    assert plan["memoryRequestBytes"] <= 1 * GiB
    assert plan["context"] < 32768 or plan["kvCacheType"] != "f16", plan
    wait_condition(cluster, namespace, "strict", "Ready", timeout=60, operator=operator)

    # a ModelDeployment that fits nowhere waits ...
    cluster.apply(md("pending", namespace, adapt=False, **spec))
    wait_condition(cluster, namespace, "pending", "Planned", "False", "NoNodeFits", timeout=60, operator=operator)
    # ... until the autoscaler brings a node group of big nodes
    t0 = time.monotonic()
    group = {"node.kubernetes.io/instance-type": f"{pool.id}-big"}
    pool.add("big-1", cpu="16", memory="64Gi", labels=group)
    pool.add("big-2", cpu="16", memory="64Gi", labels=group)
    obj = wait_condition(cluster, namespace, "pending", "Ready", timeout=90, operator=operator)
    print(f"big nodes added -> pending ModelDeployment Ready in {time.monotonic() - t0:.1f}s")
    assert obj["status"]["plan"]["nodeSelector"] == group
    assert obj["status"]["plan"]["context"] == 32768
    # the adapted one gets its full plan back on the new nodes
    obj = wait_plan(cluster, namespace, "strict", timeout=60, context=32768, nodeSelector=group)
    wait_condition(cluster, namespace, "strict", "Planned", "True", "Planned", timeout=30, operator=operator)
    wait_condition(cluster, namespace, "strict", "Ready", timeout=90, operator=operator)
