"""Which node class a ModelDeployment should run on, and its plan there. Pure.

Nodes are filtered by the spec's nodeSelector, required node affinity and
tolerations (a GPU taint is tolerated for GPU-capable specs, since the pod
then tolerates it; a cordoned or not Ready node carries its taint, ``nodes``);
a plan that finds no node says why of every node, grouped by reason
(``why_not_used``). Each node class (instance type, else the host) is planned
for its roomiest member (one with a whole CPU free first). A node fits only when
its free memory and its free CPU (allocatable less what every pod on it
requests, ``occupancy``) cover the pod's requests, as the scheduler
decides; the CPU request is the plan's threads (``sizing._threads``: a few per
model, so models pack onto a node) or spec.resources.requests.cpu. The best
fitting plan wins: full GPU offload, then any GPU, then the longest context,
then the threads the rule asks for (not capped by the node's free CPU), then the
most memory left over.

``adapt: false`` keeps the spec's word: the requested context is the minimum
and an explicit backend must be honoured. ``adapt: true`` lets the planner
shrink the context down to ``minContext``, quantize the KV cache to q8_0 (q4_0
only when ``kvCacheType: q4_0`` asks for it) and change backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .api import ModelDeploymentSpec
from .facts import ModelFacts
from .nodes import (
    CORDONED_TAINT,
    GPU_RESOURCES,
    NOT_READY_TAINT,
    UNREACHABLE_TAINT,
    NodeFacts,
    NodeShape,
    format_cpu,
    format_memory,
    tolerates,
)
from .occupancy import cpu_millis
from .policy import min_context, policy_for
from .sizing import PlanResult, plan

GPU_TAINT_KEYS = GPU_RESOURCES  # device plugins taint GPU node pools with their resource name
CLASS_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_LABEL = "kubernetes.io/hostname"


@dataclass
class Placement:
    """The outcome: a fitting plan on a node class, or why there is none."""

    fits: bool
    reason: str  # Planned, Adapted, WaitingForNode, NoNodeFits, NoEligibleNodes, NoNodes
    message: str
    node: NodeFacts | None = None
    result: PlanResult | None = None
    selector: dict[str, str] = field(default_factory=dict)
    adapted: bool = False


def _expr_matches(labels: dict[str, str], expr: dict[str, Any]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", "In"), [str(v) for v in expr.get("values") or []]
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and values:
        try:
            a, b = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def affinity_matches(labels: dict[str, str], name: str, affinity: dict[str, Any] | None) -> bool:
    """Required node affinity: any term matches when all its expressions do."""
    required = ((affinity or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    for term in terms:
        exprs = term.get("matchExpressions") or []
        fields = [
            {**f, "key": "metadata.name"} for f in term.get("matchFields") or [] if f.get("key") == "metadata.name"
        ]
        if all(_expr_matches(labels, e) for e in exprs) and all(
            _expr_matches({"metadata.name": name}, f) for f in fields
        ):
            return True
    return False


def ineligible_reason(spec: ModelDeploymentSpec, node: NodeFacts) -> str | None:
    """Why a node cannot host this spec's pods, or None."""
    for k, v in (spec.node_selector or {}).items():
        if node.labels.get(k) != v:
            return f"nodeSelector {k}={v} does not match"
    if not affinity_matches(node.labels, node.name, spec.affinity):
        return "required node affinity does not match"
    tolerations = list(spec.tolerations or [])
    if node.gpus > 0 and spec.backend != "cpu":
        tolerations += [{"key": k, "operator": "Exists"} for k in GPU_TAINT_KEYS]
    for taint in node.taints:
        if not tolerates(tolerations, taint):
            return STATE_TAINTS.get(str(taint.get("key"))) or (
                f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} is not tolerated"
            )
    return None


# The taints of a node's state (``nodes._state_taints``), in the words of kubectl.
STATE_TAINTS = {
    CORDONED_TAINT: "cordoned (spec.unschedulable)",
    NOT_READY_TAINT: "not Ready",
    UNREACHABLE_TAINT: "unreachable (Ready Unknown)",
}
NAMES_PER_REASON = 3


