"""What pods occupy on nodes: the requests the scheduler counts, per node and per owner.

Pure: the shell lists nodes and pods (``kube.ClusterSnapshot``); these functions turn the
lists into the node facts placement plans on. A node fits a pod only if what is left of its
allocatable CPU, memory and GPUs, after every pod's requests, covers the pod's requests: that is
the scheduler's rule, so a plan made here is never refused for room (nor planned onto a GPU that
another pod holds).

The pods of a Deployment we just applied are not in a node list yet (not created, or not
scheduled); planned in a burst, every plan would see the same empty node. A ``Reservation``
holds what those pods will request until a list shows them; ``place_reserved`` puts them
where the scheduler's default spread would (the matching node with the most room left).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .nodes import GPU_RESOURCES, NodeFacts, Requests, node_facts_from_k8s, parse_quantity, tolerates

PerNode = dict[str, Requests]
"""Node name -> what its pods request."""
PerOwner = dict[tuple[str, str], list[tuple[str, Requests]]]
"""(namespace, owner label value) -> the owner's pods as (node, requests)."""


def cpu_millis(quantity: Any) -> int:
    """A CPU quantity ('500m', '2', 1.5) in millicores; none is 0."""
    return int(parse_quantity(quantity) * 1000) if quantity not in (None, "") else 0


def requests_of(resources: Mapping[str, Any] | None) -> Requests:
    """What a resources block requests. GPUs (an extended resource) may be given as a limit alone, which is
    then their request too."""
    r = (resources or {}).get("requests") or {}
    limits = (resources or {}).get("limits") or {}
    mem = r.get("memory")
    gpus = sum(int(parse_quantity(r.get(k, limits.get(k, 0)) or 0)) for k in GPU_RESOURCES)
    return Requests(cpu_millis(r.get("cpu")), int(parse_quantity(mem)) if mem not in (None, "") else 0, gpus)


def pod_requests(pod: Mapping[str, Any]) -> Requests:
    """What a pod requests: containers summed, init containers at their max, plus overhead."""
    spec = pod.get("spec") or {}
    total = Requests()
    for c in spec.get("containers") or []:
        total += requests_of(c.get("resources"))
    for c in spec.get("initContainers") or []:
        total = total.most(requests_of(c.get("resources")))
    return total + requests_of({"requests": spec.get("overhead") or {}})


def node_usable(node: Mapping[str, Any]) -> bool:
    """Whether placement weighs the node: every node but one being deleted. A cordoned or not Ready node is
    weighed too, with the taint the scheduler reads (``nodes.node_facts_from_k8s``): a pod that tolerates it may
    run there, and a condition names it and why no other pod does ("cordoned", "not Ready")."""
    return not (node.get("metadata") or {}).get("deletionTimestamp")


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
        req = pod_requests(pod)
        used[node] = used.get(node, Requests()) + req
        meta = pod.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(owner_label)
        if owner:
            by_owner.setdefault((str(meta.get("namespace")), str(owner)), []).append((node, req))
    return used, by_owner


def free(base: Iterable[NodeFacts], used: PerNode, own: Iterable[tuple[str, Requests]] = ()) -> list[NodeFacts]:
    """The nodes' facts less what ``used`` requests on them, giving back the ``own`` pods (a re-plan may reuse
    their room)."""
    mine: PerNode = {}
    for node, req in own:
        mine[node] = mine.get(node, Requests()) + req
    out = []
    for n in base:
        taken = used.get(n.name, Requests()) - mine.get(n.name, Requests())
        out.append(
            n.model_copy(
                update={
                    "cpu_millis": max(n.cpu_millis - taken.cpu_millis, 0),
                    "memory_bytes": max((n.memory_bytes or 0) - taken.memory_bytes, 0),
                    "gpus": max(n.gpus - taken.gpus, 0),
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
        node_facts_from_k8s(dict(n), used.get(str((n.get("metadata") or {}).get("name"))))
        for n in nodes
        if node_usable(n)
    ]


@dataclass(frozen=True)
class Reservation:
    """What the pods of one of our Deployments will request, and where they may go (the pod template's
    nodeSelector and tolerations): counted on the nodes until the pods show up scheduled in a node list."""

    selector: tuple[tuple[str, str], ...]
    requests: Requests
    replicas: int
    tolerations: tuple[tuple[tuple[str, str], ...], ...] = ()

    @classmethod
    def of(cls, deploy: Mapping[str, Any]) -> Reservation:
        spec = deploy.get("spec") or {}
        pod_spec = (spec.get("template") or {}).get("spec") or {}
        selector = tuple(sorted((pod_spec.get("nodeSelector") or {}).items()))
        tolerations = tuple(
            tuple(sorted((str(k), str(v)) for k, v in t.items())) for t in pod_spec.get("tolerations") or []
        )
        return cls(selector, pod_requests({"spec": pod_spec}), int(spec.get("replicas", 1) or 0), tolerations)

    def may_run_on(self, node: NodeFacts) -> bool:
        """The node carries the labels the pods select and no taint they do not tolerate (a cordon, say)."""
        tolerations = [dict(t) for t in self.tolerations]
        return all(node.labels.get(k) == v for k, v in self.selector) and all(
            tolerates(tolerations, t) for t in node.taints
        )


def place_reserved(
    base: Sequence[NodeFacts], used: PerNode, by_owner: PerOwner, reservations: Mapping[tuple[str, str], Reservation]
) -> tuple[PerNode, PerOwner]:
    """Reserved pods a node list does not show yet, each put on the matching node (``Reservation.may_run_on``)
    with the most room left (the scheduler's default spread); per node, and per owner. A pod no node has room for
    takes nothing: the scheduler will refuse it too."""
    room = {n.name: Requests(n.cpu_millis, n.memory_bytes or 0, n.gpus) - used.get(n.name, Requests()) for n in base}
    nodes = {n.name: n for n in base}
    pending: PerNode = {}
    placed: PerOwner = {}
    # Where each kind of pod may go, worked out once per selector and tolerations: a burst of a thousand
    # reservations shares a few (it was 42% of the operator's CPU at 1000 models, bench/scale.py).
    eligible: dict[tuple[Any, Any], list[str]] = {}
    for owner, r in sorted(reservations.items()):
        missing = r.replicas - len(by_owner.get(owner, []))
        if missing <= 0:
            continue
        kind = (r.selector, r.tolerations)
        if kind not in eligible:
            eligible[kind] = [n for n in room if r.may_run_on(nodes[n])]
        for _ in range(missing):
            fits = [n for n in eligible[kind] if room[n].covers(r.requests)]
            if not fits:
                break
            n = max(fits, key=lambda x: (room[x].cpu_millis, room[x].memory_bytes, x))
            room[n] -= r.requests
            pending[n] = pending.get(n, Requests()) + r.requests
            placed.setdefault(owner, []).append((n, r.requests))
    return pending, placed


def add(a: PerNode, b: PerNode) -> PerNode:
    """Per-node sums of two usages."""
    out = dict(a)
    for node, req in b.items():
        out[node] = out.get(node, Requests()) + req
    return out
