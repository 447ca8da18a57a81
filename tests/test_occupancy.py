"""What pods occupy on nodes, and where the pods of a burst of plans will go (modelfit.occupancy)."""

import pytest

from modelfit.nodes import Requests as R
from modelfit.nodes import node_facts_from_k8s
from modelfit.occupancy import (
    Reservation,
    cpu_millis,
    free,
    node_facts,
    node_usable,
    place_reserved,
    pod_requests,
    requests_of,
    usage,
)

Gi = 1 << 30
LABEL = "modelfit.io/owner"


def k8s_node(name, cpu="8", memory="32Gi", labels=None, **extra):
    node = {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"}},
    }
    node.update(extra)
    return node


def pod(node, cpu="1", memory="1Gi", owner=None, ns="a", phase="Running"):
    labels = {LABEL: owner} if owner else {}
    return {
        "metadata": {"name": f"p-{node}-{cpu}-{memory}", "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"resources": {"requests": {"cpu": cpu, "memory": memory}}}]},
        "status": {"phase": phase},
    }


def test_quantities_and_requests():
    assert cpu_millis("500m") == 500 and cpu_millis("2") == 2000 and cpu_millis(None) == 0 and cpu_millis("") == 0
    assert requests_of({"requests": {"cpu": "250m", "memory": "1Gi"}}) == R(250, Gi)
    assert requests_of(None) == R() and requests_of({"limits": {"cpu": "4"}}) == R()
    # GPUs are an extended resource: a limit alone is their request too, whatever the vendor
    assert requests_of({"limits": {"nvidia.com/gpu": "2"}}) == R(gpus=2)
    assert requests_of({"requests": {"amd.com/gpu": "1"}, "limits": {"amd.com/gpu": "1"}}) == R(gpus=1)
    with pytest.raises(ValueError):
        requests_of({"requests": {"cpu": "lots"}})


def test_pod_requests_sum_containers_max_init_and_add_overhead():
    p = {
        "spec": {
            "containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}] * 2,
            "initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}],
            "overhead": {"cpu": "100m", "memory": "64Mi"},
        }
    }
    assert pod_requests(p) == R(2100, 2 * Gi + (64 << 20))
    assert pod_requests({}) == R()


def test_usable_nodes_are_all_but_those_being_deleted_a_cordon_or_not_ready_is_a_taint():
    """A cordoned or not Ready node stays in the node facts, with the taint the node lifecycle controller gives
    it: placement leaves it out as the scheduler does (unless the pod tolerates it) and names it."""
    assert node_usable(k8s_node("n"))  # no Ready condition yet
    assert not node_usable(k8s_node("n", metadata={"name": "n", "deletionTimestamp": "2025-01-01T00:00:00Z"}))
    cordoned = k8s_node("c", spec={"unschedulable": True})
    not_ready, unknown = k8s_node("r"), k8s_node("u")
    not_ready["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    unknown["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    assert all(node_usable(n) for n in (cordoned, not_ready, unknown))
    taints = {n["metadata"]["name"]: node_facts_from_k8s(n).taints for n in (cordoned, not_ready, unknown)}
    assert taints == {
        "c": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}],
        "r": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}],
        "u": [{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}],
    }
    assert node_facts_from_k8s(k8s_node("n")).taints == []
    # the controller's own taint is not doubled
    drained = k8s_node("d", spec={"unschedulable": True, "taints": taints["c"]})
    assert node_facts_from_k8s(drained).taints == taints["c"]


