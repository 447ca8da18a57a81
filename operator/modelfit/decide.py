"""The operator's one decision for a ModelDeployment: a gathered snapshot -> what to write. Pure: no I/O.

The shell (``reconciler``) gathers a ``Snapshot`` -- the object, its status as read, its model facts, the nodes
with what every pod on them requests, our pods and Deployment, what the cluster serves -- and calls ``decide``.
The ``Decision`` says which children to apply and delete, which events to post, what to log and the whole new
status (typed: ``api.ModelDeploymentStatus``, its conditions one setter each in ``status``); the shell applies it
and writes the status in one place.

Rules decided here:

- Signals: an OOM kill under a tight ``spec.resources`` memory override drops the override; any other OOM
  kill raises the memory headroom (``OOM_HEADROOM_STEP``) and re-plans; pods the scheduler refuses on a class
  the facts say has room make an ``adapt`` spec avoid that node class for ``AVOID_SECONDS`` (a pod planned to
  wait for room, WaitingForNode, is refused by design and avoids nothing); an avoided class is still used when
  no other class fits, so the pod keeps waiting where it can run.
- No churn (``spec.rebalance``): a running plan whose spec is unchanged keeps its node class unless the
  new plan is materially better (see ``api.Rebalance``); it moves at once when its pods cannot run.
- Rollout: Surge (the new pod first) when the node class has room for the old and the new pod, else
  Replace; decided when the plan changes and kept with it.
- Drift: an owned child edited by hand (the Deployment's generation moved under our applied hash) is
  applied again, with force.
- Come back (``Decision.requeue_after``, controller-runtime's ``Result.RequeueAfter``): a model that cannot be
  read, or a plan no node fits, is looked at again after ``retry_delay(snap.failures)`` -- 10 s doubling to
  5 minutes -- since room or the model server comes back without an event of ours; anything else waits for
  an event or the full resync.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass, field, replace
from typing import Any, NamedTuple

from pydantic import ValidationError

from . import api, coldstart, picker, routing, scaletozero
from .api import Condition, ModelDeploymentSpec, ModelDeploymentStatus, PlanStatus, Rebalance
from .facts import ModelFacts
from .nodes import NodeFacts, NodeShape, parse_quantity
from .occupancy import requests_of
from .placement import WAITING_FOR_NODE, Placement, class_selector, ineligible_reason, place_with_shapes
from .render import (
    API_KEY_ANNOTATION,
    APPLIED_ANNOTATION,
    APPLIED_PLAN_ANNOTATION,
    HASH_ANNOTATION,
    HPA_METRIC,
    Rendered,
    desired_replicas,
    digest,
    hpa_target_milli,
    image_problem,
    memory_override_bytes,
    memory_override_verdict,
    model_file,
    render,
    routed,
    selector_string,
)
from .settings import DEFAULT as DEFAULT_SETTINGS
from .settings import Settings, pinned
from .status import (
    Room,
    api_failure_conditions,
    condition,
    find_condition,
    merge_conditions,
    placement_from_status,
    plan_message,
    plan_status,
    planning_failure_conditions,
    pod_signals,
    set_degraded,
    set_planned,
    set_progressing,
    set_ready,
    set_unschedulable,
    verified_download,
    workload,
)

OOM_HEADROOM_STEP = 0.25
AVOID_SECONDS = 300.0
RETRY_BASE = 10.0  # seconds before the first retry; doubled for each failure in a row
MAX_RETRY_DELAY = 300.0
RETRY_RESULTS = frozenset({"model_unreadable", "unschedulable"})  # the results that come back on their own
# What makes two plans the same workload for the Always policy (threads and the prompt cache are minor knobs).
_SHAPE = (
    "node_selector",
    "backend",
    "gpu_layers",
    "context",
    "kv_cache_type",
    "parallel",
    "load_mode",
    "headroom_boost",
)

AvoidKey = tuple[tuple[str, str], ...]
Log = tuple[int, str]


class LoadedFacts(NamedTuple):
    facts: ModelFacts
    size: int  # bytes of the file (the catalog's estimate when planned from catalog facts)
    source: str  # status.plan.factsSource: "header: URL" or "catalog (why not the header)"
    mismatch: str = ""  # how the header differs from the catalog's facts, when it does


@dataclass(frozen=True)
class Snapshot:
    """Everything the decision reads, gathered by the shell."""

    meta: dict[str, Any]
    spec: ModelDeploymentSpec
    old: ModelDeploymentStatus  # the status as read (parsed by the shell; empty when it did not parse)
    loaded: LoadedFacts
    nodes: list[NodeFacts]  # with what every other pod requests taken off; our own pods' requests count as free
    pods: list[dict[str, Any]]  # the pods of this ModelDeployment
    deploy: dict[str, Any] | None  # the live Deployment
    now: float  # monotonic seconds, for the avoid list
    pod_monitors: bool = False  # the cluster serves monitoring.coreos.com/v1 PodMonitors
    inference_pools: bool = False  # the cluster serves inference.networking.k8s.io/v1 InferencePools
    shapes: list[NodeShape] = field(default_factory=list)  # node shapes a cluster autoscaler can add
    empty: list[NodeFacts] = field(default_factory=list)  # the nodes as if no pod ran on them (cordoned: tainted)
    avoid: dict[AvoidKey, float] = field(default_factory=dict)  # node classes avoided until (monotonic)
    seen_generation: int | None = None  # the Deployment's generation as last applied or seen (None: first look)
    missing: Condition | None = None  # Degraded: a Secret, key or PVC the pods need and that does not exist
    api_key_version: str | None = None  # the API-key Secret's resourceVersion: a new one rolls the pods
    verify: bool = False  # compare the live children with the plan (first look after a start, a deleted child)
    absent_children: list[str] = field(default_factory=list)  # children the shell found missing when verifying
    hpa_metric: str = HPA_METRIC
    failures: int = 0  # reconciles in a row that asked to come back (the shell's count, for the backoff)
    settings: Settings = DEFAULT_SETTINGS  # the admin's: images, registries, the NetworkPolicy switch
    activity: scaletozero.Activity | None = None  # the picker's last read (autoscaling.minReplicas 0; None: unread)
    last_busy: float = 0.0  # wall seconds: when the picker last showed a request (the shell's memory)
    wall: float = 0.0  # wall seconds now (status times; pods' Ready times are wall clock)


@dataclass
class Decision:
    """What the shell does: delete, then apply (Deployment last), post events, and write ``status``.

    ``requeue_after`` is when to look again, in seconds (None: on the next event or the full resync). It is the
    whole answer, backoff included: the shell keeps the count of failures in a row (``Snapshot.failures``,
    ``failure(failures=)``), adds one when ``requeue_after`` is set and starts again from 0 when it is None.
    """

    status: ModelDeploymentStatus  # the whole new status (the shell dumps it once: ``ModelDeploymentStatus.dump``)
    result: str  # for the reconcile metric: ready, progressing, unschedulable, invalid, model_unreadable
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str, str]] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message), posted after the apply
    logs: list[Log] = field(default_factory=list)
    avoid: dict[AvoidKey, float] = field(default_factory=dict)
    replan_soon: bool = False  # pods wait for the scheduler: look again on fresh node facts next tick
    planned: Condition | None = None  # the Planned condition to keep when applying fails
    seen_generation: int | None = None
    requeue_after: float | None = None
    scale: int | None = None  # write the ModelDeployment's /scale to this first (scale to zero, or wake from it)


def retry_delay(attempt: int) -> float:
    """Backoff before the ``attempt``-th retry in a row (from 0): 10 s doubling, at most 5 minutes."""
    return float(min(MAX_RETRY_DELAY, RETRY_BASE * 2 ** max(0, attempt)))


def retry_after(result: str, failures: int) -> float | None:
    """When a decision with this result looks again: a model server not up yet, or room that frees up when other
    tenants' pods finish terminating, tells us by no event of ours, so those come back with backoff."""
    return retry_delay(failures) if result in RETRY_RESULTS else None


