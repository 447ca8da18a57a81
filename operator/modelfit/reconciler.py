"""The reconciler: gather a snapshot, call ``decide``, apply its decision and write the status.

Both entrances end here: kopf's ModelDeployment handler (create/update/resume) and the resync loop.
- Node added/changed/removed -> a node generation counter moves; the resync loop re-plans every
  ModelDeployment on its next tick, and only a changed plan is applied (rolls out).
- Pod or Deployment of ours changed -> the resync loop refreshes that ModelDeployment's status, reacts to
  FailedScheduling (adapt: plan elsewhere/smaller), OOMKilled (more headroom), download failures.
- With node shapes (``--node-shapes``) a spec that fits no present node is planned for the smallest shape
  that fits and pinned to its labels (WaitingForNode): its pending pods ask a cluster autoscaler for nodes.
Nothing raised by a bad spec or an unreadable model escapes: it becomes a condition. So does an API error
while applying the children: a 4xx (an invalid child, a forbidden kind) is reported and not retried until
something changes; unreachable, 5xx, 409 and 429 are reported and retried with backoff, a bounded number
of times by kopf and every few minutes by the resync loop after that. The status has one writer,
``write_status``, called by ``reconcile`` under the object's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import http.client
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from . import api, metrics
from .api import ModelDeploymentSpec
from .cache import host_path_problem
from .decide import Decision, LoadedFacts, Snapshot, api_failure, check_spec, decide, failure, retry_delay
from .gguf_reader import GGUFError
from .kube import ClusterSnapshot, Kube, KubeError, get_client, path_for
from .nodes import NodeShape
from .occupancy import Reservation
from .render import HPA_METRIC, MD_LABEL, POD_MONITOR_API_VERSION, model_file, selector_string
from .routing import POOL_API_VERSION
from .scaletozero import Activity
from .settings import DEFAULT as DEFAULT_SETTINGS
from .sources import Sources, load_facts, secret_problem
from .status import condition

RESYNC_TICK = 5.0  # seconds between resync checks
RESYNC_DEBOUNCE = 1.0  # after a pod or Deployment event wakes the resync loop, gather more events this long
RESYNC_CONCURRENCY = 4  # ModelDeployments the resync loop reconciles at once
FULL_RESYNC = 300.0  # re-plan at least this often
KEY_RECHECK = 10.0  # seconds between reads of a referenced API-key Secret: a rotated key rolls the pods
KEY_READS_PER_TICK = 50  # at most this many Secret reads per resync tick (1000 keys: each every 100 s)


class ApiRetry(Exception):
    """A transient API failure (unreachable, 5xx, 409, 429): ``reconcile`` writes ``patch`` (the condition),
    then raises this for its caller to retry later."""

    def __init__(self, message: str, patch: dict[str, Any]) -> None:
        super().__init__(message)
        self.patch = patch


@dataclass
class _Seen:
    node_generation: int = -1
    at: float = 0.0
    pods_dirty: bool = False
    avoid: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    failures: int = 0  # reconciles in a row that asked to come back (API retry, requeue_after): the backoff
    retry_at: float = 0.0  # when the resync loop retries after one (monotonic; 0: no retry pending)
    verified: bool = False  # the children were checked against the plan since this process started (or lost one)
    deploy_generation: int | None = None  # metadata.generation of the Deployment as we last applied or saw it
    # The plan status of our last reconcile and the generation it was for: the body a reconcile gets can lag
    # behind it (the resync loop works on the last watched body; our own status write may not be back yet).
    plan: api.PlanStatus | None = None
    plan_generation: Any = None
    # Scale to zero (autoscaling.minReplicas 0): the picker's last read and when it last showed a request (wall
    # seconds; a start counts as busy), and the spec.replicas this operator wrote with the generation it made (the
    # body lags behind that write too).
    activity: Activity | None = None
    last_busy: float = 0.0
    scaled: tuple[int, int] | None = None


class OperatorState:
    """In-memory indexes; everything here can be rebuilt from the cluster after a restart."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.sources = sources or Sources()  # model reads: header reads, facts of url files and headers
        self.node_generation = 0
        self.node_signatures: dict[str, Any] = {}
        self.snapshot = ClusterSnapshot()
        self.seen: dict[tuple[str, str], _Seen] = {}
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self.zero_task: asyncio.Task[None] | None = None  # scale to zero's watch of the pickers (zerowatch)
        self.pod_monitors: tuple[bool, float] = (False, 0.0)  # (served, checked at)
        self.inference_pools: tuple[bool, float] = (False, 0.0)  # (served, checked at)
        self.node_shapes: list[NodeShape] = []  # nodes a cluster autoscaler can add (--node-shapes)
        self.hpa_metric = HPA_METRIC  # the per-pod metric of rendered HPAs (--hpa-metric)
        self.settings = DEFAULT_SETTINGS  # the admin's bounds on every spec (--host-path-root, --allow-network)
        self.wake: asyncio.Event | None = None  # set by pod/Deployment events: the resync loop looks at once
        self.reservations: dict[tuple[str, str], Reservation] = {}  # our Deployments' pods, as planned
        self.reservations_version = 0
        # API-key Secrets referenced by a ModelDeployment, (namespace, name) -> (resourceVersion, read at)
        self.key_versions: dict[tuple[str, str], tuple[str | None, float]] = {}

    def mark_dirty(self, key: tuple[str, str]) -> None:
        self.seen.setdefault(key, _Seen()).pods_dirty = True
        if self.wake is not None:
            self.wake.set()

    def reserve(self, key: tuple[str, str], reservation: Reservation | None) -> None:
        """What the pods of a ModelDeployment's Deployment request, and where (None: nothing)."""
        if self.reservations.get(key) != reservation:
            if reservation is None:
                self.reservations.pop(key, None)
            else:
                self.reservations[key] = reservation
            self.reservations_version += 1

    def child_deleted(self, key: tuple[str, str]) -> None:
        """An owned child was deleted (by hand, say): check every child and restore what is missing."""
        self.seen.setdefault(key, _Seen()).verified = False
        self.mark_dirty(key)

    def forget(self, key: tuple[str, str]) -> None:
        self.reserve(key, None)
        self.seen.pop(key, None)
        self.locks.pop(key, None)
        self.bodies.pop(key, None)

    def lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def node_changed(self, event_type: str | None, node: dict[str, Any]) -> bool:
        meta, st = node.get("metadata") or {}, node.get("status") or {}
        name = str(meta.get("name"))
        if event_type == "DELETED":
            changed = self.node_signatures.pop(name, None) is not None
        else:
            ready = [c.get("status") for c in st.get("conditions") or [] if c.get("type") == "Ready"]
            sig = (
                meta.get("labels"),
                st.get("allocatable"),
                (node.get("spec") or {}).get("taints"),
                (node.get("spec") or {}).get("unschedulable"),
                ready,
            )
            changed = self.node_signatures.get(name) != sig
            self.node_signatures[name] = sig
        if changed:
            self.node_generation += 1
            self.snapshot.invalidate()
        return changed

    def due(self, key: tuple[str, str]) -> bool:
        s = self.seen.get(key)
        if s is None:
            return True
        now = time.monotonic()
        return (
            s.node_generation != self.node_generation
            or s.pods_dirty
            or now - s.at > FULL_RESYNC
            or bool(s.retry_at and now >= s.retry_at)
        )


