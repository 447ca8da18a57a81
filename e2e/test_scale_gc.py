"""Scenario 4: `kubectl scale` through the scale subresource; deleting the ModelDeployment lets
the controller-manager's garbage collector remove every child."""

from __future__ import annotations

from _support import md, wait_condition

CHILD_KINDS = ("deployments", "services", "poddisruptionbudgets", "replicasets", "pods")


def _children(cluster, ns, name):
    out = {}
    for kind in CHILD_KINDS:
        items = cluster.get_json("-n", ns, kind, "-l", f"app.kubernetes.io/instance={name}")["items"]
        out[kind] = sorted(i["metadata"]["name"] for i in items if not i["metadata"].get("deletionTimestamp"))
    return out


def test_scale_subresource_and_garbage_collection(cluster, operator, pool, namespace):
    group = {"node.kubernetes.io/instance-type": f"{pool.id}-std"}
    pool.add("a", cpu="4", memory="8Gi", labels=group)
    pool.add("b", cpu="4", memory="8Gi", labels=group)
    ns = ["-n", namespace]
    cluster.apply(md("scaled", namespace, context=8192, nodeSelector=pool.selector))
    wait_condition(cluster, namespace, "scaled", "Ready", timeout=60, operator=operator)
    assert cluster.get_json(*ns, "poddisruptionbudgets")["items"] == []

    cluster.kubectl(*ns, "scale", "modeldeployment/scaled", "--replicas=2")
    assert cluster.get_json(*ns, "md", "scaled")["spec"]["replicas"] == 2
    cluster.wait_for(
        lambda: cluster.get_json(*ns, "deployment", "scaled")["spec"]["replicas"] == 2, timeout=60, what="Deployment 2"
    )
    pdb = cluster.wait_for(lambda: cluster.get_json(*ns, "pdb", "scaled", check=False), timeout=30, what="PDB")
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    obj = wait_condition(cluster, namespace, "scaled", "Ready", timeout=60, operator=operator)
    cluster.wait_for(
        lambda: cluster.get_json(*ns, "md", "scaled")["status"].get("readyReplicas") == 2, timeout=60, what="2 ready"
    )
    # the scale subresource reads back what the operator reports
    scale = cluster.kubectl(*ns, "get", "--raw",
                            f"/apis/modelfit.io/v1alpha1/namespaces/{namespace}/modeldeployments/scaled/scale").stdout  # fmt: skip
    assert '"replicas":2' in scale.replace(" ", ""), scale
    assert obj["status"]["selector"] in scale

    # back to one: the PDB goes away
    cluster.kubectl(*ns, "scale", "modeldeployment/scaled", "--replicas=1")
    cluster.wait_for(lambda: cluster.get_json(*ns, "pdb", "scaled", check=False) is None, timeout=60, what="no PDB")
    cluster.kubectl(*ns, "scale", "modeldeployment/scaled", "--replicas=2")
    cluster.wait_for(lambda: cluster.get_json(*ns, "pdb", "scaled", check=False), timeout=60, what="PDB again")

    before = _children(cluster, namespace, "scaled")
    assert all(before[k] for k in CHILD_KINDS), before
    cluster.kubectl(*ns, "delete", "modeldeployment", "scaled", "--wait=true", "--timeout=60s")
    cluster.wait_for(
        lambda: not any(_children(cluster, namespace, "scaled").values()),
        timeout=90,
        what="children garbage-collected",
    )
    assert operator.running()