# ---- the first steps: a spec that can be planned ----------------------------------------------------


def base_status(meta: dict[str, Any], old: ModelDeploymentStatus) -> ModelDeploymentStatus:
    """A new status: what every status says, and the recorded model digest, which no failure forgets."""
    return ModelDeploymentStatus(
        observed_generation=meta.get("generation"),
        selector=selector_string(str(meta.get("name"))),
        model_digest=old.model_digest,
    )


def model_digest(snap: Snapshot) -> api.ModelDigestStatus | None:
    """The digests later downloads are held to (trust on first use): kept while the URL stays, else what the
    oldest pod that verified this URL's download reported. spec.model.sha256 always wins for the first file: a
    report that disagrees with it is not recorded."""
    url = model_file(snap.spec).url
    if url is None:
        return None
    old = snap.old.model_digest
    if old is not None and old.url == url and _agrees(snap.spec, old.sha256):
        return old
    got = verified_download(snap.pods, url)
    if got is None or not _agrees(snap.spec, got[1]):
        return None
    return api.ModelDigestStatus(url=url, sha256=got[1], pod=got[0])


def _agrees(spec: ModelDeploymentSpec, digests: list[str]) -> bool:
    want = (spec.model.sha256 or "").strip().lower()
    return not want or (bool(digests) and digests[0] == want)


def reported(old: ModelDeploymentStatus, reason: str, message: str) -> bool:
    """Whether the status already says Planned=False for this reason and message: a resync that reaches the
    same verdict logs it at debug (it was logged once, when it was reported)."""
    c = find_condition(old.conditions, "Planned")
    return c is not None and (c.status, c.reason, c.message) == ("False", reason, message)