def why_not_used(nodes: list[tuple[str, int, str]], budget: int = 900) -> str:
    """Why each node was not used, one clause per reason: ``(name, nodes it stands for, reason)`` becomes
    "h0: short by 1 CPU" or "12 nodes (a, b, c, ...): cordoned (spec.unschedulable)", the most nodes first.

    Within ``budget`` characters whatever the node count: a few names per reason, and the reasons that do not
    fit are counted at the end.
    """
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, count, reason in nodes:
        groups.setdefault(reason, []).append((name, count))
    clauses = []
    for reason, members in sorted(groups.items(), key=lambda g: (-sum(c for _, c in g[1]), g[0])):
        total = sum(c for _, c in members)
        if total == 1:
            clauses.append((1, f"{members[0][0]}: {reason}"))
            continue
        names = [n if c == 1 else f"class of {n}" for n, c in members[:NAMES_PER_REASON]]
        etc = ", ..." if len(members) > NAMES_PER_REASON else ""
        clauses.append((total, f"{total} nodes ({', '.join(names)}{etc}): {reason}"))

    def more(rest: list[tuple[int, str]]) -> str:
        count = sum(c for c, _ in rest)
        nodes, reasons = ("node", "reason") if count == 1 else ("nodes", "reason" if len(rest) == 1 else "reasons")
        return f"; and {count} more {nodes} for {len(rest)} other {reasons}"

    out = ""
    for i, (_, clause) in enumerate(clauses):
        tail = more(clauses[i + 1 :]) if i + 1 < len(clauses) else ""
        if out and len(out) + 2 + len(clause) + len(tail) > budget:
            return out + more(clauses[i:])
        out = f"{out}; {clause}" if out else clause[:budget]
    return out


def class_selector(node: NodeFacts) -> dict[str, str]:
    if CLASS_LABEL in node.labels:
        return {CLASS_LABEL: node.labels[CLASS_LABEL]}
    return {HOSTNAME_LABEL: node.labels.get(HOSTNAME_LABEL, node.name)}


def node_classes(nodes: list[NodeFacts]) -> list[tuple[dict[str, str], NodeFacts]]:
    """One representative per class: the member with the most free memory, with the class size as count."""
    groups: dict[tuple[tuple[str, str], ...], list[NodeFacts]] = {}
    for n in nodes:
        groups.setdefault(tuple(sorted(class_selector(n).items())), []).append(n)
    out = []
    for key, members in sorted(groups.items()):
        best = max(members, key=lambda n: (n.cpu_millis >= 1000, n.memory_bytes or 0, n.cpu_millis, n.name))
        out.append((dict(key), best.model_copy(update={"count": len(members)})))
    return out


def _honours_spec(spec: ModelDeploymentSpec, res: PlanResult) -> str | None:
    if spec.backend != "auto" and res.plan.backend != spec.backend:
        return f"backend {spec.backend} is not available (the plan would use {res.plan.backend})"
    return None


def cpu_request_millis(spec: ModelDeploymentSpec, res: PlanResult) -> int:
    """The CPU the pod asks the scheduler for: spec.resources.requests.cpu, else the plan's threads."""
    override = (spec.resources.requests or {}).get("cpu") if spec.resources else None
    if override is not None:
        return cpu_millis(override)
    return res.cpu_request_millis or cpu_millis(res.resources.requests.get("cpu"))


def _cpu_short(spec: ModelDeploymentSpec, res: PlanResult, node: NodeFacts) -> int:
    """Millicores the pod requests beyond the node's free CPU (0 when the scheduler finds room)."""
    return max(cpu_request_millis(spec, res) - node.cpu_millis, 0)


def _cpu_refused(res: PlanResult, node: NodeFacts, short: int) -> PlanResult:
    """The plan marked as not fitting because the node's free CPU is short."""
    want = format_cpu(node.cpu_millis + short)
    why = f"does not fit: the pod requests {want} CPU but the node has {format_cpu(node.cpu_millis)} free"
    return res.model_copy(update={"fits": False, "reasons": [why, *res.reasons]})