STATE = OperatorState()


# ---- reconcile ---------------------------------------------------------------------------------

POD_MONITOR_RECHECK = 60.0


async def _served(kube: Kube, api_version: str, plural: str, last: tuple[bool, float]) -> tuple[bool, float]:
    """Does the cluster serve ``plural`` of ``api_version``? (served, checked at), re-checked every minute."""
    served, at = last
    if at and time.monotonic() - at < POD_MONITOR_RECHECK:
        return last
    try:
        group = await kube.get(f"/apis/{api_version}")
        served = any(r.get("name") == plural for r in (group or {}).get("resources") or [])
    except KubeError:
        served = False
    return served, time.monotonic()


async def pod_monitors_served(kube: Kube, state: OperatorState) -> bool:
    """Does the cluster serve PodMonitors (Prometheus Operator)?"""
    state.pod_monitors = await _served(kube, POD_MONITOR_API_VERSION, "podmonitors", state.pod_monitors)
    return state.pod_monitors[0]


async def inference_pools_served(kube: Kube, state: OperatorState) -> bool:
    """Does the cluster serve InferencePools v1 (the Gateway API Inference Extension's CRD)?"""
    state.inference_pools = await _served(kube, POOL_API_VERSION, "inferencepools", state.inference_pools)
    return state.inference_pools[0]