def failure(
    meta: dict[str, Any], old: ModelDeploymentStatus, reason: str, message: str, result: str, failures: int = 0
) -> Decision:
    """No plan to run: the Planned=False conditions and nothing to apply (``failures``: see ``Decision``)."""
    new = base_status(meta, old)
    new.conditions = merge_conditions(
        old.conditions, planning_failure_conditions(reason, message), meta.get("generation")
    )
    level = logging.DEBUG if reported(old, reason, message) else logging.WARNING
    return Decision(new, result, logs=[(level, f"{reason}: {message}")], requeue_after=retry_after(result, failures))


def api_failure(
    meta: dict[str, Any],
    old: ModelDeploymentStatus,
    decided: Decision | None,
    reason: str,
    message: str,
) -> ModelDeploymentStatus:
    """The status when the API server refused (or could not take) a read or a write: what the decision (if any)
    planned and counted, its Planned condition, and the failure in the others."""
    out = base_status(meta, old)
    values = api_failure_conditions(reason, message)
    if decided is not None:
        st = decided.status
        out.plan, out.oom_kills, out.memory_override_rejected = st.plan, st.oom_kills, st.memory_override_rejected
        if decided.planned is not None:
            values.append(decided.planned)
    out.conditions = merge_conditions(old.conditions, values, meta.get("generation"))
    return out


def check_spec(meta: dict[str, Any], raw: dict[str, Any]) -> ModelDeploymentSpec | tuple[str, str]:
    """The typed spec, or (reason, message) when it cannot be planned."""
    bad_name = api.name_problem(str(meta.get("name")))
    if bad_name is not None:
        return "InvalidSpec", f"{bad_name}; delete it and create it under a valid name"
    try:
        spec = ModelDeploymentSpec.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return "InvalidSpec", f"spec is invalid: {errors}"
    bad_args = spec.server_args_problem()
    if bad_args is not None:
        return "InvalidSpec", bad_args
    return spec


def spec_hash(spec: ModelDeploymentSpec) -> str:
    """The spec a plan is made for. Replicas, autoscaling and rebalance are left out: scaling is not a new plan,
    and a new rebalance policy applies to the next re-plan, it is not one."""
    return digest(spec.model_dump(mode="json", by_alias=True, exclude={"replicas", "autoscaling", "rebalance"}))


def template_hash(deploy: dict[str, Any] | None) -> str | None:
    return _template_annotation(deploy, HASH_ANNOTATION)


def _template_annotation(deploy: dict[str, Any] | None, key: str) -> str | None:
    if deploy is None:
        return None
    annotations: dict[str, str] = ((deploy["spec"]["template"].get("metadata") or {}).get("annotations")) or {}
    return annotations.get(key)


# ---- signals from the pods --------------------------------------------------------------------------


@dataclass
class _Reaction:
    placement: Placement
    boost: float
    oom_kills: int
    rejected: int | None  # the memory override that was OOM-killed
    override_failed: bool
    avoid: dict[AvoidKey, float]
    unschedulable: bool
    logs: list[Log]


def _place(snap: Snapshot, boost: float, avoid: dict[AvoidKey, float]) -> Placement:
    """The placement, away from the avoided node classes when that fits (a plan, or a pod to wait for room);
    else on every node: avoiding is a preference, and a class the scheduler refused is still where the pod can
    wait, where "no node is eligible" (the avoided nodes left out) would leave it nothing at all."""

    def usable(nodes: list[NodeFacts]) -> list[NodeFacts]:
        return [n for n in nodes if tuple(sorted(class_selector(n).items())) not in avoid]

    path = model_file(snap.spec, snap.loaded.size).path
    spec, facts = snap.spec, snap.loaded.facts
    if avoid:
        got = place_with_shapes(spec, facts, usable(snap.nodes), snap.shapes, path, boost, usable(snap.empty))
        if got.fits:
            return got
    return place_with_shapes(spec, facts, snap.nodes, snap.shapes, path, boost, snap.empty)


def _limit_bytes(placement: Placement) -> int:
    assert placement.result is not None
    return int(parse_quantity(placement.result.resources.limits["memory"]))


