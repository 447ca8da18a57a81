"""Status of a ModelDeployment from its plan, Deployment and pods. Pure.

Conditions and their reasons:

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
from dataclasses import dataclass, field
from typing import Any

from .api import MemoryStatus, PlanStatus
from .facts import ModelFacts
from .memory import MemoryBreakdown
from .placement import Placement
from .render import HASH_ANNOTATION
from .sizing import Plan, PlanResult, Resources

CONDITION_TYPES = ("Ready", "Planned", "Progressing", "Degraded", "Unschedulable")
PLAN_FAILURES = ("InvalidSpec", "ModelUnreadable", "NoNodeFits", "NoEligibleNodes", "NoNodes")
API_FAILURES = ("ApplyFailed", "ApiError", "ApiUnavailable")
DOWNLOADER = "fetch-model"

Cond = tuple[str, str, str]  # status, reason, message


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Conditions with one replaced; lastTransitionTime changes only when the status flips."""
    old = next((c for c in conditions if c.get("type") == type_), None)
    ltt = old.get("lastTransitionTime") if old and old.get("status") == status else None
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "observedGeneration": generation,
        "lastTransitionTime": ltt or now or now_iso(),
    }
    rest = [c for c in conditions if c.get("type") != type_] + [new]
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(rest, key=lambda c: order.get(str(c.get("type")), 99))


def apply_conditions(
    conditions: list[dict[str, Any]], values: dict[str, Cond], generation: int | None, now: str | None = None
) -> list[dict[str, Any]]:
    out = list(conditions)
    for type_, (status, reason, message) in values.items():
        out = set_condition(out, type_, status, reason, message, generation, now)
    return out


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


@dataclass
class PodSignals:
    """What the pods of a ModelDeployment say about its health."""

    unschedulable: str | None = None
    oom_killed: list[str] = field(default_factory=list)  # pod names, current template only when filtered
    download_failed: str | None = None
    image_pull: str | None = None
    config_error: str | None = None  # CreateContainerConfigError: a missing Secret or key, usually
    crash: str | None = None
    running: int = 0
    ready: int = 0  # Ready pods (of ``template_hash`` when given), not terminating


def _terminated(cs: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in ("state", "lastState"):
        t = (cs.get(key) or {}).get("terminated")
        if t:
            out.append(t)
    return out


def pod_signals(pods: list[dict[str, Any]], template_hash: str | None = None) -> PodSignals:
    """Scheduling failures, OOM kills (of pods of ``template_hash`` when given), download and image failures."""
    sig = PodSignals()
    for pod in pods:
        meta, st = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        if st.get("phase") == "Running":
            sig.running += 1
            current = template_hash is None or (meta.get("annotations") or {}).get(HASH_ANNOTATION) == template_hash
            if current and any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
            ):
                sig.ready += 1
        if st.get("phase") == "Pending":
            for c in st.get("conditions") or []:
                if (
                    c.get("type") == "PodScheduled"
                    and c.get("status") == "False"
                    and c.get("reason") == "Unschedulable"
                ):
                    sig.unschedulable = c.get("message") or "the scheduler found no node for the pod"
        for cs in st.get("initContainerStatuses") or []:
            if cs.get("name") != DOWNLOADER:
                continue
            for t in _terminated(cs):
                if t.get("exitCode", 0) != 0:
                    sig.download_failed = (t.get("message") or t.get("reason") or "model download failed").strip()
        for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                sig.image_pull = f"{cs.get('image')}: {waiting.get('message') or waiting.get('reason')}"
            if waiting.get("reason") == "CreateContainerConfigError":
                sig.config_error = f"{cs.get('name')}: {waiting.get('message') or waiting.get('reason')}"
        for cs in st.get("containerStatuses") or []:
            if any(t.get("reason") == "OOMKilled" for t in _terminated(cs)):
                annotations = meta.get("annotations") or {}
                if template_hash is None or annotations.get(HASH_ANNOTATION) == template_hash:
                    sig.oom_killed.append(str(meta.get("name")))
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CrashLoopBackOff":
                last = next(iter(_terminated(cs)), {})
                sig.crash = (last.get("message") or waiting.get("message") or "llama-server keeps exiting").strip()
    return sig