def _score(res: PlanResult, node: NodeFacts) -> tuple[bool, bool, int, bool, int]:
    p = res.plan
    gpu = p.backend != "cpu" and p.gpu_layers > 0
    spare = (node.memory_bytes or 0) - res.memory_request_bytes
    return (gpu and p.gpu_layers >= p.total_layers, gpu, p.context, p.threads >= res.threads_wanted, spare)


def place(
    spec: ModelDeploymentSpec,
    facts: ModelFacts,
    nodes: list[NodeFacts],
    model_path: str,
    headroom_boost: float = 0.0,
    knobs: Mapping[str, Any] | None = None,
) -> Placement:
    """The best node class and its plan for a spec, or why nothing fits (``knobs``: see ``policy_for``)."""
    if not nodes:
        return Placement(False, "NoNodes", "the cluster has no nodes")
    eligible, excluded = [], []
    for n in nodes:
        why = ineligible_reason(spec, n)
        if why is None:
            eligible.append(n)
        else:
            excluded.append((n.name, n.count, why))
    if not eligible:
        return Placement(False, "NoEligibleNodes", "no node is eligible: " + why_not_used(excluded))

    classes = node_classes(eligible)
    tiers = [False, True] if spec.adapt else [False]
    misses: dict[str, tuple[int, str]] = {}  # class representative -> (its class size, why it does not fit)
    closest: tuple[tuple[int, int], NodeFacts, dict[str, str], PlanResult] | None = None
    for relaxed in tiers:
        policy = policy_for(spec, headroom_boost, relaxed, knobs)
        best: tuple[tuple[bool, bool, int, bool, int], NodeFacts, dict[str, str], PlanResult] | None = None
        for selector, node in classes:
            res = plan(facts, node, policy, model_path=model_path)
            why = _honours_spec(spec, res) if not relaxed else None
            cpu_short = _cpu_short(spec, res, node)
            if res.fits and why is None and not cpu_short:
                score = _score(res, node)
                if best is None or score > best[0]:
                    best = (score, node, selector, res)
                continue
            short = res.shortfall_bytes if not res.fits else 0
            if why is None and cpu_short:
                why = f"short by {format_cpu(cpu_short)} CPU" + (f", {format_memory(short)}" if short else "")
                res = _cpu_refused(res, node, cpu_short)
            misses[node.name] = (node.count, why or f"short by {format_memory(res.shortfall_bytes)}")
            if closest is None or (short, cpu_short) < closest[0]:
                closest = ((short, cpu_short), node, selector, res)
        if best is not None:
            _, node, selector, res = best
            adapted = relaxed  # the spec's own terms fit nowhere; this plan bends them
            where = f"{res.plan.backend} on {node.name}" + (f" (class of {node.count})" if node.count > 1 else "")
            msg = (
                f"{where}: {res.plan.gpu_layers}/{res.plan.total_layers} GPU layers, context {res.plan.context}, "
                f"KV {res.plan.kv_cache_type}, memory {res.resources.requests['memory']}"
            )
            return Placement(True, "Adapted" if adapted else "Planned", msg, node, res, selector, adapted)
    detail = why_not_used([(k, c, v) for k, (c, v) in sorted(misses.items())], budget=500)
    wanted = "the requested context" if not spec.adapt else f"context {min_context(spec, relaxed=True)}"
    msg = f"no node fits the model at {wanted}: {detail}"
    if excluded:
        msg += f" (not eligible: {why_not_used(excluded, budget=400)})"
    if closest is not None:
        _, node, selector, res = closest
        return Placement(False, "NoNodeFits", msg, node, res, selector)
    return Placement(False, "NoNodeFits", msg)


WAITING_FOR_NODE = "WaitingForNode"