def react(snap: Snapshot) -> _Reaction:
    """Place, then answer what the pods say: OOM kills and pods the scheduler refuses."""
    old, spec = snap.old, snap.spec
    boost = old.plan.headroom_boost if old.plan is not None else 0.0
    override = memory_override_bytes(spec)
    rejected = old.memory_override_rejected
    override_failed = override is not None and rejected == override
    avoid = {k: t for k, t in snap.avoid.items() if t > snap.now}
    placement = _place(snap, boost, avoid)
    sig = pod_signals(snap.pods, template_hash(snap.deploy))
    refused = bool(sig.unschedulable_current)  # a pod of the applied template: an old one's says nothing of this plan
    out = _Reaction(placement, boost, old.oom_kills or 0, rejected, override_failed, avoid, refused, [])
    if not placement.fits or placement.result is None:
        return out
    honour = memory_override_verdict(placement, spec, override_failed) is None
    if sig.oom_killed and honour and override is not None and override < _limit_bytes(placement):
        # The user's limit was too small, not the plan: drop the override, keep the plan as it is.
        out.oom_kills += 1
        out.rejected, out.override_failed = override, True
        out.logs.append((logging.WARNING, f"OOMKilled in {sig.oom_killed} under the memory override; using the plan"))
    elif sig.oom_killed and boost < 1.0:
        out.boost = min(1.0, boost + OOM_HEADROOM_STEP)
        out.oom_kills += 1
        out.logs.append((logging.WARNING, f"OOMKilled in {sig.oom_killed}; memory headroom boost now {out.boost:.2f}"))
        out.placement = _place(snap, out.boost, avoid)
    elif refused and spec.adapt and placement.reason != WAITING_FOR_NODE:
        # The facts say the class has room, the scheduler says no: avoid it. A pod that waits for room or a node
        # (WaitingForNode) is refused by design until then; avoiding its class would only move it about.
        avoid[tuple(sorted(placement.selector.items()))] = snap.now + AVOID_SECONDS
        other = _place(snap, boost, avoid)
        if other.fits and other.selector != placement.selector:
            out.logs.append((logging.INFO, f"pods unschedulable on {placement.selector}; adapting to {other.selector}"))
            out.placement = other
    return out


# ---- no churn -------------------------------------------------------------------------------------


def materially_better(old: PlanStatus, new: PlanStatus, min_improvement: int) -> str | None:
    """Why the new plan is worth a move (see ``api.Rebalance``), or None."""

    def gpu_share(p: PlanStatus) -> float:
        total = p.total_layers
        return 100.0 * p.gpu_layers / total if p.backend != "cpu" and total else 0.0

    if old.adapted and not new.adapted:
        return "the spec's own terms fit again (the running plan was adapted)"
    gain = gpu_share(new) - gpu_share(old)
    if gain >= min_improvement:
        return f"GPU share {gpu_share(old):.0f}% -> {gpu_share(new):.0f}%"
    if old.context and new.context >= old.context * (1 + min_improvement / 100):
        return f"context {old.context} -> {new.context}"
    return None


def _may_keep(snap: Snapshot, r: _Reaction, old_plan: PlanStatus, pinned: bool) -> bool:
    """Is the applied plan still one to run: applied, made for this spec, memory override and headroom, and its
    pods can run (or wait for a node shape they are pinned to)?"""
    annotations = ((snap.deploy or {}).get("metadata") or {}).get("annotations") or {}
    applied_plan = annotations.get(APPLIED_PLAN_ANNOTATION) or annotations.get(APPLIED_ANNOTATION)
    if not (old_plan.hash and old_plan.fits and applied_plan == old_plan.hash):
        return False
    same_spec = (
        old_plan.spec_hash == spec_hash(snap.spec)
        if old_plan.spec_hash
        else snap.old.observed_generation == snap.meta.get("generation")
    )
    same_override = snap.old.memory_override_rejected == r.rejected
    present = any(
        all(n.labels.get(k) == v for k, v in old_plan.node_selector.items()) and ineligible_reason(snap.spec, n) is None
        for n in snap.nodes
    )
    # a new spec, an OOM kill, pods that cannot run, or their node class is gone (or cordoned, not Ready)
    return (
        same_spec
        and same_override
        and old_plan.headroom_boost == r.boost
        and (pinned or not (r.unschedulable or not present))
    )


def keep_running(snap: Snapshot, r: _Reaction, new_plan: PlanStatus, pinned: bool) -> tuple[bool, str]:
    """Keep the applied plan instead of the new one? And the words for it (see ``api.Rebalance``)."""
    old_plan = snap.old.plan
    if old_plan is None or not _may_keep(snap, r, old_plan, pinned):
        return False, ""
    if all(getattr(old_plan, k) == getattr(new_plan, k) for k in _SHAPE):
        return True, ""  # the same workload; minor knobs (threads, prompt cache) do not roll the pods
    rebalance = snap.spec.rebalance or Rebalance()
    if rebalance.policy == "Always":
        return False, ""
    if rebalance.policy == "Never":
        return True, "rebalance Never keeps a running plan"
    better = materially_better(old_plan, new_plan, rebalance.min_improvement)
    if better is not None:
        return False, f"moved: {better} (rebalance WhenBetter, at least {rebalance.min_improvement}%)"
    return True, (
        f"kept: a re-plan ({plan_message(new_plan)}) is not {rebalance.min_improvement}% better (rebalance WhenBetter)"
    )


