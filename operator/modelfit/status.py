"""Status of a ModelDeployment from its plan, Deployment and pods. Pure.

Conditions and their reasons (one setter each, ``set_*``, called in one list by ``decide``):

- Planned: True Planned | Adapted; False InvalidSpec | ModelUnreadable | NoNodeFits | NoEligibleNodes | NoNodes
- Ready: True ReplicasReady | ScaledToZero; False ReplicasNotReady | NotPlanned | API_FAILURES
- Progressing: True RollingOut; False RolloutComplete | ProgressDeadlineExceeded | NotPlanned | API_FAILURES
- Degraded: True InvalidSpec | ModelUnreadable | ModelDownloadFailed | OOMKilled | ImagePullFailed |
  ContainerConfigError | CrashLoopBackOff | PodCreateFailed | SecretNotFound | SecretKeyNotFound | PvcNotFound | API_FAILURES;
  False AsExpected
- API_FAILURES: ApplyFailed (the API server refused a child: HTTP 4xx, the server's message), ApiError (a read was
  refused), ApiUnavailable (unreachable, 5xx, 409 or 429: retried with backoff)
- Unschedulable: True FailedScheduling (the scheduler's message) | NoNodeFits | NoEligibleNodes | NoNodes |
  WaitingForNode (pinned to a node shape a cluster autoscaler can add) | InsufficientCapacity (more replicas
  wanted than the present nodes of the plan's class hold);
  False Scheduled
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

from .api import Condition, ConditionStatus, ConditionType, PlanStatus
from .download import verified_digests
from .facts import ModelFacts
from .placement import WAITING_FOR_NODE, Placement
from .render import HASH_ANNOTATION
from .sizing import PlanResult

CONDITION_TYPES: tuple[ConditionType, ...] = get_args(ConditionType)  # in the order they are listed
PLAN_FAILURES = ("InvalidSpec", "ModelUnreadable", "NoNodeFits", "NoEligibleNodes", "NoNodes")
API_FAILURES = ("ApplyFailed", "ApiError", "ApiUnavailable")
DOWNLOADER = "fetch-model"
MESSAGE_MAX = 32768  # metav1.Condition's limit
IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: ConditionType, status: ConditionStatus, reason: str, message: str = "") -> Condition:
    """A condition as a setter says it (``merge_conditions`` adds its generation and transition time), its
    message cut to metav1.Condition's limit."""
    return Condition(type=type_, status=status, reason=reason, message=message[:MESSAGE_MAX])


def merge_conditions(
    old: list[Condition], new: Iterable[Condition], generation: int | None, now: str | None = None
) -> list[Condition]:
    """``old`` with each of ``new`` replaced, sorted by type; lastTransitionTime changes only when the status
    flips."""
    out = {c.type: c for c in old}
    for c in new:
        was = out.get(c.type)
        ltt = was.last_transition_time if was is not None and was.status == c.status else None
        out[c.type] = c.model_copy(
            update={"observed_generation": generation, "last_transition_time": ltt or now or now_iso()}
        )
    return sorted(out.values(), key=lambda c: CONDITION_TYPES.index(c.type))


def find_condition(conditions: list[Condition], type_: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


# ---- what the pods and the Deployment say ---------------------------------------------------------


@dataclass
class PodSignals:
    """What the pods of a ModelDeployment say about its health."""

    unschedulable: str | None = None
    # the same, of the pods of ``template_hash`` only: an old template's pod, pinned where the plan no longer goes,
    # says nothing of the new placement (it leaves once the rollout reaches it)
    unschedulable_current: str | None = None
    oom_killed: list[str] = field(default_factory=list)  # pod names, current template only when filtered
    download_failed: str | None = None
    image_pull: str | None = None
    config_error: str | None = None  # CreateContainerConfigError: a missing Secret or key, usually
    crash: str | None = None
    running: int = 0
    ready: int = 0  # Ready pods (of ``template_hash`` when given), not terminating


def _last(found: Iterable[str | None]) -> str | None:
    """The last signal found: a later pod (or container) says it over an earlier one."""
    out = None
    for x in found:
        if x is not None:
            out = x
    return out


def _terminated(cs: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for key in ("state", "lastState") if (t := (cs.get(key) or {}).get("terminated"))]


def _waiting(cs: dict[str, Any]) -> dict[str, Any]:
    return dict((cs.get("state") or {}).get("waiting") or {})


def _all_containers(st: dict[str, Any]) -> list[dict[str, Any]]:
    return list(st.get("containerStatuses") or []) + list(st.get("initContainerStatuses") or [])


def _is_ready(st: dict[str, Any]) -> bool:
    return st.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
    )


