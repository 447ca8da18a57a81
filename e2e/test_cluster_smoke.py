"""Smoke test of the e2e control plane: scheduling onto a kwok node, kwok pod
lifecycle, and garbage collection (Deployment -> ReplicaSet -> Pods)."""

from __future__ import annotations

import uuid


def _deployment(name: str, namespace: str, node_selector: dict) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": node_selector,
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.k8s.io/pause:3.10",
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                        }
                    ],
                },
            },
        },
    }


def test_api_and_rbac_basics(cluster):
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    # RBAC is enforced: an unprivileged ServiceAccount may not list nodes ...
    denied = cluster.kubectl(
        "auth", "can-i", "list", "nodes", "--as=system:serviceaccount:default:default", check=False
    )
    assert denied.stdout.strip() == "no"
    # ... and ServiceAccount tokens can be minted (token signing configured).
    token = cluster.kubectl("-n", "default", "create", "token", "default").stdout.strip()
    assert token.count(".") == 2


def test_deployment_runs_on_fake_node_and_gc(cluster, make_node, namespace):
    node = f"kwok-smoke-{uuid.uuid4().hex[:6]}"
    make_node(node, cpu="4", memory="8Gi", gpus=2, gpu_memory_mib=81920, labels={"smoke": node})
    n = cluster.get_json("node", node)
    assert n["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert n["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81920"

    ns = ["-n", namespace]
    cluster.apply(_deployment("smoke", namespace, {"smoke": node}))

    def running_pod():
        pods = cluster.get_json(*ns, "pods", "-l", "app=smoke")["items"]
        for p in pods:
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            if p["status"].get("phase") == "Running" and ready:
                return p
        return None

    pod = cluster.wait_for(running_pod, timeout=60, what="smoke pod Running/Ready")
    assert pod["spec"]["nodeName"] == node
    assert pod["status"].get("podIP")

    rs = cluster.get_json(*ns, "replicasets", "-l", "app=smoke")["items"]
    assert len(rs) == 1
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert pod["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"]

    # Deleting the Deployment: the garbage collector removes the ReplicaSet and,
    # transitively, its Pods (kwok's pod-delete stage finalizes the pod).
    cluster.kubectl(*ns, "delete", "deployment", "smoke", "--wait=false")
    cluster.wait_for(
        lambda: not cluster.get_json(*ns, "replicasets", "-l", "app=smoke")["items"],
        timeout=60,
        what="ReplicaSet garbage-collected",
    )
    cluster.wait_for(
        lambda: not cluster.get_json(*ns, "pods", "-l", "app=smoke")["items"],
        timeout=60,
        what="Pods garbage-collected",
    )
