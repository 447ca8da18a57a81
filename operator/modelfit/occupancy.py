"""What pods occupy on nodes: the requests the scheduler counts, per node and per owner.

Pure: the shell lists nodes and pods (``kube.ClusterSnapshot``); these functions turn the
lists into the node facts placement plans on. A node fits a pod only if what is left of its
allocatable CPU and memory, after every pod's requests, covers the pod's requests: that is
the scheduler's rule, so a plan made here is never refused for room.

The pods of a Deployment we just applied are not in a node list yet (not created, or not
scheduled); planned in a burst, every plan would see the same empty node. A ``Reservation``
holds what those pods will request until a list shows them; ``place_reserved`` puts them
where the scheduler's default spread would (the matching node with the most room left).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .nodes import NodeFacts, node_facts_from_k8s, parse_quantity

PerNode = dict[str, tuple[int, int]]
"""Node name -> (CPU millis, memory bytes)."""
PerOwner = dict[tuple[str, str], list[tuple[str, int, int]]]
"""(namespace, owner label value) -> the owner's pods as (node, CPU millis, memory bytes)."""


def cpu_millis(quantity: Any) -> int:
    """A CPU quantity ('500m', '2', 1.5) in millicores; none is 0."""
    return int(parse_quantity(quantity) * 1000) if quantity not in (None, "") else 0


def requests_of(resources: Mapping[str, Any] | None) -> tuple[int, int]:
    """(CPU millis, memory bytes) of a resources block's requests."""
    r = (resources or {}).get("requests") or {}
    mem = r.get("memory")
    return cpu_millis(r.get("cpu")), int(parse_quantity(mem)) if mem not in (None, "") else 0


def pod_requests(pod: Mapping[str, Any]) -> tuple[int, int]:
    """(CPU millis, memory bytes) a pod requests: containers summed, init containers at their max, plus overhead."""
    spec = pod.get("spec") or {}
    cpu = mem = 0
    for c in spec.get("containers") or []:
        a, b = requests_of(c.get("resources"))
        cpu, mem = cpu + a, mem + b
    for c in spec.get("initContainers") or []:
        a, b = requests_of(c.get("resources"))
        cpu, mem = max(cpu, a), max(mem, b)
    over_cpu, over_mem = requests_of({"requests": spec.get("overhead") or {}})
    return cpu + over_cpu, mem + over_mem


def node_usable(node: Mapping[str, Any]) -> bool:
    """Schedulable and not NotReady (a node without a Ready condition yet counts as usable)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return True


def _holds(pod: Mapping[str, Any]) -> str | None:
    """The node a pod's requests count on, or None (not scheduled, or finished)."""
    node = (pod.get("spec") or {}).get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    return str(node) if node and phase not in ("Succeeded", "Failed") else None


def usage(pods: Iterable[Mapping[str, Any]], owner_label: str) -> tuple[PerNode, PerOwner]:
    """What the pods request per node, and per (namespace, ``owner_label`` value) where each owned pod is."""
    used: PerNode = {}
    by_owner: PerOwner = {}
    for pod in pods:
        node = _holds(pod)
        if node is None:
            continue
        cpu, mem = pod_requests(pod)
        a, b = used.get(node, (0, 0))
        used[node] = (a + cpu, b + mem)
        meta = pod.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(owner_label)
        if owner:
            by_owner.setdefault((str(meta.get("namespace")), str(owner)), []).append((node, cpu, mem))
    return used, by_owner


def free(base: Iterable[NodeFacts], used: PerNode, own: Iterable[tuple[str, int, int]] = ()) -> list[NodeFacts]:
    """The nodes' facts less what ``used`` requests on them, giving back the ``own`` pods (a re-plan may reuse
    their room)."""
    mine: PerNode = {}
    for node, cpu, mem in own:
        a, b = mine.get(node, (0, 0))
        mine[node] = (a + cpu, b + mem)
    out = []
    for n in base:
        cpu, mem = used.get(n.name, (0, 0))
        own_cpu, own_mem = mine.get(n.name, (0, 0))
        out.append(
            n.model_copy(
                update={
                    "cpu_millis": max(n.cpu_millis - cpu + own_cpu, 0),
                    "memory_bytes": max((n.memory_bytes or 0) - mem + own_mem, 0),
                }
            )
        )
    return out


def node_facts(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    exclude: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[NodeFacts]:
    """Facts of the usable nodes, less what their pods request (pods matching ``exclude`` don't count)."""
    used, _ = usage((p for p in pods if exclude is None or not exclude(p)), owner_label="")
    return [
        node_facts_from_k8s(dict(n), *used.get(str((n.get("metadata") or {}).get("name")), (0, 0)))
        for n in nodes
        if node_usable(n)
    ]


@dataclass(frozen=True)
class Reservation:
    """What the pods of one of our Deployments will request, and where they may go (the pod template's
    nodeSelector): counted on the nodes until the pods show up scheduled in a node list."""

    selector: tuple[tuple[str, str], ...]
    cpu_millis: int
    memory_bytes: int
    replicas: int

    @classmethod
    def of(cls, deploy: Mapping[str, Any]) -> Reservation:
        spec = deploy.get("spec") or {}
        pod_spec = (spec.get("template") or {}).get("spec") or {}
        cpu, mem = pod_requests({"spec": pod_spec})
        selector = tuple(sorted((pod_spec.get("nodeSelector") or {}).items()))
        return cls(selector, cpu, mem, int(spec.get("replicas", 1) or 0))


def place_reserved(
    base: Sequence[NodeFacts], used: PerNode, by_owner: PerOwner, reservations: Mapping[tuple[str, str], Reservation]
) -> tuple[PerNode, PerOwner]:
    """Reserved pods a node list does not show yet, each put on the matching node with the most room left (the
    scheduler's default spread); per node, and per owner. A pod no node has room for takes nothing: the scheduler
    will refuse it too."""
    room = {
        n.name: [n.cpu_millis - used.get(n.name, (0, 0))[0], (n.memory_bytes or 0) - used.get(n.name, (0, 0))[1]]
        for n in base
    }
    labels = {n.name: n.labels for n in base}
    pending: PerNode = {}
    placed: PerOwner = {}
    for owner, r in sorted(reservations.items()):
        for _ in range(max(0, r.replicas - len(by_owner.get(owner, [])))):
            fits = [
                n
                for n, (c, m) in room.items()
                if c >= r.cpu_millis and m >= r.memory_bytes and all(labels[n].get(k) == v for k, v in r.selector)
            ]
            if not fits:
                break
            n = max(fits, key=lambda x: (room[x][0], room[x][1], x))
            room[n][0] -= r.cpu_millis
            room[n][1] -= r.memory_bytes
            a, b = pending.get(n, (0, 0))
            pending[n] = (a + r.cpu_millis, b + r.memory_bytes)
            placed.setdefault(owner, []).append((n, r.cpu_millis, r.memory_bytes))
    return pending, placed


def add(a: PerNode, b: PerNode) -> PerNode:
    """Per-node sums of two usages."""
    out = dict(a)
    for node, (cpu, mem) in b.items():
        c, m = out.get(node, (0, 0))
        out[node] = (c + cpu, m + mem)
    return out
