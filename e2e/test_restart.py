"""Scenario 5: the operator is SIGKILLed in the middle of reconciling and restarted: it
converges, creates no duplicate children and keeps the status it had written."""

from __future__ import annotations

import time

from _support import condition, md, wait_condition

N = 6


def test_killed_mid_reconcile_converges(cluster, operator, pool, namespace):
    group = {"node.kubernetes.io/instance-type": f"{pool.id}-std"}
    for i in range(N + 2):  # each pod asks for a whole node's CPUs
        pool.add(f"n{i}", cpu="4", memory="8Gi", labels=group)
    ns = ["-n", namespace]
    names = [f"m{i}" for i in range(N)]
    # one already settled before the crash: its status must survive untouched
    cluster.apply(md("settled", namespace, context=4096, nodeSelector=pool.selector))
    settled = wait_condition(cluster, namespace, "settled", "Ready", timeout=60, operator=operator)

    # a burst of creates, then SIGKILL while the operator is busy with them
    manifest = {"apiVersion": "v1", "kind": "List",
                "items": [md(n, namespace, context=4096, nodeSelector=pool.selector) for n in names]}  # fmt: skip
    cluster.apply(manifest)
    cluster.wait_for(  # the first child written: the operator is mid-way through the burst
        lambda: len(cluster.get_json(*ns, "deployments")["items"]) > 1, timeout=30, interval=0.02, what="first child"
    )
    operator.kill()
    deps = {d["metadata"]["name"] for d in cluster.get_json(*ns, "deployments")["items"]}
    planned = {
        m["metadata"]["name"] for m in cluster.get_json(*ns, "md")["items"] if (m.get("status") or {}).get("plan")
    }
    print(f"at SIGKILL: {len(deps & set(names))}/{N} Deployments, {len(planned & set(names))}/{N} statuses written")

    operator.start()
    for n in names:
        wait_condition(cluster, namespace, n, "Ready", timeout=90, operator=operator)
    time.sleep(6)  # one more resync tick: nothing further may change

    for n in [*names, "settled"]:
        deps = cluster.get_json(*ns, "deployments", "-l", f"app.kubernetes.io/instance={n}")["items"]
        svcs = cluster.get_json(*ns, "services", "-l", f"app.kubernetes.io/instance={n}")["items"]
        rss = cluster.get_json(*ns, "replicasets", "-l", f"app.kubernetes.io/instance={n}")["items"]
        assert len(deps) == 1 and len(svcs) == 1, (n, deps, svcs)
        assert len(rss) == 1, f"{n}: {len(rss)} ReplicaSets (a restart must not roll out a new template)"
        refs = deps[0]["metadata"]["ownerReferences"]
        assert len(refs) == 1 and refs[0]["name"] == n and refs[0]["controller"] is True
        obj = cluster.get_json(*ns, "md", n)
        types = [c["type"] for c in obj["status"]["conditions"]]
        assert len(types) == len(set(types)) == 5, types
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert obj["status"]["plan"]["hash"]

    after = cluster.get_json(*ns, "md", "settled")
    assert after["status"]["plan"] == settled["status"]["plan"]
    for t in ("Ready", "Planned"):
        assert condition(after, t)["lastTransitionTime"] == condition(settled, t)["lastTransitionTime"], t
    assert after["metadata"]["generation"] == settled["metadata"]["generation"]
    assert operator.running()