def _unschedulable(st: dict[str, Any]) -> str | None:
    if st.get("phase") != "Pending":
        return None
    return _last(
        c.get("message") or "the scheduler found no node for the pod"
        for c in st.get("conditions") or []
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
    )


def verified_download(pods: list[dict[str, Any]], url: str) -> tuple[str, list[str]] | None:
    """(pod, digests) that a fetch-model of ``url`` reported when it verified the model and exited 0, the oldest
    pod first: the first use, which every later download is held to."""

    def created(p: dict[str, Any]) -> str:
        return str((p.get("metadata") or {}).get("creationTimestamp") or "")

    for pod in sorted(pods, key=created):
        init = [c for c in (pod.get("spec") or {}).get("initContainers") or [] if c.get("name") == DOWNLOADER]
        env = {e.get("name"): e.get("value") for c in init for e in c.get("env") or []}
        if env.get("MODEL_URL") != url:
            continue
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") != DOWNLOADER:
                continue
            for t in _terminated(cs):
                digests = verified_digests(t.get("message")) if t.get("exitCode") == 0 else None
                if digests:
                    return str((pod.get("metadata") or {}).get("name") or ""), digests
    return None


def _download_failed(st: dict[str, Any]) -> str | None:
    return _last(
        (t.get("message") or t.get("reason") or "model download failed").strip()
        for cs in st.get("initContainerStatuses") or []
        if cs.get("name") == DOWNLOADER
        for t in _terminated(cs)
        if t.get("exitCode", 0) != 0
    )


def _waiting_for(st: dict[str, Any], reasons: tuple[str, ...], who: str) -> str | None:
    """``who`` (the container's image or name): the waiting message of the last container waiting for one of
    ``reasons``."""
    return _last(
        f"{cs.get(who)}: {w.get('message') or w.get('reason')}"
        for cs in _all_containers(st)
        if (w := _waiting(cs)).get("reason") in reasons
    )


def _image_pull(st: dict[str, Any]) -> str | None:
    return _waiting_for(st, IMAGE_PULL, "image")


def _config_error(st: dict[str, Any]) -> str | None:
    return _waiting_for(st, ("CreateContainerConfigError",), "name")


def _crash(st: dict[str, Any]) -> str | None:
    return _last(
        (
            next(iter(_terminated(cs)), {}).get("message")
            or _waiting(cs).get("message")
            or "llama-server keeps exiting"
        ).strip()
        for cs in st.get("containerStatuses") or []
        if _waiting(cs).get("reason") == "CrashLoopBackOff"
    )


def _oom_killed(pod: dict[str, Any]) -> list[str]:
    name = str((pod.get("metadata") or {}).get("name"))
    containers = (pod.get("status") or {}).get("containerStatuses") or []
    return [name for cs in containers if any(t.get("reason") == "OOMKilled" for t in _terminated(cs))]


def _is_current(pod: dict[str, Any], template_hash: str | None) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return template_hash is None or annotations.get(HASH_ANNOTATION) == template_hash