def shape_of(node: NodeFacts, shapes: list[NodeShape]) -> NodeShape | None:
    """The first configured shape whose labels the node carries."""
    return next((s for s in shapes if all(node.labels.get(k) == v for k, v in s.labels.items())), None)


def _on_shapes(
    spec: ModelDeploymentSpec,
    facts: ModelFacts,
    shapes: list[NodeShape],
    model_path: str,
    headroom_boost: float,
    present: Placement,
) -> Placement | None:
    fitting: list[tuple[tuple[bool, int, int, int, str], NodeShape, Placement]] = []
    for shape in shapes:
        node = shape.facts()
        got = place(spec, facts, [node], model_path, headroom_boost)
        if got.fits and got.result is not None:
            idle_gpus = node.gpus > 0 and got.result.plan.backend == "cpu"  # a GPU node for a CPU plan: last
            fitting.append(((idle_gpus, node.memory_bytes or 0, node.cpu_millis, node.gpus, shape.name), shape, got))
    if not fitting:
        return None
    _, shape, got = min(fitting, key=lambda t: t[0])
    labels = ", ".join(f"{k}={v}" for k, v in sorted(shape.labels.items()))
    msg = (
        f"no present node fits ({present.reason}); planned for node shape {shape.name} ({labels}) so a cluster "
        f"autoscaler can add one: {got.message}"
    )
    return Placement(True, WAITING_FOR_NODE, msg, got.node, got.result, dict(shape.labels), got.adapted)


def _on_present_classes(
    spec: ModelDeploymentSpec,
    facts: ModelFacts,
    empty: list[NodeFacts],
    model_path: str,
    headroom_boost: float,
    present: Placement,
) -> Placement | None:
    """The plan for an empty node of a present node class, when only the other pods' requests stand in the way."""
    if present.reason != "NoNodeFits":
        return None  # nothing eligible, or a spec no node can honour: no node like these would help
    got = place(spec, facts, empty, model_path, headroom_boost)
    if not got.fits or got.result is None:
        return None
    where = ", ".join(f"{k}={v}" for k, v in sorted(got.selector.items()))
    msg = (
        f"no present node has room now ({present.message}); planned for an empty node of class {where}: the pod "
        f"waits for room there or for a node like it that a cluster autoscaler adds: {got.message}"
    )
    return replace(got, reason=WAITING_FOR_NODE, message=msg)


def place_with_shapes(
    spec: ModelDeploymentSpec,
    facts: ModelFacts,
    nodes: list[NodeFacts],
    shapes: list[NodeShape],
    model_path: str,
    headroom_boost: float = 0.0,
    empty: list[NodeFacts] | None = None,
) -> Placement:
    """``place`` on present nodes, handing off to a cluster autoscaler through node shapes.

    When no present node fits, the plan is made for an empty node of the smallest shape that fits (by
    memory, then CPU, then GPUs; a GPU shape for a CPU plan only when nothing else fits) and pinned to the
    shape's labels: the pending pod asks the autoscaler for such a node (reason WaitingForNode). A plan on a
    present node of a shape is pinned to the shape's labels too, so the plan stays the same when the node
    arrives, and a replica added later that does not fit the nodes there asks for another node of the shape
    instead of a re-plan.

    Without shapes, the present node classes are the shapes: ``empty`` holds the present nodes as if no pod
    ran on them (their allocatable). A model that fits such a node but none has room for now is planned for
    it and pinned to its class: the pending pod schedules when room frees up, and a Cluster Autoscaler (whose
    node groups add nodes like the present ones) sees a pod one more such node would hold.
    """
    got = place(spec, facts, nodes, model_path, headroom_boost)
    if not shapes:
        if got.fits or not empty:
            return got
        return _on_present_classes(spec, facts, empty, model_path, headroom_boost, got) or got
    if got.fits:
        shape = shape_of(got.node, shapes) if got.node is not None else None
        return replace(got, selector=dict(shape.labels)) if shape is not None else got
    return _on_shapes(spec, facts, shapes, model_path, headroom_boost, got) or got