def workload_conditions(
    deploy: dict[str, Any] | None, pods: list[dict[str, Any]], desired: int, template_hash: str | None = None
) -> dict[str, Cond]:
    """Ready, Progressing, Degraded and Unschedulable of a planned ModelDeployment."""
    st = (deploy or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    total = int(st.get("replicas") or 0)
    sig = pod_signals(pods, template_hash)
    # Ready pods of the current plan count at once: the Deployment's readyReplicas follows them only when the
    # controller-manager gets to it (tens of seconds behind when it has hundreds of Deployments to update).
    ready = max(ready, sig.ready if template_hash is not None else 0)
    # The ReplicaSet could not create a pod (the API server refused it: an image with spaces, a quota, an
    # admission policy): the Deployment carries the reason, and there are no pods to tell.
    refused = next(
        (
            c.get("message") or c.get("reason") or "the ReplicaSet cannot create pods"
            for c in st.get("conditions") or []
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
        ),
        None,
    )
    out: dict[str, Cond] = {}
    if desired == 0:
        out["Ready"] = ("True", "ScaledToZero", "replicas is 0")
    elif ready >= desired:
        out["Ready"] = ("True", "ReplicasReady", f"{ready}/{desired} replicas ready")
    else:
        why = (
            refused
            or sig.unschedulable
            or sig.download_failed
            or sig.image_pull
            or sig.config_error
            or sig.crash
            or "starting"
        )
        out["Ready"] = ("False", "ReplicasNotReady", f"{ready}/{desired} replicas ready: {why}")
    dep_gen, obs_gen = (deploy or {}).get("metadata", {}).get("generation"), st.get("observedGeneration")
    deadline = next(
        (
            c
            for c in st.get("conditions") or []
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        ),
        None,
    )
    if deadline is not None:
        out["Progressing"] = ("False", "ProgressDeadlineExceeded", deadline.get("message") or "rollout stalled")
    elif updated < desired or ready < desired or total > desired or (dep_gen is not None and obs_gen != dep_gen):
        out["Progressing"] = ("True", "RollingOut", f"{updated}/{desired} updated, {ready} ready")
    else:
        out["Progressing"] = ("False", "RolloutComplete", f"{desired} replicas on the current plan")
    if sig.unschedulable:
        out["Unschedulable"] = ("True", "FailedScheduling", sig.unschedulable)
    else:
        out["Unschedulable"] = ("False", "Scheduled", "all pods are scheduled")
    if refused:
        out["Degraded"] = ("True", "PodCreateFailed", refused)
    elif sig.download_failed:
        out["Degraded"] = ("True", "ModelDownloadFailed", sig.download_failed)
    elif sig.oom_killed:
        out["Degraded"] = ("True", "OOMKilled", f"llama-server was OOM-killed in {', '.join(sorted(sig.oom_killed))}")
    elif sig.image_pull:
        out["Degraded"] = ("True", "ImagePullFailed", sig.image_pull)
    elif sig.config_error:
        out["Degraded"] = ("True", "ContainerConfigError", sig.config_error)
    elif sig.crash:
        out["Degraded"] = ("True", "CrashLoopBackOff", sig.crash)
    else:
        out["Degraded"] = ("False", "AsExpected", "")
    return out


def planning_failure_conditions(reason: str, message: str) -> dict[str, Cond]:
    """Conditions when there is no plan to run."""
    out: dict[str, Cond] = {
        "Planned": ("False", reason, message),
        "Ready": ("False", "NotPlanned", message),
        "Progressing": ("False", "NotPlanned", message),
    }
    if reason in ("InvalidSpec", "ModelUnreadable"):
        out["Degraded"] = ("True", reason, message)
    else:
        out["Unschedulable"] = ("True", reason, message)
    return out


def api_failure_conditions(reason: str, message: str) -> dict[str, Cond]:
    """Conditions when the API server refused (or could not take) what the plan needs; Planned is left as is."""
    return {
        "Ready": ("False", reason, message),
        "Progressing": ("False", reason, message),
        "Degraded": ("True", reason, message),
    }


def plan_status(
    placement: Placement, facts: ModelFacts, model_bytes: int, rendered_hash: str, headroom_boost: float
) -> dict[str, Any]:
    """status.plan: every planner output, the memory breakdown, the node class (camelCase)."""
    assert placement.result is not None
    res = placement.result
    p = res.plan
    ps = PlanStatus(
        model=facts.name,
        quant=facts.file_type or "",
        model_bytes=model_bytes,
        node_class=p.node,
        node_selector=placement.selector,
        backend=p.backend,
        gpu_layers=p.gpu_layers,
        total_layers=p.total_layers,
        context=p.context,
        parallel=p.parallel,
        kv_cache_type=p.kv_cache_type,
        load_mode=p.load_mode,
        flash_attention=p.flash_attention,
        threads=p.threads,
        ubatch=p.ubatch,
        cache_ram_mib=p.cache_ram_mib,
        ctx_checkpoints=p.ctx_checkpoints,
        args=p.args,
        memory=MemoryStatus(**{k: v for k, v in res.memory.model_dump().items() if k in MemoryStatus.model_fields}),
        memory_request=res.resources.requests.get("memory", ""),
        memory_request_bytes=res.memory_request_bytes,
        resources=res.resources.model_dump(),
        fits=res.fits,
        shortfall_bytes=res.shortfall_bytes,
        adapted=placement.adapted,
        headroom_boost=round(headroom_boost, 4),
        hash=rendered_hash,
        reasons=res.reasons,
        warnings=res.warnings,
    )
    return ps.model_dump(by_alias=True)


def plan_message(plan: dict[str, Any]) -> str:
    """One line for a plan in status.plan (the same words as a fresh placement's)."""
    return (
        f"{plan.get('backend')} on {plan.get('nodeClass')}: {plan.get('gpuLayers')}/{plan.get('totalLayers')} GPU "
        f"layers, context {plan.get('context')}, KV {plan.get('kvCacheType')}, memory {plan.get('memoryRequest')}"
    )


def placement_from_status(plan: dict[str, Any]) -> Placement:
    """The placement a status.plan records (the inverse of ``plan_status``), for keeping a running plan as is.

    Rendering needs only the plan's flags, resources and node selector, which status.plan holds exactly.
    """
    ps = PlanStatus.model_validate(plan)
    fields = [
        *("backend", "gpu_layers", "total_layers", "context", "parallel", "load_mode", "flash_attention"),
        *("kv_cache_type", "threads", "ubatch", "cache_ram_mib", "ctx_checkpoints", "args"),
    ]
    result = PlanResult(
        plan=Plan.model_validate({**{f: getattr(ps, f) for f in fields}, "node": ps.node_class}),
        memory=MemoryBreakdown(**ps.memory.model_dump()),
        resources=Resources(**ps.resources) if ps.resources else Resources(requests={}, limits={}),
        fits=ps.fits,
        shortfall_bytes=ps.shortfall_bytes,
        reasons=ps.reasons,
        warnings=ps.warnings,
        memory_request_bytes=ps.memory_request_bytes,
    )
    reason = "Adapted" if ps.adapted else "Planned"
    return Placement(True, reason, plan_message(plan), None, result, dict(ps.node_selector), ps.adapted)