def pod_signals(pods: list[dict[str, Any]], template_hash: str | None = None) -> PodSignals:
    """Scheduling failures, OOM kills (of pods of ``template_hash`` when given), download and image failures."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    current = [p for p in live if _is_current(p, template_hash)]
    states = [p.get("status") or {} for p in live]

    def last(signal: Callable[[dict[str, Any]], str | None]) -> str | None:
        return _last(signal(st) for st in states)

    return PodSignals(
        unschedulable=last(_unschedulable),
        unschedulable_current=_last(_unschedulable(p.get("status") or {}) for p in current),
        oom_killed=[name for p in current for name in _oom_killed(p)],
        download_failed=last(_download_failed),
        image_pull=last(_image_pull),
        config_error=last(_config_error),
        crash=last(_crash),
        running=sum(st.get("phase") == "Running" for st in states),
        ready=sum(_is_ready(p.get("status") or {}) for p in current),
    )


@dataclass(frozen=True)
class Workload:
    """What the Deployment and its pods say, read once for the setters."""

    desired: int  # replicas the spec asks for
    ready: int
    updated: int  # pods of the plan's pod template (none while the live Deployment has another template)
    total: int
    lagging: bool  # the Deployment controller has not seen the Deployment's generation yet
    refused: str | None  # the ReplicaSet cannot create pods (ReplicaFailure): why
    stalled: str | None  # the rollout passed its deadline (ProgressDeadlineExceeded): why
    pods: PodSignals


def _deploy_condition(st: dict[str, Any], type_: str, status: str | None, reason: str | None) -> dict[str, Any] | None:
    return next(
        (
            c
            for c in st.get("conditions") or []
            if c.get("type") == type_
            and (status is None or c.get("status") == status)
            and (reason is None or c.get("reason") == reason)
        ),
        None,
    )


def workload(
    deploy: dict[str, Any] | None, pods: list[dict[str, Any]], desired: int, template_hash: str | None = None
) -> Workload:
    """The Deployment's counts and conditions and the pods' signals (see ``pod_signals``).

    ``template_hash`` is the pod template of the plan: a live Deployment with another one (a spec change about
    to be applied, the rollout not started) has none of its pods updated, whatever its own status says.
    """
    st = (deploy or {}).get("status") or {}
    sig = pod_signals(pods, template_hash)
    # The ReplicaSet could not create a pod (the API server refused it: an image with spaces, a quota, an
    # admission policy): the Deployment carries the reason, and there are no pods to tell.
    failure = _deploy_condition(st, "ReplicaFailure", "True", None)
    deadline = _deploy_condition(st, "Progressing", None, "ProgressDeadlineExceeded")
    generation = ((deploy or {}).get("metadata") or {}).get("generation")
    live = (((deploy or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}
    stale = (
        deploy is not None
        and template_hash is not None
        and (live.get("annotations") or {}).get(HASH_ANNOTATION) != template_hash
    )
    return Workload(
        desired=desired,
        # Ready pods of the current plan count at once: the Deployment's readyReplicas follows them only when the
        # controller-manager gets to it (tens of seconds behind when it has hundreds of Deployments to update).
        ready=max(int(st.get("readyReplicas") or 0), sig.ready if template_hash is not None else 0),
        updated=0 if stale else int(st.get("updatedReplicas") or 0),
        total=int(st.get("replicas") or 0),
        lagging=generation is not None and st.get("observedGeneration") != generation,
        refused=(
            (failure.get("message") or failure.get("reason") or "the ReplicaSet cannot create pods")
            if failure is not None
            else None
        ),
        stalled=(deadline.get("message") or "rollout stalled") if deadline is not None else None,
        pods=sig,
    )


# ---- one setter per condition ---------------------------------------------------------------------


def set_planned(placement: Placement, why: str, verdict: str | None) -> Condition:
    """Planned: the placement's own words, its warnings and the rebalance verdict (``why``); or why a memory
    override is ignored (``verdict``)."""
    if verdict is not None:
        return condition("Planned", "True", "MemoryOverrideIgnored", verdict)
    assert placement.result is not None
    message = placement.message
    if placement.result.warnings:
        message += f"; {'; '.join(placement.result.warnings)}"
    if why:
        message += f"; {why}"
    return condition("Planned", "True", placement.reason, message)


def set_ready(w: Workload) -> Condition:
    if w.desired == 0:
        return condition("Ready", "True", "ScaledToZero", "replicas is 0")
    if w.ready >= w.desired:
        return condition("Ready", "True", "ReplicasReady", f"{w.ready}/{w.desired} replicas ready")
    sig = w.pods
    why = w.refused or sig.unschedulable or sig.download_failed or sig.image_pull or sig.config_error or sig.crash
    return condition("Ready", "False", "ReplicasNotReady", f"{w.ready}/{w.desired} replicas ready: {why or 'starting'}")


def set_progressing(w: Workload) -> Condition:
    if w.stalled is not None:
        return condition("Progressing", "False", "ProgressDeadlineExceeded", w.stalled)
    if w.updated < w.desired or w.ready < w.desired or w.total > w.desired or w.lagging:
        return condition("Progressing", "True", "RollingOut", f"{w.updated}/{w.desired} updated, {w.ready} ready")
    return condition("Progressing", "False", "RolloutComplete", f"{w.desired} replicas on the current plan")


def set_degraded(w: Workload, missing: Condition | None = None) -> Condition:
    """Degraded: a Secret, key or PVC the pods need and that does not exist (``missing``, checked by the
    shell), else the first of what the Deployment and the pods say."""
    sig = w.pods
    if missing is not None:
        return missing.model_copy(update={"type": "Degraded"})
    if w.refused:
        return condition("Degraded", "True", "PodCreateFailed", w.refused)
    if sig.download_failed:
        return condition("Degraded", "True", "ModelDownloadFailed", sig.download_failed)
    if sig.oom_killed:
        killed = ", ".join(sorted(sig.oom_killed))
        return condition("Degraded", "True", "OOMKilled", f"llama-server was OOM-killed in {killed}")
    if sig.image_pull:
        return condition("Degraded", "True", "ImagePullFailed", sig.image_pull)
    if sig.config_error:
        return condition("Degraded", "True", "ContainerConfigError", sig.config_error)
    if sig.crash:
        return condition("Degraded", "True", "CrashLoopBackOff", sig.crash)
    return condition("Degraded", "False", "AsExpected", "")


@dataclass(frozen=True)
class Room:
    """The replicas the present nodes of the plan's class hold (``decide.replicas_that_fit``)."""

    replicas: int
    nodes: int
    selector: dict[str, str]