def test_node_facts_count_running_pods_only():
    cordoned = k8s_node("small", "2", "4Gi", spec={"unschedulable": True})
    pods = [
        pod("big", "500m", "1Gi"),
        pod("big", "500m", "1Gi"),
        pod("big", "4", "4Gi", phase="Succeeded"),  # finished: holds nothing
        {**pod("", "4", "4Gi"), "spec": {"containers": []}},  # not scheduled
    ]
    facts = node_facts([k8s_node("big", "16", "64Gi"), cordoned], pods)
    assert [(f.name, f.cpu_millis, f.memory_bytes) for f in facts] == [("big", 15000, 62 * Gi), ("small", 2000, 4 * Gi)]
    assert facts[1].taints == [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
    mine = node_facts([k8s_node("big", "16", "64Gi")], pods, exclude=lambda p: p is pods[0])
    assert (mine[0].cpu_millis, mine[0].memory_bytes) == (15500, 63 * Gi)


def test_usage_per_node_and_per_owner():
    used, by_owner = usage([pod("n1", owner="m"), pod("n1", "2", "2Gi"), pod("n2", owner="m", ns="b")], LABEL)
    assert used == {"n1": R(3000, 3 * Gi), "n2": R(1000, Gi)}
    assert by_owner == {("a", "m"): [("n1", R(1000, Gi))], ("b", "m"): [("n2", R(1000, Gi))]}


def test_free_gives_back_the_owners_own_pods():
    base = [node_facts_from_k8s(k8s_node("n1", "4", "8Gi"))]
    used = {"n1": R(3000, 6 * Gi)}
    assert (free(base, used)[0].cpu_millis, free(base, used)[0].memory_bytes) == (1000, 2 * Gi)
    back = free(base, used, own=[("n1", R(2000, 2 * Gi))])[0]
    assert (back.cpu_millis, back.memory_bytes) == (3000, 4 * Gi)
    over = free(base, {"n1": R(9000, 9 * Gi)})[0]  # an overcommitted node has nothing free, not less
    assert (over.cpu_millis, over.memory_bytes) == (0, 0)


def deployment(cpu, memory, replicas=1, selector=None):
    return {
        "spec": {
            "replicas": replicas,
            "template": {
                "spec": {
                    "nodeSelector": selector or {},
                    "containers": [{"resources": {"requests": {"cpu": cpu, "memory": memory}}}],
                }
            },
        }
    }


def test_reservation_of_a_deployment():
    r = Reservation.of(deployment("2", "1Gi", replicas=3, selector={"pool": "cpu"}))
    assert r == Reservation((("pool", "cpu"),), R(2000, Gi), 3)
    assert Reservation.of({"spec": {"replicas": 0}}).replicas == 0


def test_reserved_pods_go_nowhere_the_scheduler_would_not_put_them():
    """A cordoned node (or one with a taint the pods do not tolerate) holds no reserved pod: the scheduler
    would not put it there, so the room it shows is not taken."""
    cordoned = node_facts_from_k8s(k8s_node("c", "16", "64Gi", spec={"unschedulable": True}))
    gpu = node_facts_from_k8s(k8s_node("g", "8", "32Gi", spec={"taints": [{"key": "gpu", "effect": "NoSchedule"}]}))
    small = node_facts_from_k8s(k8s_node("s", "2", "4Gi"))
    plain = Reservation.of(deployment("1", "1Gi", replicas=3))
    _, placed = place_reserved([cordoned, gpu, small], {}, {}, {("ns", "x"): plain})
    assert placed[("ns", "x")] == [("s", R(1000, Gi)), ("s", R(1000, Gi))]  # the third finds no room
    tolerant = deployment("1", "1Gi")
    tolerant["spec"]["template"]["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    _, placed = place_reserved([cordoned, gpu], {}, {}, {("ns", "y"): Reservation.of(tolerant)})
    assert placed[("ns", "y")] == [("g", R(1000, Gi))]


def test_reserved_pods_spread_to_the_roomiest_matching_node_and_stop_when_nothing_fits():
    base = [
        node_facts_from_k8s(k8s_node("a", "4", "8Gi", {"pool": "cpu"})),
        node_facts_from_k8s(k8s_node("b", "4", "8Gi", {"pool": "cpu"})),
        node_facts_from_k8s(k8s_node("g", "16", "64Gi", {"pool": "gpu"})),
    ]
    used = {"a": R(1000, 0)}
    reservations = {
        ("ns", "x"): Reservation((("pool", "cpu"),), R(2000, 2 * Gi), 3),  # b (roomier), then a, then b again
        ("ns", "y"): Reservation((("pool", "cpu"),), R(2000, Gi), 1),  # no room left in the pool: takes nothing
        ("ns", "z"): Reservation((), R(1000, Gi), 2),  # one pod already listed; the other goes to g
    }
    by_owner = {("ns", "z"): [("g", R(1000, Gi))]}
    pending, placed = place_reserved(base, used, by_owner, reservations)
    assert placed[("ns", "x")] == [("b", R(2000, 2 * Gi)), ("a", R(2000, 2 * Gi)), ("b", R(2000, 2 * Gi))]
    assert ("ns", "y") not in placed
    assert placed[("ns", "z")] == [("g", R(1000, Gi))]
    assert pending == {"a": R(2000, 2 * Gi), "b": R(4000, 4 * Gi), "g": R(1000, Gi)}


def test_gpus_other_pods_hold_are_not_free() -> None:
    """A node whose only GPU another pod holds offers no GPU: a plan there runs on the CPU."""
    gpu_node = k8s_node("g", "16", "64Gi", {"nvidia.com/gpu.memory": "24576"})
    gpu_node["status"]["allocatable"]["nvidia.com/gpu"] = "1"
    holder = pod("g", "1", "1Gi")
    holder["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpu": "1"}
    assert node_facts([gpu_node], [])[0].gpus == 1
    taken = node_facts([gpu_node], [holder])[0]
    assert taken.gpus == 0 and taken.gpu_vendor == "nvidia"
    used, by_owner = usage([{**holder, "metadata": {**holder["metadata"], "labels": {LABEL: "m"}}}], LABEL)
    assert used == {"g": R(1000, Gi, 1)}
    base = [node_facts_from_k8s(gpu_node)]
    assert free(base, used)[0].gpus == 0
    assert free(base, used, own=by_owner[("a", "m")])[0].gpus == 1  # our own pod's GPU is ours to re-plan
    # a burst: the second GPU pod reserved for the node finds no GPU left
    reservation = Reservation((), R(1000, Gi, 1), 2)
    pending, placed = place_reserved(base, {}, {}, {("ns", "x"): reservation})
    assert placed[("ns", "x")] == [("g", R(1000, Gi, 1))] and pending == {"g": R(1000, Gi, 1)}