def _status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Only what changed; map keys that disappeared are nulled (merge-patch semantics)."""
    out: dict[str, Any] = {}
    for k, v in new.items():
        if old.get(k) == v:
            continue
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            sub = _status_patch(old[k], v)
            for gone in set(old[k]) - set(v):
                sub[gone] = None
            out[k] = sub
        else:
            out[k] = v
    return out


async def reconcile(
    body: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    kube: Kube | None = None,
    state: OperatorState = STATE,
) -> dict[str, Any]:
    """Gather, decide, apply for one ModelDeployment and write its status; returns the status patch.

    Both entrances (kopf's handler, the resync loop) call this. When to look again is the decision's
    ``requeue_after`` (a model not readable yet, a plan no node fits) or, for a transient API failure, the
    same backoff; that failure writes its condition, then raises ``ApiRetry`` for the caller to retry.
    """
    kube = kube or get_client()
    started = time.monotonic()
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    async with state.lock(key):
        seen = state.seen.setdefault(key, _Seen())
        seen.node_generation, seen.at, seen.pods_dirty = state.node_generation, time.monotonic(), False
        result, retry = "error", None
        try:
            patch, result, requeue_after = await _reconcile(body, logger, kube, state, seen)
        except ApiRetry as exc:
            patch, result, retry, requeue_after = exc.patch, "api_retry", exc, retry_delay(seen.failures)
        finally:
            metrics.RECONCILES.labels(result=result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if requeue_after is not None:  # seen.failures counts these in a row: the backoff
            seen.failures += 1
            seen.retry_at = time.monotonic() + requeue_after
        else:
            seen.failures, seen.retry_at = 0, 0.0
        await write_status(kube, key, patch, logger)
        if retry is not None:
            raise retry
        return patch


async def write_status(
    kube: Kube,
    key: tuple[str, str],
    patch: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    """The one writer of a ModelDeployment's status: a merge patch of what changed, on the status subresource.

    Called under the object's lock, so two reconciles of one object write in the order they decided. kopf's
    own patch stays empty; a status-only change does not call kopf's handler again (its create/update/resume
    handlers compare the object without its status, and keep their progress in annotations).
    """
    if not patch:
        return
    try:
        await kube.merge_patch(path_for(api.API_VERSION, api.KIND, *key) + "/status", {"status": patch})
    except KubeError as exc:
        if exc.status != 404:
            raise
        logger.debug(f"not writing the status: the object is gone ({exc})")  # deleted meanwhile, as kopf ignores it


async def _references(
    kube: Kube, ns: str, spec: ModelDeploymentSpec, state: OperatorState
) -> tuple[api.Condition | None, str | None]:
    """(A Secret, Secret key or PVC the pods need and that does not exist, as a Degraded condition; the
    resourceVersion of the API-key Secret, which the pod template carries so that a rotated key rolls the pods).

    The operator reads only the Secrets a spec names, by name. The pods are created anyway (they start once
    it exists); an answer other than found/not found (no RBAC on Secrets in this namespace, say) means the
    check cannot be made, and the kubelet's CreateContainerConfigError tells.
    """
    missing, version = None, None
    try:
        refs = [
            (spec.api_key_secret_ref, "spec.apiKeySecretRef"),
            (spec.model.token_secret_ref, "spec.model.tokenSecretRef"),
        ]
        for ref, where in refs:
            if ref is None:
                continue
            secret = await kube.get(path_for("v1", "Secret", ns, ref.name))
            if ref is spec.api_key_secret_ref and secret is not None:
                version = str((secret.get("metadata") or {}).get("resourceVersion") or "") or None
                state.key_versions[(ns, ref.name)] = (version, time.monotonic())
            problem = secret_problem(secret, ref, where, ns, "the pods cannot start until it does")
            if problem is not None and missing is None:
                missing = problem
        pvc = spec.model.pvc
        if (
            missing is None
            and pvc is not None
            and await kube.get(path_for("v1", "PersistentVolumeClaim", ns, pvc.claim_name)) is None
        ):
            missing = condition(
                "Degraded",
                "True",
                "PvcNotFound",
                f"PersistentVolumeClaim {pvc.claim_name} (spec.model.pvc) does not exist in namespace {ns}; "
                "the pods cannot be scheduled until it does",
            )
    except KubeError:
        pass
    ref = spec.api_key_secret_ref
    if version is None and ref is not None:
        # Not read (no answer, no RBAC) or gone: keep what the pods run with, so a failed read never rolls them.
        version = state.key_versions.get((ns, ref.name), (None, 0.0))[0]
    return missing, version


class _ApiFailed(Exception):
    """A read or write the API server refused, with what was being done."""

    def __init__(self, exc: KubeError, what: str, write: bool) -> None:
        super().__init__(f"{what}: {exc}")
        self.exc, self.what, self.write = exc, what, write


async def _gather(
    body: dict[str, Any],
    old: api.ModelDeploymentStatus,
    spec: ModelDeploymentSpec,
    loaded: LoadedFacts,
    kube: Kube,
    state: OperatorState,
    seen: _Seen,
) -> Snapshot:
    """Everything ``decide`` reads: node facts (what every other pod requests), our pods and Deployment."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    try:
        await state.snapshot.refresh(kube)
    except KubeError as exc:
        raise _ApiFailed(exc, "listing nodes and pods", write=False) from exc

    try:
        pods = await kube.list(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector_string(name))
    except KubeError as exc:
        raise _ApiFailed(exc, f"listing the pods of {name}", write=False) from exc
    try:
        deploy = await kube.get(path_for("apps/v1", "Deployment", ns, name))
    except KubeError as exc:
        raise _ApiFailed(exc, f"reading Deployment {name}", write=False) from exc
    absent: list[str] = []
    if not seen.verified and deploy is not None:
        # After a start or a deleted child: what was applied may have changed while no one watched.
        try:
            if await kube.get(path_for("v1", "Service", ns, name)) is None:
                absent.append(f"Service {name}")
        except KubeError as exc:
            raise _ApiFailed(exc, f"reading Service {name}", write=False) from exc
    pod_monitors = await pod_monitors_served(kube, state)
    pools = spec.routing is not None and await inference_pools_served(kube, state)
    missing, key_version = await _references(kube, ns, spec, state)
    gen = meta.get("generation")
    if (
        seen.plan is not None
        and seen.plan_generation == gen
        and (old.plan.hash if old.plan is not None else None) != seen.plan.hash
    ):
        # our own last word; the body lags behind it
        old = old.model_copy(update={"plan": seen.plan, "observed_generation": gen})
    # No await from here to the reservation after decide(): a reconcile that places next sees these pods.
    return Snapshot(
        meta=meta,
        spec=spec,
        old=old,
        loaded=loaded,
        nodes=state.snapshot.node_facts(MD_LABEL, (ns, name), state.reservations, state.reservations_version),
        pods=pods,
        deploy=deploy,
        now=time.monotonic(),
        pod_monitors=pod_monitors,
        inference_pools=pools,
        shapes=state.node_shapes,
        empty=state.snapshot.empty_nodes(),
        avoid=dict(seen.avoid),
        seen_generation=seen.deploy_generation,
        missing=missing,
        api_key_version=key_version,
        verify=not seen.verified,
        absent_children=absent,
        hpa_metric=state.hpa_metric,
        failures=seen.failures,
        settings=state.settings,
        activity=seen.activity,
        last_busy=seen.last_busy,
        wall=time.time(),
    )


