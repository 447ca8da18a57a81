"""The operator as a service (issue 17, item 6): two replicas with leader election, failover measured; drift
the generation does not show (a child deleted, edits made while no operator ran) restored within seconds."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from _support import Operator, md, wait_condition

LEASE_NS = "default"


@pytest.fixture
def session_operator_paused(operator: Operator) -> Any:
    """Stop the session's operator so that only the replicas under test act."""
    operator.stop()
    yield
    operator.start()


def holder(cluster: Any, lease: str) -> str | None:
    obj = cluster.get_json("-n", LEASE_NS, "lease", lease, check=False)
    return ((obj or {}).get("spec") or {}).get("holderIdentity")


def test_two_replicas_fail_over(cluster, session_operator_paused, pool, namespace, tmp_path: Path) -> None:
    pool.add("a", cpu="16", memory="64Gi")
    lease = f"lease-{uuid.uuid4().hex[:6]}"  # never containing a model's name ("ha-1" in "ha-17697f" failed CI once)
    args = ["-A", "--leader-elect", "--leader-elect-namespace", LEASE_NS, "--leader-elect-id", lease]
    a = Operator(cluster.kubeconfig, tmp_path / "a.log", args).start()
    cluster.wait_for(lambda: holder(cluster, lease), timeout=30, what="a leader")
    b = Operator(cluster.kubeconfig, tmp_path / "b.log", args).start()
    try:
        spec = {"context": 4096, "nodeSelector": pool.selector}
        cluster.apply(md("ha-1", namespace, **spec))
        wait_condition(cluster, namespace, "ha-1", "Ready", timeout=60, operator=a)
        time.sleep(3)
        assert "ha-1" not in b.log_path.read_text(), "the follower reconciled"
        assert "waiting for the lease" in b.log_path.read_text()

        # The leader crashes: the follower takes over when the lease runs out (15 s) plus one retry (2 s).
        first = holder(cluster, lease)
        a.kill()
        t0 = time.monotonic()
        cluster.apply(md("ha-2", namespace, **spec))
        wait_condition(cluster, namespace, "ha-2", "Planned", timeout=60, operator=b)
        crash_s = time.monotonic() - t0
        assert holder(cluster, lease) not in (None, first)

        # A clean stop hands the lease back: the other replica leads within a retry period or two.
        a = Operator(cluster.kubeconfig, tmp_path / "a2.log", args).start()
        cluster.wait_for(lambda: "waiting for the lease" in a.log_path.read_text(), timeout=30, what="a follower")
        b.stop()
        t1 = time.monotonic()
        cluster.apply(md("ha-3", namespace, **spec))
        wait_condition(cluster, namespace, "ha-3", "Planned", timeout=60, operator=a)
        handover_s = time.monotonic() - t1
        assert crash_s < 30 and handover_s < 12, (crash_s, handover_s)
        print(f"\n[ha] failover: leader killed -> new model planned {crash_s:.1f}s; clean stop -> {handover_s:.1f}s")
    finally:
        a.stop()
        b.stop()


def test_drift_while_down_and_deleted_children_are_restored(
    cluster, operator: Operator, pool, namespace, tmp_path: Path
) -> None:
    pool.add("a", cpu="16", memory="64Gi")
    ns = ["-n", namespace]
    cluster.apply(md("drift-down", namespace, context=4096, nodeSelector=pool.selector))
    wait_condition(cluster, namespace, "drift-down", "Ready", timeout=60, operator=operator)
    before = cluster.get_json(*ns, "deployment", "drift-down")["spec"]["template"]["spec"]["containers"][0]

    # A restart with nothing changed restores nothing (the API server's defaults are not drift).
    operator.stop()
    mark = len(operator.log_path.read_text())
    operator.start()
    time.sleep(8)
    assert "restoring" not in operator.log_path.read_text()[mark:], operator.log_tail()

    # Edited and deleted while no operator runs.
    operator.stop()
    cluster.kubectl(*ns, "set", "image", "deployment/drift-down", "llama-server=example.com/hand-edited:1")
    cluster.kubectl(*ns, "delete", "service", "drift-down")
    t0 = time.monotonic()
    operator.start()

    def restored() -> bool:
        c = cluster.get_json(*ns, "deployment", "drift-down")["spec"]["template"]["spec"]["containers"][0]
        return c["image"] == before["image"] and bool(cluster.get_json(*ns, "service", "drift-down", check=False))

    cluster.wait_for(restored, timeout=30, interval=0.5, what="edits made while down reverted, Service back")
    down_s = time.monotonic() - t0

    # A Service deleted by hand while the operator runs.
    t1 = time.monotonic()
    cluster.kubectl(*ns, "delete", "service", "drift-down")
    cluster.wait_for(
        lambda: cluster.get_json(*ns, "service", "drift-down", check=False), timeout=30, interval=0.5, what="Service"
    )
    svc_s = time.monotonic() - t1
    print(f"\n[drift] while down: restored {down_s:.1f}s after the start; deleted Service back in {svc_s:.1f}s")
