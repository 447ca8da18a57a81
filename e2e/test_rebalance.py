"""No churn and scale-out on the real control plane (kwok nodes).

- A running plan stays on its node class when a roomier class joins (spec.rebalance WhenBetter: the new
  plan is not materially better), and moves, surging, when a GPU class joins (a 100-point GPU share gain).
- spec.autoscaling renders an HPA on the ModelDeployment's /scale subresource; scaling through /scale
  (what the HPA does) changes the Deployment's replicas without a new plan.
"""

from __future__ import annotations

import json
import time

from _support import GPU_TAINT, condition, md, wait_condition, wait_plan


def _deploy(cluster, ns, name):
    return cluster.get_json("-n", ns, "deployment", name)


def _events(cluster, ns, name, reason):
    items = cluster.get_json("-n", ns, "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [e for e in items if e.get("reason") == reason]


def test_no_churn_then_a_materially_better_move(cluster, operator, pool, namespace):
    small = pool.add("small", cpu="4", memory="8Gi")
    spec = {"context": 8192, "backend": "auto", "kvCacheType": "f16", "nodeSelector": pool.selector}
    cluster.apply(md("steady", namespace, **spec))
    obj = wait_condition(cluster, namespace, "steady", "Ready", timeout=60, operator=operator)
    plan = obj["status"]["plan"]
    assert plan["nodeClass"] == small and plan["rollout"] == "Surge"
    generation = _deploy(cluster, namespace, "steady")["metadata"]["generation"]

    # A roomier CPU class joins: same context, so not worth a move.
    big = pool.add("big", cpu="16", memory="64Gi")
    t0 = time.monotonic()
    cluster.wait_for(
        lambda: (
            "kept: a re-plan (cpu on "
            in condition(cluster.get_json("-n", namespace, "modeldeployment", "steady"), "Planned").get("message", "")
        ),
        timeout=30,
        what="the re-plan after the new node is kept",
    )
    obj = cluster.get_json("-n", namespace, "modeldeployment", "steady")
    assert obj["status"]["plan"]["nodeClass"] == small and big not in str(obj["status"]["plan"]["nodeSelector"])
    assert _deploy(cluster, namespace, "steady")["metadata"]["generation"] == generation  # nothing rolled
    print(f"\n[rebalance] roomier node {big}: plan kept on {small} ({time.monotonic() - t0:.1f}s to decide)")

    # A GPU class joins: full offload is 100 points of GPU share, so the pods move, surging.
    gpu = pool.add("gpu", cpu="8", memory="32Gi", gpus=1, gpu_memory_mib=24576, taints=[GPU_TAINT])
    t1 = time.monotonic()
    obj = wait_plan(cluster, namespace, "steady", timeout=60, backend="cuda", nodeClass=gpu)
    assert obj["status"]["plan"]["rollout"] == "Surge"
    planned = condition(obj, "Planned")
    assert "moved: GPU share 0% -> 100%" in planned["message"]
    strategy = _deploy(cluster, namespace, "steady")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}
    wait_condition(cluster, namespace, "steady", "Ready", timeout=60, operator=operator)
    print(f"[rebalance] GPU node {gpu}: moved with surge, Ready {time.monotonic() - t1:.1f}s after it joined")


def test_autoscaling_renders_an_hpa_and_scaling_is_not_a_new_plan(cluster, operator, pool, namespace):
    pool.add("a", cpu="8", memory="16Gi")
    auto = {"minReplicas": 1, "maxReplicas": 3, "targetUtilization": 50, "scaleDownStabilizationSeconds": 0}
    cluster.apply(md("scaled", namespace, context=8192, parallel=2, nodeSelector=pool.selector, autoscaling=auto))
    obj = wait_condition(cluster, namespace, "scaled", "Ready", timeout=60, operator=operator)
    plan_hash = obj["status"]["plan"]["hash"]
    hpa = cluster.get_json("-n", namespace, "hpa", "scaled")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "modelfit.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": "scaled",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "llamacpp_requests_inflight"
    assert metric["pods"]["target"]["averageValue"] == "1"  # 2 slots x 50%
    assert any("autoscaling 1-3 replicas" in r for r in obj["status"]["plan"]["reasons"])

    # What the HPA does: write spec.replicas through /scale.
    cluster.kubectl("-n", namespace, "scale", "modeldeployment/scaled", "--replicas=2")
    cluster.wait_for(
        lambda: _deploy(cluster, namespace, "scaled")["spec"]["replicas"] == 2,
        timeout=30,
        what="the Deployment follows /scale",
    )
    obj = wait_condition(cluster, namespace, "scaled", "Ready", timeout=60, operator=operator)
    assert obj["status"]["plan"]["hash"] == plan_hash and obj["status"]["readyReplicas"] == 2
    assert len(_events(cluster, namespace, "scaled", "PlanChanged")) == 1  # the first plan only
    raw = cluster.kubectl(
        "get", "--raw", f"/apis/modelfit.io/v1alpha1/namespaces/{namespace}/modeldeployments/scaled/scale"
    )
    scale = json.loads(raw.stdout)
    assert scale["status"]["replicas"] == 2 and "app.kubernetes.io/instance=scaled" in scale["status"]["selector"]
    # A PodDisruptionBudget guards the replicas the HPA may add.
    assert cluster.get_json("-n", namespace, "pdb", "scaled")["spec"]["maxUnavailable"] == 1
