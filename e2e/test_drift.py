"""Hand edits of an owned Deployment (image, memory limit, replicas) are restored within seconds."""

from __future__ import annotations

import time

from _support import md, wait_condition


def test_hand_edits_are_restored(cluster, operator, pool, namespace):
    pool.add("a", cpu="8", memory="16Gi")
    ns = ["-n", namespace]
    cluster.apply(md("drift", namespace, context=8192, nodeSelector=pool.selector))
    wait_condition(cluster, namespace, "drift", "Ready", timeout=60, operator=operator)
    before = cluster.get_json(*ns, "deployment", "drift")["spec"]
    c0 = before["template"]["spec"]["containers"][0]

    t0 = time.monotonic()
    cluster.kubectl(*ns, "set", "image", "deployment/drift", "llama-server=example.com/hand-edited:1")
    cluster.kubectl(*ns, "set", "resources", "deployment/drift", "-c", "llama-server", "--limits=memory=9Gi")
    cluster.kubectl(*ns, "scale", "deployment/drift", "--replicas=3")

    def restored() -> bool:
        spec = cluster.get_json(*ns, "deployment", "drift")["spec"]
        c = spec["template"]["spec"]["containers"][0]
        return bool(
            c["image"] == c0["image"]
            and c["resources"]["limits"]["memory"] == c0["resources"]["limits"]["memory"]
            and spec["replicas"] == before["replicas"]
        )

    cluster.wait_for(restored, timeout=30, interval=0.5, what="hand edits reverted")
    print(f"\n[drift] image, memory limit and replicas restored {time.monotonic() - t0:.1f}s after the edits")
    wait_condition(cluster, namespace, "drift", "Ready", timeout=60, operator=operator)
