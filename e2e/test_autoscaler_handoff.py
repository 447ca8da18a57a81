"""Hand-off to a cluster autoscaler: the operator knows the node shapes an autoscaler can add
(``--node-shapes``). A ModelDeployment that fits no present node gets its Deployment anyway, sized for
the smallest shape that fits and pinned to the shape's labels; a tiny loop that behaves like Cluster
Autoscaler (a pending, unschedulable pod whose nodeSelector and requests a shape satisfies -> a kwok node
of that shape) adds the node, and the pod schedules there without a re-plan. Scale-out takes the same
path: each new replica fits a node or asks for one."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml

from _support import POOL_LABEL, Operator, condition, md, wait_condition

SHAPE_LABEL = "modelfit.io/e2e-shape"


def _pods(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    items = cluster.get_json("-n", ns, "pods", "-l", f"modelfit.io/modeldeployment={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _unschedulable(pod: dict[str, Any]) -> bool:
    return pod["status"].get("phase") == "Pending" and any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in pod["status"].get("conditions") or []
    )


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod["status"].get("conditions") or [])


def _template_hash(cluster: Any, ns: str, name: str) -> str:
    deploy = cluster.get_json("-n", ns, "deployment", name)
    return str(deploy["spec"]["template"]["metadata"]["annotations"]["modelfit.io/plan-hash"])


class FakeClusterAutoscaler:
    """Scale-up as Cluster Autoscaler does it, in miniature: for each pod the scheduler marked Unschedulable,
    the first node group whose labels satisfy the pod's nodeSelector gets one more node (a kwok node with
    the group's labels and allocatable). One node per pending pod; nodes it adds are recorded with times."""

    def __init__(self, cluster: Any, pool: Any, namespace: str, shapes: list[dict[str, Any]]) -> None:
        self.cluster, self.pool, self.namespace, self.shapes = cluster, pool, namespace, shapes
        self.added: list[tuple[str, str, float]] = []  # (node, for pod, monotonic time)
        self.handled: set[str] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> FakeClusterAutoscaler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def scan(self) -> None:
        pods = self.cluster.get_json("-n", self.namespace, "pods")["items"]
        for pod in pods:
            uid = pod["metadata"]["uid"]
            if uid in self.handled or not _unschedulable(pod):
                continue
            want = pod["spec"].get("nodeSelector") or {}
            shape = next((s for s in self.shapes if all(s["labels"].get(k) == v for k, v in want.items())), None)
            if shape is None:
                continue
            self.handled.add(uid)
            name = self.pool.add(f"ca-{len(self.added) + 1}", cpu=str(shape["cpu"]), memory=shape["memory"],
                                 labels=shape["labels"], wait_ready=False)  # fmt: skip
            self.added.append((name, pod["metadata"]["name"], time.monotonic()))