async def _apply(kube: Kube, ns: str, decision: Decision, seen: _Seen, deploy_existed: bool = True) -> None:
    """Delete what must not exist, then apply every child (the Deployment last). Before our first Deployment
    (applied last) nothing of ours can be left over: no DELETE then."""
    for api_version, kind, child in decision.delete if deploy_existed else []:
        try:
            await kube.delete(path_for(api_version, kind, ns, child))
        except KubeError as exc:
            raise _ApiFailed(exc, f"deleting {kind} {child}", write=True) from exc
    for obj in decision.apply:
        try:
            out = await kube.apply(obj)
        except KubeError as exc:
            raise _ApiFailed(exc, f"{obj['kind']} {obj['metadata']['name']}", write=True) from exc
        if obj["kind"] == "Deployment":
            seen.deploy_generation = (out.get("metadata") or {}).get("generation")
            decision.status.replicas = int(((out.get("status") or {}).get("replicas")) or 0)


async def _reconcile(
    body: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    kube: Kube,
    state: OperatorState,
    seen: _Seen,
) -> tuple[dict[str, Any], str, float | None]:
    """Gather a snapshot, call ``decide.decide``, apply its decision; every outcome is a status patch
    (with the result for the metric, and when to look again)."""
    meta = body.get("metadata") or {}
    ns = str(meta.get("namespace"))
    old: dict[str, Any] = dict(body.get("status") or {})  # as written: the patch is what differs from it
    read = _read_status(old, logger)  # as the core reads it
    checked = check_spec(meta, body.get("spec") or {})
    if isinstance(checked, tuple):
        return _finish(logger, old, failure(meta, read, *checked, "invalid"))
    spec = _scaled(checked, meta, seen)
    refused = host_path_problem(spec, state.settings)
    if refused is not None:
        return _finish(logger, old, failure(meta, read, "HostPathNotAllowed", refused, "invalid"))
    try:
        loaded = await load_facts(spec, state.sources, kube, ns, settings=state.settings)
    except (GGUFError, KeyError, ValueError, OSError, http.client.HTTPException) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc) or type(exc).__name__
        if isinstance(exc, http.client.HTTPException):
            msg = f"{model_file(spec).url}: not an HTTP answer ({type(exc).__name__}: {msg})"
        return _finish(
            logger,
            old,
            failure(meta, read, "ModelUnreadable", f"cannot read the model: {msg}", "model_unreadable", seen.failures),
        )
    decision: Decision | None = None
    try:
        snap = await _gather(body, read, spec, loaded, kube, state, seen)
        metrics.track_node_facts_age(state.snapshot.age)
        decision = decide(snap)
        _reserve(state, snap, decision)
        plan = decision.status.plan
        seen.plan, seen.plan_generation = (plan if plan is not None and plan.fits else None), meta.get("generation")
        _log(logger, decision.logs)
        seen.avoid, seen.deploy_generation = decision.avoid, decision.seen_generation
        if decision.replan_soon:
            # Until the pods schedule, re-plan every tick on fresh node facts: what other pods request
            # (seen through a snapshot up to a TTL old) may have changed since this plan was made.
            seen.pods_dirty = True
            state.snapshot.invalidate()
        if decision.scale is not None:
            await _scale(kube, ns, str(meta.get("name")), decision.scale, seen)
        await _apply(kube, ns, decision, seen, snap.deploy is not None)
        seen.verified = True
    except _ApiFailed as failed:
        if failed.exc.status == 403 and "being terminated" in failed.exc.message:
            # Its namespace is being deleted, and the ModelDeployment with it: nothing to report or retry.
            logger.debug(f"namespace {ns} is terminating: {failed}")
            return {}, "terminating", None
        transient = failed.exc.transient
        reason = "ApiUnavailable" if transient else "ApplyFailed" if failed.write else "ApiError"
        message = f"{failed}" + ("; retrying" if transient else "")
        logger.warning(f"{reason}: {message}")
        patch = _status_patch(old, api_failure(meta, read, decision, reason, message).dump())
        if transient:
            raise ApiRetry(f"{reason}: {message}", patch) from None
        return patch, "api_error", None
    for reason, message in decision.events:
        if reason == "PlanChanged":
            metrics.PLAN_CHANGES.inc()  # lost in the move to decide.py: modelfit_plan_changes_total stayed 0
        await _post_event(kube, body, reason, message)
    plan = decision.status.plan
    if plan is not None:
        metrics.PLANNED_MEMORY.labels(namespace=ns, name=str(meta.get("name"))).set(plan.memory_request_bytes)
    return _status_patch(old, decision.status.dump()), decision.result, decision.requeue_after