def surge_fits(snap: Snapshot, placement: Placement) -> bool:
    """Room for the new pod beside a running one? Always when the pods move to another node class, unless none of
    them runs: then nothing is kept serving, and a surge would keep the old pending pod, pinned where there is no
    room, until the new one runs (a model moved in a burst had two pods pending, neither ever replaced). Judged by
    the pods' own node selectors as well as by the recorded plan, which already names the new class when the
    move is decided again before the Deployment controller acted on it."""
    old_plan = snap.old.plan
    live = [p for p in snap.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    node, res = placement.node, placement.result
    moved = old_plan is not None and old_plan.node_selector != placement.selector
    if not running:
        return not (live and (moved or any(_elsewhere(p, placement.selector) for p in live)))
    if node is None or res is None or old_plan is None or moved:
        return True
    if node.count > len(running):
        return True  # a member of the class without our pod takes the new one
    old_mem = old_plan.memory_request_bytes
    both = requests_of(old_plan.resources) + requests_of(res.resources.model_dump())
    mem_ok = node.memory_bytes is None or node.memory_bytes >= old_mem + res.memory_request_bytes
    return mem_ok and node.cpu_millis >= both.cpu_millis and node.gpus >= both.gpus


def _elsewhere(pod: dict[str, Any], selector: dict[str, str]) -> bool:
    """A pod pinned outside ``selector`` (the placement's node class); one pinned nowhere may run anywhere."""
    pinned = (pod.get("spec") or {}).get("nodeSelector") or {}
    return bool(pinned) and any(pinned.get(k) != v for k, v in selector.items())


def replicas_that_fit(snap: Snapshot, placement: Placement, requests: dict[str, str]) -> tuple[int, int]:
    """(pods with these requests the present nodes of the plan's class hold, those nodes).

    ``requests`` are the rendered pod's (the plan's, or spec.resources where it overrides them); our own
    pods count as free, since the node facts leave them out.
    """
    cpu, mem, gpus = astuple(requests_of({"requests": requests}))
    room, nodes = 0, 0
    for n in snap.nodes:
        if any(n.labels.get(k) != v for k, v in placement.selector.items()) or ineligible_reason(snap.spec, n):
            continue
        nodes += 1
        fits = [n.memory_bytes // mem if n.memory_bytes is not None and mem else 1 << 16]
        fits.append(n.cpu_millis // cpu if cpu else 1 << 16)
        if gpus:
            fits.append(n.gpus // gpus)
        room += max(0, min(fits))
    return room, nodes


def _room(snap: Snapshot, placement: Placement, rendered: Rendered) -> Room:
    """The replicas the present nodes of the plan's class hold, with the rendered pod's requests."""
    deploy = rendered.by_kind("Deployment") or {}
    containers = ((deploy.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or [{}]
    requests = dict((containers[0].get("resources") or {}).get("requests") or {})
    room, nodes = replicas_that_fit(snap, placement, requests)
    return Room(room, nodes, placement.selector)


# ---- the decision ---------------------------------------------------------------------------------


def _facts_logs(snap: Snapshot, r: _Reaction) -> list[Log]:
    """Where the model facts come from, said when that changes (with how the header differs from the catalog)."""
    if (snap.old.plan.facts_source if snap.old.plan is not None else None) == snap.loaded.source:
        return []
    # An unplaced model records no plan, hence no facts source: say it once, with its verdict.
    again = not r.placement.fits and reported(snap.old, r.placement.reason, r.placement.message)
    logs = [(logging.DEBUG if again else logging.INFO, f"model facts from {snap.loaded.source}")]
    if snap.loaded.mismatch:
        logs.append((logging.DEBUG if again else logging.WARNING, snap.loaded.mismatch))
    return logs


def _unplaced(snap: Snapshot, r: _Reaction, logs: list[Log]) -> Decision:
    """No node fits: Planned=False with the closest plan, nothing applied."""
    placement = r.placement
    out = failure(snap.meta, snap.old, placement.reason, placement.message, "unschedulable", snap.failures)
    if placement.result is not None:
        plan = plan_status(placement, snap.loaded.facts, snap.loaded.size, "", r.boost)
        plan.facts_source = snap.loaded.source
        out.status.plan = plan
    out.status.oom_kills, out.status.memory_override_rejected = r.oom_kills, r.rejected
    out.logs[:0], out.avoid = logs, r.avoid
    return out


def _keep_or_move(snap: Snapshot, r: _Reaction) -> tuple[Placement, bool, str]:
    """The placement to run -- the applied plan kept as it is, or the new one -- whether it is kept, and why."""
    old_plan = snap.old.plan
    fresh = plan_status(r.placement, snap.loaded.facts, snap.loaded.size, "", r.boost)
    pinned = (
        old_plan is not None
        and bool(old_plan.node_selector)
        and any(s.labels == old_plan.node_selector for s in snap.shapes)
    )
    keep, why = keep_running(snap, r, fresh, pinned)
    if not keep or old_plan is None:
        return r.placement, False, why
    placement = placement_from_status(old_plan)
    if r.placement.reason == WAITING_FOR_NODE and r.placement.selector == placement.selector:
        # still waiting for a node of its class: say so, not "Planned" (the kept plan's own words)
        placement = replace(placement, reason=WAITING_FOR_NODE, message=r.placement.message)
    return placement, True, why


def _plan_record(
    snap: Snapshot, r: _Reaction, placement: Placement, rendered_hash: str, keep: bool, surge: bool
) -> PlanStatus:
    """status.plan: the kept plan as it was, or the new one with its rollout; the autoscaling target."""
    spec, old_plan = snap.spec, snap.old.plan
    assert placement.result is not None
    if keep and old_plan is not None:
        plan = old_plan.model_copy(update={"hash": rendered_hash})
    else:
        plan = plan_status(placement, snap.loaded.facts, snap.loaded.size, rendered_hash, r.boost)
        plan.rollout = "Surge" if surge else "Replace"
    plan.spec_hash = spec_hash(spec)
    plan.facts_source = snap.loaded.source
    if spec.autoscaling is not None:
        a, parallel = spec.autoscaling, placement.result.plan.parallel
        target = hpa_target_milli(parallel, a.target_utilization) / 1000
        line = (
            f"autoscaling {a.min_replicas}-{a.max_replicas} replicas: HPA on {snap.hpa_metric} (requests in flight "
            f"plus deferred per pod), target {target:g} = parallel {parallel} x {a.target_utilization}%"
        )
        if scaletozero.applies(spec):
            res = placement.result
            cold = coldstart.predict(snap.loaded.size, spec, res.plan.load_mode, res.memory.kv_cache_bytes)
            line += (
                f"; to zero after {a.idle_seconds} s without a request (the picker holds a request at zero while a "
                f"pod starts: predicted {cold.seconds:.0f} s)"
            )
            if cold.stages.get("fetch", 0.0) > 0:
                line += (
                    f"; every wake downloads the model ({cold.stages['fetch']:.0f} s of it): a hostPath modelCache "
                    "under an allowed root keeps it on the node (the default for such a model once the admin "
                    "allows one)"
                )
        plan.reasons = [*[x for x in plan.reasons if not x.startswith("autoscaling ")], line]
    return plan


def _changes(snap: Snapshot, placement: Placement, rendered: Rendered, decision: Decision) -> None:
    """What to apply: everything when the applied hash moved or a child drifted (restored with force)."""
    deploy, name = snap.deploy, str(snap.meta.get("name"))
    annotations = ((deploy or {}).get("metadata") or {}).get("annotations") or {}
    live_generation = ((deploy or {}).get("metadata") or {}).get("generation")
    applied = annotations.get(APPLIED_ANNOTATION)
    # Drift: a hand edit of the Deployment's spec (image, limits, replicas) bumps its generation without
    # touching our applied hash. The first generation seen after a restart is the baseline.
    drifted = bool(
        deploy is not None
        and applied == rendered.applied
        and snap.seen_generation is not None
        and live_generation != snap.seen_generation
    )
    decision.seen_generation = live_generation if deploy is not None else None
    if drifted:
        decision.logs.append(
            (logging.WARNING, f"Deployment {name} was edited (generation {live_generation}); restoring it")
        )
    elif snap.verify and deploy is not None and applied == rendered.applied:
        # What no generation tells: children deleted, or edits made while no operator watched.
        changed = [*snap.absent_children]
        where = first_difference((rendered.by_kind("Deployment") or {}).get("spec"), deploy.get("spec") or {}, "spec")
        if where is not None:
            changed.append(f"Deployment {name} {where}")
        if changed:
            drifted = True
            decision.logs.append((logging.WARNING, f"restoring what differs from the plan: {'; '.join(changed)}"))
    if applied == rendered.applied and not drifted:
        return
    # The Deployment carries the applied hash, so it goes last: a crash half-way leaves a stale
    # hash and the next reconcile applies everything again (no missing Service after a restart).
    decision.delete = list(rendered.absent)
    decision.apply = sorted(rendered.objects, key=lambda o: o is rendered.by_kind("Deployment"))
    live_key = _template_annotation(deploy, API_KEY_ANNOTATION)
    new_key = _template_annotation(rendered.by_kind("Deployment"), API_KEY_ANNOTATION)
    if live_key and new_key and live_key != new_key:
        decision.events.append(("ApiKeyRotated", f"the API-key Secret changed: rolling the pods of {name}"))
        decision.logs.append((logging.INFO, "the API-key Secret changed: rolling the pods with the new key"))
    if snap.old.plan is None or snap.old.plan.hash != rendered.hash:
        assert placement.result is not None
        p = placement.result.plan
        what = (
            f"{p.backend} on {p.node}, {p.gpu_layers}/{p.total_layers} GPU layers, context {p.context}, "
            f"memory {placement.result.resources.requests['memory']}"
        )
        decision.events.append(("PlanChanged", f"new plan: {what}"))
        decision.logs.append((logging.INFO, f"plan applied: {what}"))


def first_difference(want: Any, live: Any, path: str) -> str | None:
    """Where ``live`` does not hold what ``want`` sets (``None``: it holds all of it). Fields the API server adds
    (defaults) are not differences; quantities compare by value ("1000m" is "1")."""
    if isinstance(want, dict):
        if not isinstance(live, dict):
            return f"{path} is not an object"
        for key, value in want.items():
            where = first_difference(value, live.get(key), f"{path}.{key}")
            if where is not None:
                return where
        return None
    if isinstance(want, list):
        if not isinstance(live, list) or len(live) != len(want):
            return f"{path} has {len(live) if isinstance(live, list) else 'no'} items, not {len(want)}"
        for i, (w, v) in enumerate(zip(want, live, strict=True)):
            where = first_difference(w, v, f"{path}[{i}]")
            if where is not None:
                return where
        return None
    if want == live:
        return None
    if isinstance(want, str) and isinstance(live, str | int):
        try:
            if parse_quantity(want) == parse_quantity(str(live)):
                return None
        except ValueError:
            pass
    return f"{path} is {live!r}, not {want!r}"


def _conditions(
    snap: Snapshot, placement: Placement, rendered: Rendered, planned: Condition, decision: Decision
) -> list[Condition]:
    """Every condition of a planned ModelDeployment, one setter each (as Cluster API's ``updateStatus``), from
    what the shell gathered: the Deployment and pods, the references that do not exist, node shapes and nodes."""
    desired = desired_replicas(snap.spec)
    w = workload(snap.deploy, snap.pods, desired, template_hash(rendered.by_kind("Deployment")))
    selector = decision.status.plan.node_selector if decision.status.plan is not None else {}
    shape = next((s.name for s in snap.shapes if selector and s.labels == selector), None)
    missing = snap.missing
    if missing is not None:
        was = find_condition(snap.old.conditions, "Degraded")
        if was is None or (was.reason, was.message) != (missing.reason, missing.message):
            decision.logs.append((logging.WARNING, f"{missing.reason}: {missing.message}"))
    return [
        planned,
        set_ready(w),
        set_progressing(w),
        set_degraded(w, missing),
        set_unschedulable(
            w,
            shape=shape,
            waiting=placement.message if placement.reason == WAITING_FOR_NODE else None,
            room=_room(snap, placement, rendered),
        ),
    ]


def _observed(snap: Snapshot, decision: Decision) -> None:
    """What the Deployment reports, where the model is served, and the result for the metric."""
    st, deployed = decision.status, (snap.deploy or {}).get("status") or {}
    st.replicas = int(deployed.get("replicas") or 0)
    st.ready_replicas = int(deployed.get("readyReplicas") or 0)
    port = snap.spec.service.port if snap.spec.service else api.ServiceSpec().port
    st.endpoint = f"http://{snap.meta.get('name')}.{snap.meta.get('namespace')}.svc:{port}"
    ready = find_condition(st.conditions, "Ready")
    decision.result = "ready" if ready is not None and ready.status == "True" else "progressing"


@dataclass(frozen=True)
class _Routes:
    children: tuple[list[dict[str, Any]], list[tuple[str, str, str]]] | None = None  # picker.objects
    gone: list[tuple[str, str, str]] = field(default_factory=list)  # routing children to delete
    profile: routing.PickerProfile | None = None
    status: api.RoutingStatus | None = None
    missing: Condition | None = None  # Degraded: routing asked for, the InferencePool CRD not served
    refused: tuple[str, str] | None = None  # (reason, message): the picker's images are not pinned, as required


def _routing(snap: Snapshot, placement: Placement) -> _Routes:
    """The picker's children and profile when ``spec.routing`` asks for an InferencePool and the cluster serves
    them; else the Service serves (the pods keep their key) and Degraded says why; routing turned off deletes
    what routing had made."""
    meta, spec = snap.meta, snap.spec
    name, ns = str(meta.get("name")), str(meta.get("namespace"))
    if not routed(spec):
        return _Routes(gone=picker.all_parts(name) if snap.old.routing is not None else [])
    if not snap.inference_pools:
        why = condition(
            "Degraded",
            "True",
            "InferencePoolNotServed",
            f"spec.routing.mode is InferencePool but the cluster does not serve {routing.POOL_API_VERSION} "
            "InferencePools: install the Gateway API Inference Extension's CRD; the Service serves the pods meanwhile",
        )
        return _Routes(gone=picker.all_parts(name) if snap.old.routing is not None else [], missing=why)
    images = [snap.settings.picker_image or routing.PICKER_IMAGE]
    if picker.standalone(spec):
        images.append(snap.settings.edge_image or routing.EDGE_IMAGE)
    unpinned = [ref for ref in images if not pinned(ref)]
    if snap.settings.require_image_digest and unpinned:
        refusal = (
            f"the routing images {', '.join(unpinned)} are not pinned by digest, and this operator runs images by "
            "digest only: an admin pins them with `modelfit run --picker-image/--edge-image REPO@sha256:<64 hex>` "
            "(chart values images.picker, images.edge)"
        )
        return _Routes(refused=("ImageNotAllowed", refusal))
    assert placement.result is not None
    prof = routing.profile(snap.loaded.facts, placement.result, snap.loaded.size, spec)
    children = picker.objects(meta, spec, prof, snap.api_key_version, snap.settings)
    port = spec.service.port if spec.service else api.ServiceSpec().port
    status = api.RoutingStatus(
        pool=name,
        picker=f"{routing.picker_name(name)}.{ns}.svc:{routing.GRPC_PORT}",
        edge=f"http://{name}.{ns}.svc:{port}" if picker.standalone(spec) else "",
    )
    return _Routes(children=children, profile=prof, status=status)


def _cold_start(snap: Snapshot, placement: Placement) -> api.ColdStartStatus:
    """status.coldStart: the plan's predicted cold start (as the picker's queue TTL takes it) and the newest Ready
    pod's measured one, the last measured kept until a newer pod is Ready."""
    assert placement.result is not None
    res = placement.result
    predicted = coldstart.predict(snap.loaded.size, snap.spec, res.plan.load_mode, res.memory.kv_cache_bytes)
    return coldstart.status(predicted, snap.pods, snap.old.cold_start)


def decide(snap: Snapshot) -> Decision:
    """Plan, choose between keeping and moving, render the children and compute the status."""
    spec = scaletozero.with_node_cache(snap.spec, snap.settings)  # a model that may go to zero: the node's cache
    snap = replace(snap, spec=spec)
    meta = snap.meta
    refused = image_problem(spec, snap.settings)  # the spec's own images: refused before any plan
    if refused is not None:
        return failure(meta, snap.old, *refused, "invalid")
    zero = scaletozero.verdict(spec, snap.pods, snap.activity, snap.last_busy, snap.wall)
    if zero.replicas is not None:  # the Deployment follows at once; the shell writes /scale first
        spec = spec.model_copy(update={"replicas": zero.replicas})
        snap = replace(snap, spec=spec)
    r = react(snap)
    logs = [*r.logs, *_facts_logs(snap, r)]
    if not r.placement.fits or r.placement.result is None:
        return _unplaced(snap, r, logs)

    placement, keep, why = _keep_or_move(snap, r)
    refused = image_problem(spec, snap.settings, placement.result.plan.backend if placement.result else None)
    if refused is not None:  # the plan's backend runs an image that is not pinned
        return failure(meta, snap.old, *refused, "invalid")
    old_rollout = snap.old.plan.rollout if snap.old.plan is not None else None
    surge = old_rollout == "Surge" if keep else surge_fits(snap, placement)
    verdict = memory_override_verdict(placement, spec, r.override_failed)
    digest_record = model_digest(snap)
    routes = _routing(snap, placement)
    if routes.refused is not None:
        return failure(meta, snap.old, *routes.refused, "invalid")
    rendered = render(
        meta,
        spec,
        placement,
        model_file(spec, snap.loaded.size),
        with_pod_monitor=snap.pod_monitors,
        honour_memory_override=verdict is None,
        surge=surge,
        hpa_metric=snap.hpa_metric,
        api_key_version=snap.api_key_version,
        model_digests=digest_record.sha256 if digest_record is not None else None,
        settings=snap.settings,
        picker_children=routes.children,
        gone_picker=routes.gone,
    )
    new = base_status(meta, snap.old)
    new.routing = routes.status
    if digest_record != snap.old.model_digest:
        new.model_digest = digest_record
        if digest_record is not None:
            logs.append((logging.INFO, f"model digest recorded from {digest_record.pod}: {digest_record.sha256[0]}"))
    new.oom_kills, new.memory_override_rejected = r.oom_kills, r.rejected
    new.plan = _plan_record(snap, r, placement, rendered.hash, keep, surge)
    kept = [r for r in new.plan.reasons if not r.startswith("routing: ")]  # a kept plan carries the last ones
    new.plan.reasons = [*kept, *(routes.profile.reasons if routes.profile is not None else ())]
    new.cold_start = _cold_start(snap, placement)
    new.scale_to_zero = scaletozero.status(spec, snap.old.scale_to_zero, zero, desired_replicas(spec), snap.wall)
    planned = set_planned(placement, why, verdict)
    if routes.missing is not None and snap.missing is None:
        snap = replace(snap, missing=routes.missing)
    decision = Decision(new, "progressing", logs=logs, avoid=r.avoid, replan_soon=r.unschedulable, planned=planned)
    if zero.replicas is not None:
        decision.scale = zero.replicas
        decision.events.append(("ScaledToZero" if zero.replicas == 0 else "Woken", zero.message))
        logs.append((logging.INFO, zero.message))
    _changes(snap, placement, rendered, decision)
    conditions = _conditions(snap, placement, rendered, planned, decision)
    new.conditions = merge_conditions(snap.old.conditions, conditions, meta.get("generation"))
    _observed(snap, decision)
    return decision


__all__ = [
    "AVOID_SECONDS",
    "MAX_RETRY_DELAY",
    "OOM_HEADROOM_STEP",
    "Decision",
    "LoadedFacts",
    "Snapshot",
    "api_failure",
    "check_spec",
    "decide",
    "failure",
    "keep_running",
    "materially_better",
    "retry_after",
    "retry_delay",
    "spec_hash",
    "surge_fits",
]