def test_autoscaler_handoff(cluster, operator, pool, namespace, tmp_path: Path):
    shape_labels = {POOL_LABEL: pool.id, SHAPE_LABEL: f"{pool.id}-medium"}
    shapes = [
        {"name": "small", "labels": {POOL_LABEL: pool.id, SHAPE_LABEL: f"{pool.id}-small"}, "cpu": 1, "memory": "1Gi"},
        {"name": "large", "labels": {POOL_LABEL: pool.id, SHAPE_LABEL: f"{pool.id}-large"}, "cpu": 32, "memory": "128Gi"},
        {"name": "medium", "labels": shape_labels, "cpu": 8, "memory": "16Gi"},
    ]  # fmt: skip
    shapes_file = tmp_path / "node-shapes.yaml"
    shapes_file.write_text(yaml.safe_dump(shapes))
    pool.add("tiny", cpu="2", memory="1Gi")  # present, too small
    # Only one operator at a time: the session's (no shapes) steps aside for one that knows the shapes.
    operator.stop()
    mine = Operator(cluster.kubeconfig, tmp_path / "operator.log", ["-A", "--node-shapes", str(shapes_file)]).start()
    try:
        spec = {"context": 32768, "kvCacheType": "f16", "backend": "cpu", "adapt": False, "nodeSelector": pool.selector}
        t0 = time.monotonic()
        cluster.apply(md("big", namespace, **spec))
        obj = wait_condition(cluster, namespace, "big", "Planned", "True", "WaitingForNode", timeout=60, operator=mine)
        t_planned = time.monotonic()
        message = condition(obj, "Planned")["message"]
        assert "node shape medium" in message and "cluster autoscaler" in message, message
        plan = obj["status"]["plan"]
        assert plan["nodeClass"] == "medium" and plan["nodeSelector"] == shape_labels and plan["context"] == 32768
        planned_hash = plan["hash"]
        deploy = cluster.wait_for(
            lambda: cluster.get_json("-n", namespace, "deployment", "big", check=False), timeout=30, what="Deployment"
        )
        t_deploy = time.monotonic()
        assert deploy["spec"]["template"]["spec"]["nodeSelector"] == shape_labels
        template = _template_hash(cluster, namespace, "big")
        generation = deploy["metadata"]["generation"]
        pending = cluster.wait_for(
            lambda: [p for p in _pods(cluster, namespace, "big") if _unschedulable(p)], timeout=60, what="pending pod"
        )
        t_pending = time.monotonic()
        wait_condition(cluster, namespace, "big", "Unschedulable", "True", "WaitingForNode", timeout=30, operator=mine)

        with FakeClusterAutoscaler(cluster, pool, namespace, shapes) as ca:
            node = cluster.wait_for(lambda: ca.added[0] if ca.added else None, timeout=30, what="a node added")
            t_node = node[2]
            assert node[1] == pending[0]["metadata"]["name"]

            def scheduled() -> dict[str, Any] | None:
                return next((p for p in _pods(cluster, namespace, "big") if p["spec"].get("nodeName")), None)

            pod = cluster.wait_for(scheduled, timeout=60, what="pod scheduled")
            t_scheduled = time.monotonic()
            assert pod["spec"]["nodeName"] == node[0]
            cluster.wait_for(lambda: any(_ready(p) for p in _pods(cluster, namespace, "big")), timeout=60, what="Ready")
            t_ready = time.monotonic()
            obj = wait_condition(cluster, namespace, "big", "Ready", timeout=60, operator=mine)
            time.sleep(6)  # a resync tick after the node and the pod: the plan must not move
            obj = cluster.get_json("-n", namespace, "modeldeployment", "big")
            assert obj["status"]["plan"]["hash"] == planned_hash, obj["status"]["plan"]
            assert obj["status"]["plan"]["nodeSelector"] == shape_labels
            assert condition(obj, "Unschedulable")["status"] == "False"
            assert _template_hash(cluster, namespace, "big") == template
            assert cluster.get_json("-n", namespace, "deployment", "big")["metadata"]["generation"] == generation
            assert [p["metadata"]["name"] for p in _pods(cluster, namespace, "big")] == [pod["metadata"]["name"]]
            print(
                f"\ntimeline: apply -> Planned/WaitingForNode {t_planned - t0:.1f}s, Deployment {t_deploy - t0:.1f}s, "
                f"pod pending {t_pending - t0:.1f}s, node added {t_node - t0:.1f}s, "
                f"pod scheduled {t_scheduled - t0:.1f}s, Ready {t_ready - t0:.1f}s"
            )

            # Scale-out: every new replica fits a node of the shape or asks for one; the template stays.
            t1 = time.monotonic()
            cluster.kubectl("-n", namespace, "scale", "md", "big", "--replicas=3")
            cluster.wait_for(
                lambda: sum(_ready(p) for p in _pods(cluster, namespace, "big")) == 3, timeout=90, what="3 pods Ready"
            )
            nodes = {p["spec"]["nodeName"] for p in _pods(cluster, namespace, "big")}
            assert all(n.startswith(pool.name("ca-")) for n in nodes), nodes
            assert _template_hash(cluster, namespace, "big") == template
            assert all(p["metadata"]["annotations"].get("modelfit.io/plan-hash") == template
                       for p in _pods(cluster, namespace, "big"))  # fmt: skip
            obj = wait_condition(cluster, namespace, "big", "Ready", timeout=60, operator=mine)
            assert obj["status"]["plan"]["nodeSelector"] == shape_labels
            print(
                f"scale-out to 3: Ready in {time.monotonic() - t1:.1f}s on {len(nodes)} node(s), "
                f"{len(ca.added) - 1} added by the autoscaler"
            )
            assert not ca.errors, ca.errors
    finally:
        mine.stop()
        operator.start()