def _scaled(spec: ModelDeploymentSpec, meta: dict[str, Any], seen: _Seen) -> ModelDeploymentSpec:
    """The spec with the replicas this operator last wrote (scale to zero), while the body is older than that
    write: a lagging body must not bring back the pods just scaled away, nor drop the one just woken."""
    if seen.scaled is None:
        return spec
    generation, replicas = seen.scaled
    if int(meta.get("generation") or 0) >= generation:
        seen.scaled = None
        return spec
    return spec.model_copy(update={"replicas": replicas})


async def _scale(kube: Kube, ns: str, name: str, replicas: int, seen: _Seen) -> None:
    """Write spec.replicas (what the HPA writes through /scale; the main resource answers with the generation)."""
    try:
        out = await kube.merge_patch(path_for(api.API_VERSION, api.KIND, ns, name), {"spec": {"replicas": replicas}})
    except KubeError as exc:
        raise _ApiFailed(exc, f"scaling {name} to {replicas}", write=True) from exc
    generation = (out.get("metadata") or {}).get("generation")
    seen.scaled = (int(generation), replicas) if isinstance(generation, int) else None
    if replicas > 0:
        seen.last_busy = time.time()  # woken: the idle period starts over


def _read_status(
    raw: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
) -> api.ModelDeploymentStatus:
    """The status as ``decide`` reads it; one that does not parse (a hand edit, say) is read as empty, and the
    status written over it."""
    try:
        return api.ModelDeploymentStatus.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        logger.warning(f"the status does not parse; read as empty: {errors}")
        return api.ModelDeploymentStatus()


