"""kopf glue: the operator's handlers, each one call into ``reconciler`` (gather, decide, apply, status).

- ModelDeployment created/updated/resumed -> ``reconciler.reconcile`` (plan, apply children, write status).
- ModelDeployment, Node, Pod, Deployment and Service events -> ``reconciler.STATE``'s indexes; the resync
  loop (started at startup) re-plans or refreshes what they marked (a deleted child is restored).
- Scale to zero: ``zerowatch``'s loop (started at startup) reads the pickers and marks what to wake or put to sleep.
- A transient API failure becomes kopf's TemporaryError: kopf retries it ``HANDLER_RETRIES`` times with
  backoff, the resync loop every few minutes after that.
kopf keeps its progress in ``modelfit.io/`` annotations, never in the status: ``reconciler.write_status``
is the status's one writer, and kopf's own patch stays empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from . import api, metrics
from .decide import retry_delay
from .kube import get_client
from .reconciler import STATE, ApiRetry, reconcile, resync_loop
from .render import MD_LABEL
from .zerowatch import zero_loop

HANDLER_RETRIES = 8  # kopf's attempts at a transient API failure; the resync loop keeps trying after that

G, V, P = api.GROUP, api.VERSION, api.PLURAL


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # warnings become Events; plan changes are posted explicitly
    settings.watching.server_timeout = 300
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelfit.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="modelfit.io")
    metrics.track_node_facts_age(STATE.snapshot.age)
    STATE.task = asyncio.create_task(resync_loop(STATE))
    STATE.zero_task = asyncio.create_task(zero_loop(STATE))


@kopf.on.cleanup(id="close-client")
async def close_client(**_: Any) -> None:
    for task in (STATE.task, STATE.zero_task):
        if task is not None:
            task.cancel()
    await get_client().close()


# Explicit ids: kopf keeps a handler's progress (modelfit.io/<id> while it retries) under its id, so a
# renamed function must not change it. This is the id kopf derived from the function before, kept so
# objects in flight keep their progress across the upgrade.
@kopf.on.create(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
@kopf.on.update(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
@kopf.on.resume(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
async def modeldeployment_changed(body: kopf.Body, logger: kopf.Logger, retry: int, **_: Any) -> None:
    """Reconcile; the status is written by the reconciler (its condition too, before a retry)."""
    try:
        await reconcile(dict(body), logger)
    except ApiRetry as exc:
        raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from None


@kopf.on.event(G, V, P, id="modeldeployment-events")
async def modeldeployment_event(event: kopf.RawEvent, **_: Any) -> None:
    """Keep the bodies the resync loop works on; a timer would need a finalizer on every object."""
    body: dict[str, Any] = dict(event.get("object") or {})
    meta: dict[str, Any] = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    if event.get("type") == "DELETED":
        STATE.forget(key)
        metrics.forget(*key)
    else:
        STATE.bodies[key] = body


@kopf.on.event("", "v1", "nodes", id="node-events")
async def node_event(event: kopf.RawEvent, logger: kopf.Logger, **_: Any) -> None:
    node = event.get("object") or {}
    if STATE.node_changed(event.get("type"), dict(node)):
        logger.debug(f"node {node.get('metadata', {}).get('name')} changed; re-planning")
        if STATE.wake is not None:
            STATE.wake.set()


@kopf.on.event("", "v1", "pods", id="pod-events", labels={"app.kubernetes.io/managed-by": "modelfit"})
async def pod_event(body: kopf.Body, **_: Any) -> None:
    owner = body.metadata.labels.get(MD_LABEL)
    if owner:
        STATE.mark_dirty((str(body.metadata.namespace), owner))


@kopf.on.event("apps", "v1", "deployments", id="deployment-events", labels={"app.kubernetes.io/managed-by": "modelfit"})
async def deployment_event(body: kopf.Body, **_: Any) -> None:
    """A Deployment's status moved (rollout progress, a ReplicaSet that cannot create pods): look again."""
    owner = body.metadata.labels.get(MD_LABEL)
    if owner:
        STATE.mark_dirty((str(body.metadata.namespace), owner))


@kopf.on.event("", "v1", "services", id="service-events", labels={"app.kubernetes.io/managed-by": "modelfit"})
async def service_event(event: kopf.RawEvent, **_: Any) -> None:
    """A Service of ours deleted by hand is recreated: the next reconcile checks every child."""
    meta = (event.get("object") or {}).get("metadata") or {}
    owner = (meta.get("labels") or {}).get(MD_LABEL)
    if owner and event.get("type") == "DELETED":
        STATE.child_deleted((str(meta.get("namespace")), owner))


@kopf.on.probe(id="nodeFactsAgeSeconds")
def node_facts_age(**_: Any) -> float:
    return round(STATE.snapshot.age(), 1)