def set_unschedulable(
    w: Workload, *, shape: str | None = None, waiting: str | None = None, room: Room | None = None
) -> Condition:
    """Unschedulable: pods the scheduler refuses, in the words of the node shape they wait for (``shape``, the
    plan is pinned to one); a plan that waits for a node (``waiting``: the placement's message); or, before the
    scheduler says it, more replicas than the present nodes hold (``room``)."""
    refused = w.pods.unschedulable
    if refused and shape is not None:
        return condition(
            "Unschedulable",
            "True",
            WAITING_FOR_NODE,
            f"pods wait for a node of shape {shape} (a cluster autoscaler can add one): {refused}",
        )
    if waiting is not None:
        return condition("Unschedulable", "True", WAITING_FOR_NODE, waiting)
    if refused:
        return condition("Unschedulable", "True", "FailedScheduling", refused)
    if room is not None and room.nodes and w.desired > room.replicas:
        where = ", ".join(f"{k}={v}" for k, v in sorted(room.selector.items()))
        return condition(
            "Unschedulable",
            "True",
            "InsufficientCapacity",
            f"{w.desired} replicas wanted, the {room.nodes} present node(s) of {where} hold {room.replicas}; the "
            "others stay pending (a cluster autoscaler can add a node)",
        )
    return condition("Unschedulable", "False", "Scheduled", "all pods are scheduled")


def planning_failure_conditions(reason: str, message: str) -> list[Condition]:
    """Conditions when there is no plan to run."""
    bad_input = reason in ("InvalidSpec", "ModelUnreadable", "HostPathNotAllowed", "ImageNotAllowed")
    return [
        condition("Planned", "False", reason, message),
        condition("Ready", "False", "NotPlanned", message),
        condition("Progressing", "False", "NotPlanned", message),
        condition("Degraded" if bad_input else "Unschedulable", "True", reason, message),
    ]


def api_failure_conditions(reason: str, message: str) -> list[Condition]:
    """Conditions when the API server refused (or could not take) what the plan needs; Planned is left as is."""
    return [
        condition("Ready", "False", reason, message),
        condition("Progressing", "False", reason, message),
        condition("Degraded", "True", reason, message),
    ]


# ---- status.plan ----------------------------------------------------------------------------------


def plan_status(
    placement: Placement, facts: ModelFacts, model_bytes: int, rendered_hash: str, headroom_boost: float
) -> PlanStatus:
    """status.plan: every planner output, the memory breakdown, the node class.

    The plan's and the result's fields are copied by name (``PlanStatus`` names them alike); what the status does
    not record (see ``UNRECORDED``) is left out.
    """
    assert placement.result is not None
    res = placement.result
    return PlanStatus.model_validate(
        {
            **res.model_dump(),
            **res.plan.model_dump(),
            "model": facts.name,
            "quant": facts.file_type or "",
            "model_bytes": model_bytes,
            "node_class": res.plan.node,
            "node_selector": placement.selector,
            "memory_request": res.resources.requests.get("memory", ""),
            "adapted": placement.adapted,
            "headroom_boost": round(headroom_boost, 4),
            "hash": rendered_hash,
        }
    )


# What a PlanResult holds that status.plan does not record, so a kept plan comes back without it: the planner's
# working numbers (for ranking candidates and the CLI's report), not what renders the pods.
UNRECORDED = {
    "plan": {"env"},  # not rendered yet (sizing.Policy.huge_pages is off)
    "memory": {"compute_reserve_bytes", "full_context_bytes"},
    "result": {"cache_free_request_bytes", "cpu_request_millis", "threads_wanted"},
}


def plan_message(plan: PlanStatus) -> str:
    """One line for a plan in status.plan (the same words as a fresh placement's)."""
    return (
        f"{plan.backend} on {plan.node_class}: {plan.gpu_layers}/{plan.total_layers} GPU "
        f"layers, context {plan.context}, KV {plan.kv_cache_type}, memory {plan.memory_request}"
    )


def placement_from_status(plan: PlanStatus) -> Placement:
    """The placement a status.plan records (the inverse of ``plan_status``), for keeping a running plan as is.

    Rendering needs only the plan's flags, resources and node selector, which status.plan holds exactly.
    """
    fields = plan.model_dump()
    result = PlanResult.model_validate(
        {
            **fields,
            "plan": {**fields, "node": plan.node_class},
            "resources": plan.resources or {"requests": {}, "limits": {}},
        }
    )
    reason = "Adapted" if plan.adapted else "Planned"
    return Placement(True, reason, plan_message(plan), None, result, dict(plan.node_selector), plan.adapted)