def _reserve(state: OperatorState, snap: Snapshot, decision: Decision) -> None:
    """The pods of the Deployment this decision applies (or keeps), as taken on their nodes from now on."""
    deploy = next((o for o in decision.apply if o.get("kind") == "Deployment"), None) or snap.deploy
    key = (str(snap.meta.get("namespace")), str(snap.meta.get("name")))
    state.reserve(key, Reservation.of(deploy) if deploy is not None else None)


def _log(logger: logging.Logger | logging.LoggerAdapter[logging.Logger], lines: list[tuple[int, str]]) -> None:
    for level, line in lines:
        logger.log(level, line)


def _finish(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger], old: dict[str, Any], decision: Decision
) -> tuple[dict[str, Any], str, float | None]:
    """A decision with nothing to apply (the spec or the model cannot be planned)."""
    _log(logger, decision.logs)
    return _status_patch(old, decision.status.dump()), decision.result, decision.requeue_after


async def _post_event(kube: Kube, body: dict[str, Any], reason: str, message: str) -> None:
    """A core/v1 Event on the ModelDeployment, posted with our own client: kopf.event() only works
    inside kopf's handler context, and plan changes also happen in the resync loop."""
    meta = body.get("metadata") or {}
    ns, now = str(meta.get("namespace")), datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": meta.get("name"),
            "namespace": ns,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": "Normal",
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "modelfit"},
        "reportingComponent": "modelfit",
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await kube.create(path_for("v1", "Event", ns), event)
    except Exception as exc:  # noqa: BLE001 - an event is best effort (namespace terminating, emulator)
        logging.getLogger("modelfit.events").debug(f"event {reason} not posted: {exc}")


