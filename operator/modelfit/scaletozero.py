"""Scale to zero (``autoscaling.minReplicas: 0``): when an idle model goes to zero pods and when a held request
wakes it. Pure: no I/O.

A model at zero keeps its plan, its Service and its endpoint picker; the picker's flow control holds its requests
while no pod is Ready (GIE v1.5.0: a pool without endpoints is saturated, so nothing is dispatched; a request waits
the queue TTL, at most ``max_queued`` of them, then 503 or 429: ``routing.profile``), and dispatches one within
about 100 ms of a pod turning Ready (a pod watch, one scrape). The shell reads the picker's own ``/metrics`` every
``POLL_S`` (``zerowatch``), keeps when the model was last busy (``last_busy``), and writes ``/scale`` with
what ``verdict`` says:

- wake: at zero with a request held -> 1 pod, once for a whole burst (the HPA adds more on load);
- sleep: every pod Ready and none missing, nothing held or running, no request for ``idleSeconds`` since the later
  of the last activity and the newest pod's Ready -> 0 pods. A pod still pending, downloading or loading is never
  scaled down (KServe's failure mode: a pod scaled away before it was ever Ready);
- otherwise nothing, and ``look_again`` says when the idle period would end.

A wake reads the model from the node when it can: such a model that names no cache gets a hostPath cache under the
admin's first allowed root (``with_node_cache``; its own directory there, ``cache.host_cache_dir``), instead of an
emptyDir that every wake fills again from the network.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from .api import HostPathCache, ModelCache, ModelDeploymentSpec, ScaleToZeroStatus
from .settings import Settings

POLL_S = 1.0  # how often the shell reads the picker of a model that may go to zero
WAKE_POLL_S = 0.25  # how often it reads the picker of a model at zero: a held request waits for that read

# GIE v1.5.0 EPP metrics (pkg/epp/metrics/metrics.go): requests sent to a pod (counted once scheduled), refused
# (TTL, capacity, no endpoint), on a pod now, and waiting in flow control.
SERVED = "inference_objective_request_total"
FAILED = "inference_objective_request_error_total"
RUNNING = "inference_objective_running_requests"
HELD = "inference_extension_flow_control_queue_size"


def with_node_cache(spec: ModelDeploymentSpec, settings: Settings) -> ModelDeploymentSpec:
    """The spec a model that may go to zero runs with: without a modelCache of its own, a hostPath cache under the
    admin's first allowed root (``--host-path-root``), so a wake reads the file on the node. The spec as it is when
    no root is allowed, a cache is named (``emptyDir: {}`` keeps a download per pod) or the model is on a PVC."""
    if not applies(spec) or spec.model_cache is not None or spec.model.pvc is not None or not settings.host_path_roots:
        return spec
    cache = ModelCache(host_path=HostPathCache(path=settings.host_path_roots[0]))
    return spec.model_copy(update={"model_cache": cache})


@dataclass(frozen=True)
class Activity:
    """The picker's counts at one read, summed over its labels (one pool per picker)."""

    served: float = 0.0
    failed: float = 0.0
    running: float = 0.0
    held: float = 0.0


def busy(before: Activity | None, now: Activity) -> bool:
    """Did anything happen since the last read: a request served or refused, one running or held? The first read
    (the operator just started, the picker restarted and its counters went back) counts as busy."""
    if before is None or now.served < before.served or now.failed < before.failed:
        return True
    return now.running > 0 or now.held > 0 or now.served > before.served or now.failed > before.failed


def applies(spec: ModelDeploymentSpec) -> bool:
    """The model may go to zero (the CRD and ``ModelDeploymentSpec`` allow minReplicas 0 only behind a picker)."""
    a = spec.autoscaling
    return a is not None and a.min_replicas == 0 and spec.routing is not None and spec.routing.mode == "InferencePool"


@dataclass(frozen=True)
class Verdict:
    replicas: int | None = None  # write /scale to this; None: leave it
    message: str = ""
    look_again: float | None = None  # seconds until the idle period ends (None: on the next activity)


def _time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _ready_since(pod: dict[str, Any]) -> float | None:
    """When the pod turned Ready (wall seconds; 0 when it does not say), None when it is not Ready."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            return _time(c.get("lastTransitionTime")) or 0.0
    return None


def verdict(
    spec: ModelDeploymentSpec, pods: list[dict[str, Any]], activity: Activity | None, last_busy: float, now: float
) -> Verdict:
    """What to do about a model that may go to zero (``applies``); ``last_busy`` and ``now`` are wall seconds."""
    a = spec.autoscaling
    if a is None or not applies(spec):
        return Verdict()
    if activity is None:
        return Verdict(message="the picker's metrics could not be read: the model stays as it is")
    if spec.replicas == 0:
        if activity.held > 0:
            return Verdict(1, f"{activity.held:g} request(s) held at the picker: one pod started")
        return Verdict()
    if activity.held > 0 or activity.running > 0:
        return Verdict(look_again=float(a.idle_seconds))
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    ready = [_ready_since(p) for p in live]
    if len(live) < spec.replicas or any(t is None for t in ready):
        return Verdict(message="a pod is still starting: not scaled down")
    since = max([last_busy, *(t for t in ready if t is not None)])
    idle = now - since
    if idle >= a.idle_seconds:
        return Verdict(0, f"no request for {idle:.0f} s (idleSeconds {a.idle_seconds}): scaled to zero")
    return Verdict(look_again=a.idle_seconds - idle)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(int(t), datetime.UTC).isoformat().replace("+00:00", "Z")


def status(
    spec: ModelDeploymentSpec, old: ScaleToZeroStatus | None, decided: Verdict, replicas: int, now: float
) -> ScaleToZeroStatus | None:
    """status.scaleToZero after this verdict; ``replicas`` is the count the Deployment gets. A change by hand
    (``kubectl scale``) is the new state too."""
    if not applies(spec):
        return None
    state = "Zero" if replicas == 0 else "Active"
    wakes = old.wakes if old is not None else 0
    if decided.replicas is not None:
        woken = decided.replicas > 0
        return ScaleToZeroStatus(
            state=state, since=_iso(now), message=decided.message, wakes=wakes + (1 if woken else 0)
        )
    if old is None or old.state != state:
        why = "at zero: a request wakes it" if state == "Zero" else "serving"
        return ScaleToZeroStatus(state=state, since=_iso(now), message=f"spec.replicas {replicas}: {why}", wakes=wakes)
    return old


def should_look(spec: ModelDeploymentSpec, ready: int, activity: Activity, last_busy: float, now: float) -> bool:
    """For the shell's poll: is a reconcile worth it now? At zero with a request held, or every pod Ready and the
    idle period over (``verdict`` decides, with the pods)."""
    a = spec.autoscaling
    if a is None or not applies(spec):
        return False
    if spec.replicas == 0:
        return activity.held > 0
    return ready >= spec.replicas and activity.held == 0 and activity.running == 0 and now - last_busy >= a.idle_seconds


__all__ = [
    "POLL_S",
    "Activity",
    "Verdict",
    "applies",
    "busy",
    "should_look",
    "status",
    "verdict",
]