async def resync_loop(
    state: OperatorState = STATE, tick: float = RESYNC_TICK, concurrency: int = RESYNC_CONCURRENCY
) -> None:
    """Re-plan ModelDeployments whose nodes or pods changed (the body of the task kopf's startup starts).

    Wakes every ``tick`` seconds, or ``RESYNC_DEBOUNCE`` after a pod or Deployment event; reconciles up to
    ``concurrency`` objects at once, and never the same object twice at once.
    """
    log = logging.getLogger("modelfit.resync")
    state.wake = asyncio.Event()
    limit = asyncio.Semaphore(concurrency)
    running: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def one(key: tuple[str, str], body: dict[str, Any]) -> None:
        async with limit:
            logger = _ObjectLog(log, {"object": f"{key[0]}/{key[1]}"})
            try:
                with contextlib.suppress(ApiRetry):  # its condition is written; retried when state.due says so
                    await reconcile(state.bodies.get(key, body), logger, state=state)
            except Exception as exc:  # noqa: BLE001 - one object's failure must not stop the loop
                logger.warning(f"resync failed: {exc}")

    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wake.wait(), tick)
            await asyncio.sleep(RESYNC_DEBOUNCE)
        state.wake.clear()
        try:
            await check_api_keys(state, get_client())
        except Exception as exc:  # noqa: BLE001 - a failed check is retried next tick; the loop goes on
            log.warning(f"checking API-key Secrets failed: {exc}")
        for key, body in list(state.bodies.items()):
            seen = state.seen.get(key)
            if seen is None or not seen.at:
                continue  # not reconciled yet: kopf's create/resume handler does it first
            if key in running or (body.get("metadata") or {}).get("deletionTimestamp") or not state.due(key):
                continue
            task = asyncio.create_task(one(key, body))
            running[key] = task
            task.add_done_callback(functools.partial(_forget_task, running, key))


async def check_api_keys(state: OperatorState, kube: Kube, recheck: float = KEY_RECHECK) -> int:
    """Read the API-key Secrets ModelDeployments reference, by name, the least recently read first; a changed
    resourceVersion marks the ModelDeployments that use it for a reconcile, which rolls their pods with the new
    key. Kubernetes gives no watch on named Secrets short of list/watch on all of a namespace's, which this
    operator is not granted. Returns how many changed."""
    users: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, body in state.bodies.items():
        ref = ((body.get("spec") or {}).get("apiKeySecretRef") or {}).get("name")
        if isinstance(ref, str) and ref and not (body.get("metadata") or {}).get("deletionTimestamp"):
            users.setdefault((key[0], ref), []).append(key)
    for gone in set(state.key_versions) - set(users):
        del state.key_versions[gone]
    now = time.monotonic()
    stale = sorted(
        (k for k in users if now - state.key_versions.get(k, (None, 0.0))[1] >= recheck),
        key=lambda k: state.key_versions.get(k, (None, 0.0))[1],
    )[:KEY_READS_PER_TICK]
    changed = 0
    for ns, name in stale:
        known = state.key_versions.get((ns, name))
        try:
            secret = await kube.get(path_for("v1", "Secret", ns, name))
        except KubeError:
            state.key_versions[(ns, name)] = (known[0] if known else None, now)  # no RBAC here: the pods tell
            continue
        version = str(((secret or {}).get("metadata") or {}).get("resourceVersion") or "") or None
        state.key_versions[(ns, name)] = (version, now)
        if known is not None and known[0] != version:
            changed += 1
            for key in users[(ns, name)]:
                state.mark_dirty(key)
    return changed


def _forget_task(running: dict[tuple[str, str], asyncio.Task[None]], key: tuple[str, str], _: object) -> None:
    running.pop(key, None)


class _ObjectLog(logging.LoggerAdapter[logging.Logger]):
    """Resync log lines name their object like kopf's: ``[namespace/name] message``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{(self.extra or {}).get('object')}] {msg}", kwargs
