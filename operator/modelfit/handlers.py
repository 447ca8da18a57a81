"""kopf handlers: a thin shell over placement, render and status.

- ModelDeployment created/updated/resumed -> reconcile (plan, apply children, status).
- Node added/changed/removed -> a node generation counter moves; the resync loop re-plans
  every ModelDeployment on its next tick, and only a changed plan is applied (rolls out).
- Pod or Deployment of ours changed -> the resync loop refreshes that ModelDeployment's status, reacts to
  FailedScheduling (adapt: plan elsewhere/smaller), OOMKilled (more headroom), download failures.
- With node shapes (``--node-shapes``) a spec that fits no present node is planned for the smallest shape
  that fits and pinned to its labels (WaitingForNode): its pending pods ask a cluster autoscaler for nodes.
Nothing raised by a bad spec or an unreadable model escapes: it becomes a condition. So does an API error
while applying the children: a 4xx (an invalid child, a forbidden kind) is reported and not retried until
something changes; unreachable, 5xx, 409 and 429 are reported and retried with backoff, a bounded number
of times by kopf and every few minutes by the resync loop after that.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import http.client
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import kopf
from pydantic import ValidationError

from . import api, catalog, metrics
from .api import ModelDeploymentSpec
from .facts import ModelFacts, facts_from_header
from .gguf_reader import GGUFError, GGUFHeader, read_gguf
from .kube import ClusterSnapshot, Kube, KubeError, get_client, node_facts, path_for
from .nodes import NodeShape, parse_quantity
from .placement import WAITING_FOR_NODE, Placement, class_selector, place_with_shapes
from .render import (
    APPLIED_ANNOTATION,
    HASH_ANNOTATION,
    MD_LABEL,
    POD_MONITOR_API_VERSION,
    memory_override_bytes,
    memory_override_verdict,
    model_file,
    render,
    selector_string,
)
from .status import (
    Cond,
    api_failure_conditions,
    apply_conditions,
    get_condition,
    plan_status,
    planning_failure_conditions,
    pod_signals,
    workload_conditions,
)

RESYNC_TICK = 5.0  # seconds between resync checks
FULL_RESYNC = 300.0  # re-plan at least this often
OOM_HEADROOM_STEP = 0.25
AVOID_SECONDS = 300.0
HANDLER_RETRIES = 8  # kopf's attempts at a transient API failure; the resync loop keeps trying after that
MAX_RETRY_DELAY = 300.0


def retry_delay(attempt: int) -> float:
    """Backoff before retrying a transient API failure: 10 s doubling, at most 5 minutes."""
    return float(min(MAX_RETRY_DELAY, 10.0 * 2 ** max(0, attempt)))


class ApiRetry(Exception):
    """A transient API failure (unreachable, 5xx, 409, 429): write ``patch`` (the condition), then retry later."""

    def __init__(self, message: str, patch: dict[str, Any]) -> None:
        super().__init__(message)
        self.patch = patch


@dataclass
class _Seen:
    node_generation: int = -1
    at: float = 0.0
    pods_dirty: bool = False
    avoid: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    failures: int = 0  # transient API failures in a row
    retry_at: float = 0.0  # when the resync loop retries after one (monotonic; 0: no retry pending)
    deploy_generation: int | None = None  # metadata.generation of the Deployment as we last applied or saw it


class OperatorState:
    """In-memory indexes; everything here can be rebuilt from the cluster after a restart."""

    def __init__(self) -> None:
        self.node_generation = 0
        self.node_signatures: dict[str, Any] = {}
        self.snapshot = ClusterSnapshot()
        self.facts: dict[tuple[str, str | None], tuple[ModelFacts, int]] = {}
        self.seen: dict[tuple[str, str], _Seen] = {}
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self.pod_monitors: tuple[bool, float] = (False, 0.0)  # (served, checked at)
        self.headers: HeaderReads | None = None  # catalog header reads; None: the process-wide HEADERS
        self.node_shapes: list[NodeShape] = []  # nodes a cluster autoscaler can add (--node-shapes)

    def forget(self, key: tuple[str, str]) -> None:
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


# ---- model facts -------------------------------------------------------------------------------

HEADER_TIMEOUT = 5.0  # seconds per HTTP request of a catalog file's header read
HEADER_WAIT = 8.0  # the longest a reconcile waits for one (a DNS lookup is not bounded by the socket timeout)
HEADER_RETRY = 600.0  # a failed read is tried again after this long (at once when the token changes)
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP header value and curl's config accept


class LoadedFacts(NamedTuple):
    facts: ModelFacts
    size: int  # bytes of the file (the catalog's estimate when planned from catalog facts)
    source: str  # status.plan.factsSource: "header: URL" or "catalog (why not the header)"
    mismatch: str = ""  # how the header differs from the catalog's facts, when it does


@dataclass
class _Outcome:
    at: float
    header: GGUFHeader | None
    error: str


Reader = Callable[[str, dict[str, str] | None, float], GGUFHeader]


def _read_header(url: str, headers: dict[str, str] | None, timeout: float) -> GGUFHeader:
    return read_gguf(url, headers, timeout)


class HeaderReads:
    """Header reads of catalog files, shared by every reconcile of the process.

    One read per (URL, token) runs at a time, in a thread; a reconcile waits for it at most ``wait`` seconds
    (a slower read finishes in the background and is used from then on). A header read is kept; a failure
    is remembered for ``retry`` seconds, so an unreachable hub costs one wait, not one per reconcile.
    """

    def __init__(
        self,
        timeout: float = HEADER_TIMEOUT,
        wait: float = HEADER_WAIT,
        retry: float = HEADER_RETRY,
        reader: Reader = _read_header,
    ) -> None:
        self.timeout, self.wait, self.retry, self.reader = timeout, wait, retry, reader
        self.outcomes: dict[tuple[str, str], _Outcome] = {}
        self.running: dict[tuple[str, str], concurrent.futures.Future[GGUFHeader]] = {}
        self.reads = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="modelfit-header")

    async def read(self, url: str, token: str | None = None) -> tuple[GGUFHeader | None, str]:
        """The header of ``url`` or None and why not."""
        key = (url, hashlib.sha256(token.encode()).hexdigest() if token else "")
        known = self.outcomes.get(key)
        if known is not None and (known.header is not None or time.monotonic() - known.at < self.retry):
            return known.header, known.error
        fut = self.running.get(key)
        if fut is None:
            headers = {"Authorization": f"Bearer {token}"} if token else None
            self.reads += 1
            fut = self._pool.submit(self.reader, url, headers, self.timeout)
            self.running[key] = fut
            fut.add_done_callback(functools.partial(self._finished, key))
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(ready.set)

        fut.add_done_callback(wake)  # after _finished: the outcome is recorded before the wake-up
        try:
            await asyncio.wait_for(ready.wait(), self.wait)
        except TimeoutError:
            error = f"{url}: no answer within {self.wait:g} s"
            self.outcomes[key] = _Outcome(time.monotonic(), None, error)
            return None, error
        done = self.outcomes.get(key)
        return (done.header, done.error) if done is not None else (None, f"{url}: read cancelled")

    def _finished(self, key: tuple[str, str], fut: concurrent.futures.Future[GGUFHeader]) -> None:
        self.running.pop(key, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.outcomes[key] = _Outcome(time.monotonic(), fut.result(), "")
        else:
            error = str(exc) if isinstance(exc, GGUFError) else f"{type(exc).__name__}: {exc}"
            self.outcomes[key] = _Outcome(time.monotonic(), None, error[:500])


HEADERS = HeaderReads()


def _secret_problem(
    secret: dict[str, Any] | None, ref: api.SecretKeyRef | api.TokenSecretRef, where: str, ns: str, what: str
) -> Cond | None:
    """A missing Secret or key as a Degraded condition: ``what`` cannot happen until it exists."""
    if secret is None:
        return ("True", "SecretNotFound", f"Secret {ref.name} ({where}) does not exist in namespace {ns}; {what}")
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return ("True", "SecretKeyNotFound", f"Secret {ref.name} ({where}) has no key {ref.key}; {what}")
    return None


async def model_token(kube: Kube | None, ns: str | None, spec: ModelDeploymentSpec) -> tuple[str | None, str]:
    """The token of spec.model.tokenSecretRef, or None and why not ("" when none is asked for)."""
    ref = spec.model.token_secret_ref
    if ref is None:
        return None, ""
    where = "spec.model.tokenSecretRef"
    if kube is None or ns is None:
        return None, f"no cluster to read Secret {ref.name} ({where}) from"
    try:
        secret = await kube.get(path_for("v1", "Secret", ns, ref.name))
    except KubeError as exc:
        return None, f"cannot read Secret {ref.name} ({where}): {exc}"
    problem = _secret_problem(secret, ref, where, ns, "the model is read without a token")
    if problem is not None or secret is None:
        return None, problem[2] if problem else ""
    data = secret.get("data") or {}
    try:
        if ref.key in data:
            token = base64.b64decode(str(data[ref.key]), validate=True).decode("utf-8")
        else:
            token = str((secret.get("stringData") or {})[ref.key])
    except ValueError:  # binascii.Error and UnicodeDecodeError
        return None, f"Secret {ref.name} ({where}) key {ref.key} is not base64 of UTF-8 text"
    token = token.strip()
    if not _TOKEN_RE.fullmatch(token):
        return None, f"Secret {ref.name} ({where}) key {ref.key} is empty or has spaces or control characters inside"
    return token, ""


async def load_facts(
    spec: ModelDeploymentSpec, state: OperatorState = STATE, kube: Kube | None = None, namespace: str | None = None
) -> LoadedFacts:
    """Model facts, file size and where they came from.

    A catalog model is planned from its file's header when the catalog URL answers (within HEADER_WAIT;
    a failure is remembered for HEADER_RETRY), else from the catalog's facts; a header that differs from
    the catalog on the key numbers is a warning. A url or huggingFace file is read once per (url, sha256);
    a file on a PVC is known by its catalog file name only (the operator does not mount PVCs).
    With spec.model.tokenSecretRef every read sends ``Authorization: Bearer`` with the Secret's token.
    """
    m = spec.model
    token, token_note = await model_token(kube, namespace, spec)
    if m.catalog is not None:
        built_in = catalog.catalog_facts(m.catalog, m.quant or "Q4_K_M")
        url = catalog.catalog_url(m.catalog, m.quant or "Q4_K_M")
        header, error = await (state.headers or HEADERS).read(url, token)
        facts: ModelFacts | None = None
        if header is not None:
            try:
                facts = facts_from_header(header, name=built_in.name)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                error = f"{url}: header not usable ({type(exc).__name__}: {exc})"
        if facts is None:
            why = error + (f"; {token_note}" if token_note else "")
            return LoadedFacts(built_in, built_in.file_bytes, f"catalog (header unreachable: {why})")
        differ = catalog.facts_mismatch(facts, built_in)
        mismatch = ""
        if differ:
            mismatch = f"the header of {url} differs from the catalog: {', '.join(differ)}; planned from the header"
            facts = facts.model_copy(update={"warnings": [*facts.warnings, mismatch]})
        return LoadedFacts(facts, facts.file_bytes, f"header: {url}", mismatch)
    mf = model_file(spec)
    if mf.url is None:
        known = catalog.for_file_name(mf.file_name)
        if known is None:
            raise GGUFError(
                f"cannot read {mf.file_name} on PVC {mf.pvc_claim} from the operator; "
                "name the file like a catalog model or serve it from a URL"
            )
        built_in = catalog.catalog_facts(*known)
        source = f"catalog (recognised by the file name {mf.file_name}; the operator does not read PVC {mf.pvc_claim})"
        return LoadedFacts(built_in, built_in.file_bytes, source)
    key = (mf.url, m.sha256)
    if key not in state.facts:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            header = await asyncio.to_thread(read_gguf, mf.url, headers)
        except GGUFError as exc:
            note = token_note
            if not note and token is None and re.search(r": HTTP 40[13]\b", str(exc)):
                note = "a gated or private file needs spec.model.tokenSecretRef (a Secret with a Hugging Face token)"
            if note:
                raise GGUFError(f"{exc}; {note}") from exc
            raise
        facts = facts_from_header(header)
        state.facts[key] = (facts, facts.file_bytes)
    facts, size = state.facts[key]
    return LoadedFacts(facts, size, f"header: {mf.url}")


# ---- reconcile ---------------------------------------------------------------------------------

POD_MONITOR_RECHECK = 60.0


async def pod_monitors_served(kube: Kube, state: OperatorState) -> bool:
    """Does the cluster serve PodMonitors (Prometheus Operator)? Re-checked every minute."""
    served, at = state.pod_monitors
    if at and time.monotonic() - at < POD_MONITOR_RECHECK:
        return served
    try:
        group = await kube.get(f"/apis/{POD_MONITOR_API_VERSION}")
        served = any(r.get("name") == "podmonitors" for r in (group or {}).get("resources") or [])
    except KubeError:
        served = False
    state.pod_monitors = (served, time.monotonic())
    return served


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


async def _place(
    spec: ModelDeploymentSpec,
    facts: ModelFacts,
    size: int,
    nodes: list[Any],
    boost: float,
    seen: _Seen,
    shapes: list[NodeShape] | None = None,
) -> Placement:
    """The placement on present nodes; when none fits, on the smallest configured node shape that does."""
    now = time.monotonic()
    seen.avoid = {k: t for k, t in seen.avoid.items() if t > now}
    usable = [n for n in nodes if tuple(sorted(class_selector(n).items())) not in seen.avoid] or nodes
    return place_with_shapes(spec, facts, usable, shapes or [], model_file(spec, size).path, boost)


async def reconcile(
    body: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    kube: Kube | None = None,
    state: OperatorState = STATE,
) -> dict[str, Any]:
    """Plan, apply children and compute the status of one ModelDeployment; returns the status patch."""
    kube = kube or get_client()
    started = time.monotonic()
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    key = (ns, name)
    async with state.lock(key):
        seen = state.seen.setdefault(key, _Seen())
        seen.node_generation, seen.at, seen.pods_dirty = state.node_generation, time.monotonic(), False
        result = "error"
        try:
            patch, result = await _reconcile(body, logger, kube, state, seen)
        except ApiRetry:
            result = "api_retry"
            seen.failures += 1
            seen.retry_at = time.monotonic() + retry_delay(seen.failures - 1)
            raise
        finally:
            metrics.RECONCILES.labels(result=result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if result == "model_unreadable":
            # A model server that is not up yet (or a hub that answers 5xx) must not wait for the 5-minute
            # full resync: try again with the same backoff as a transient API failure.
            seen.failures += 1
            seen.retry_at = time.monotonic() + retry_delay(seen.failures - 1)
        else:
            seen.failures, seen.retry_at = 0, 0.0
        return patch


async def _missing_reference(kube: Kube, ns: str, spec: ModelDeploymentSpec) -> Cond | None:
    """A Secret, Secret key or PVC the pods need and that does not exist, as a Degraded condition.

    The pods are created anyway (they start once it exists); an answer other than found/not found (no RBAC
    on Secrets, say) means the check cannot be made, and the kubelet's CreateContainerConfigError tells.
    """
    try:
        refs = [
            (spec.api_key_secret_ref, "spec.apiKeySecretRef"),
            (spec.model.token_secret_ref, "spec.model.tokenSecretRef"),
        ]
        for ref, where in refs:
            if ref is None:
                continue
            secret = await kube.get(path_for("v1", "Secret", ns, ref.name))
            problem = _secret_problem(secret, ref, where, ns, "the pods cannot start until it does")
            if problem is not None:
                return problem
        pvc = spec.model.pvc
        if pvc is not None and await kube.get(path_for("v1", "PersistentVolumeClaim", ns, pvc.claim_name)) is None:
            return (
                "True",
                "PvcNotFound",
                f"PersistentVolumeClaim {pvc.claim_name} (spec.model.pvc) does not exist in namespace {ns}; "
                "the pods cannot be scheduled until it does",
            )
    except KubeError:
        return None
    return None


async def _reconcile(
    body: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    kube: Kube,
    state: OperatorState,
    seen: _Seen,
) -> tuple[dict[str, Any], str]:
    meta = body.get("metadata") or {}
    ns, name, gen = str(meta.get("namespace")), str(meta.get("name")), meta.get("generation")
    old: dict[str, Any] = dict(body.get("status") or {})
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])
    new: dict[str, Any] = {"observedGeneration": gen, "selector": selector_string(name)}

    def fail(reason: str, message: str, result: str) -> tuple[dict[str, Any], str]:
        logger.warning(f"{reason}: {message}")
        new["conditions"] = apply_conditions(conds, planning_failure_conditions(reason, message), gen)
        return _status_patch(old, new), result

    def api_failed(exc: KubeError, what: str, write: bool, planned: Cond | None = None) -> tuple[dict[str, Any], str]:
        """An API error as conditions; a transient one raises ApiRetry (kopf and the resync loop back off)."""
        reason = "ApiUnavailable" if exc.transient else "ApplyFailed" if write else "ApiError"
        message = f"{what}: {exc}" + ("; retrying" if exc.transient else "")
        logger.warning(f"{reason}: {message}")
        values = api_failure_conditions(reason, message)
        if planned is not None:
            values["Planned"] = planned
        new["conditions"] = apply_conditions(conds, values, gen)
        patch = _status_patch(old, new)
        if exc.transient:
            raise ApiRetry(f"{reason}: {message}", patch)
        return patch, "api_error"

    bad_name = api.name_problem(name)
    if bad_name is not None:
        return fail("InvalidSpec", f"{bad_name}; delete it and create it under a valid name", "invalid")
    try:
        spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return fail("InvalidSpec", f"spec is invalid: {errors}", "invalid")
    owned = spec.owned_flags_in_server_args()
    if owned:
        return fail(
            "InvalidSpec",
            f"serverArgs contains flags the plan owns: {', '.join(owned)}; set the matching spec field instead",
            "invalid",
        )
    try:
        loaded = await load_facts(spec, state, kube, ns)
    except (GGUFError, KeyError, ValueError, OSError, http.client.HTTPException) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc) or type(exc).__name__
        if isinstance(exc, http.client.HTTPException):
            msg = f"{model_file(spec).url}: not an HTTP answer ({type(exc).__name__}: {msg})"
        return fail("ModelUnreadable", f"cannot read the model: {msg}", "model_unreadable")
    facts, size = loaded.facts, loaded.size

    try:
        await state.snapshot.refresh(kube)
    except KubeError as exc:
        return api_failed(exc, "listing nodes and pods", write=False)
    mine = {MD_LABEL: name}

    def is_mine(pod: dict[str, Any]) -> bool:
        pm = pod.get("metadata") or {}
        return bool(pm.get("namespace") == ns and all((pm.get("labels") or {}).get(k) == v for k, v in mine.items()))

    nodes = node_facts(state.snapshot.nodes, state.snapshot.pods, exclude=is_mine)
    old_plan = old.get("plan") or {}
    boost = float(old_plan.get("headroomBoost") or 0.0)
    oom_kills = int(old.get("oomKills") or 0)
    override = memory_override_bytes(spec)
    rejected = old.get("memoryOverrideRejected")
    override_failed = override is not None and rejected == override
    placement = await _place(spec, facts, size, nodes, boost, seen, state.node_shapes)
    mf = model_file(spec, size)
    try:
        pods = await kube.list(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector_string(name))
    except KubeError as exc:
        return api_failed(exc, f"listing the pods of {name}", write=False)

    unschedulable = False
    if placement.fits:
        honour = memory_override_verdict(placement, spec, override_failed) is None
        rendered = render(meta, spec, placement, mf, honour_memory_override=honour)
        template_hash = _template_hash(rendered.by_kind("Deployment"))
        sig = pod_signals(pods, template_hash)
        unschedulable = bool(sig.unschedulable)
        if sig.unschedulable:
            # Until the pods schedule, re-plan every tick on fresh node facts: what other pods request
            # (seen through a snapshot up to a TTL old) may have changed since this plan was made.
            seen.pods_dirty = True
            state.snapshot.invalidate()
        assert placement.result is not None
        tight_override_ran = honour and override is not None and override < _limit_bytes(placement)
        if sig.oom_killed and tight_override_ran:
            # The user's limit was too small, not the plan: drop the override, keep the plan as it is.
            oom_kills += 1
            rejected, override_failed = override, True
            logger.warning(f"OOMKilled in {sig.oom_killed} under the memory override; using the plan's limit")
        elif sig.oom_killed and boost < 1.0:
            boost = min(1.0, boost + OOM_HEADROOM_STEP)
            oom_kills += 1
            logger.warning(f"OOMKilled in {sig.oom_killed}; memory headroom boost now {boost:.2f}")
            placement = await _place(spec, facts, size, nodes, boost, seen, state.node_shapes)
        elif sig.unschedulable and spec.adapt:
            seen.avoid[tuple(sorted(placement.selector.items()))] = time.monotonic() + AVOID_SECONDS
            other = await _place(spec, facts, size, nodes, boost, seen, state.node_shapes)
            if other.fits and other.selector != placement.selector:
                logger.info(f"pods unschedulable on {placement.selector}; adapting to {other.selector}")
                placement = other
    new["oomKills"] = oom_kills
    if rejected is not None:
        new["memoryOverrideRejected"] = rejected
    metrics.track_node_facts_age(state.snapshot.age)

    if old_plan.get("factsSource") != loaded.source:
        logger.info(f"model facts from {loaded.source}")
        if loaded.mismatch:
            logger.warning(loaded.mismatch)

    if not placement.fits or placement.result is None:
        if placement.result is not None:
            new["plan"] = {**plan_status(placement, facts, size, "", boost), "factsSource": loaded.source}
        return fail(placement.reason, placement.message, "unschedulable")

    verdict = memory_override_verdict(placement, spec, override_failed)
    pod_monitor = await pod_monitors_served(kube, state)
    rendered = render(meta, spec, placement, mf, with_pod_monitor=pod_monitor, honour_memory_override=verdict is None)
    new["plan"] = plan_status(placement, facts, size, rendered.hash, boost)
    planned: Cond = ("True", placement.reason, placement.message)
    if placement.result.warnings:
        planned = ("True", placement.reason, f"{placement.message}; {'; '.join(placement.result.warnings)}")
    if verdict is not None:
        planned = ("True", "MemoryOverrideIgnored", verdict)
    try:
        deploy = await kube.get(path_for("apps/v1", "Deployment", ns, name))
    except KubeError as exc:
        return api_failed(exc, f"reading Deployment {name}", write=False, planned=planned)
    applied = ((deploy or {}).get("metadata") or {}).get("annotations", {}).get(APPLIED_ANNOTATION)
    template_hash = _template_hash(rendered.by_kind("Deployment"))
    same_override = old.get("memoryOverrideRejected") == new.get("memoryOverrideRejected")
    # A plan pinned to a node shape's labels stays while its pods wait for (or run on) nodes of that shape:
    # a pending pod is the request to the cluster autoscaler, not a reason to re-plan.
    pinned = _pinned_shape(old_plan, state.node_shapes) is not None
    if (not unschedulable or pinned) and same_override and _sticky(old, gen, old_plan, new["plan"], applied):
        # Same node class, backend, offload, context and KV: other pods landing on the class only moved
        # the free CPU (threads) a little; rolling every ModelDeployment for that would churn the cluster.
        new["plan"] = old_plan
        rendered.hash = str(old_plan["hash"])
        template_hash = _template_hash(deploy)
    new["plan"] = {**new["plan"], "factsSource": loaded.source}
    metrics.PLANNED_MEMORY.labels(namespace=ns, name=name).set(int(new["plan"].get("memoryRequestBytes") or 0))
    # Drift: a hand edit of the Deployment's spec (image, limits, replicas) bumps its generation without
    # touching our applied hash; forced server-side apply takes the owned fields back. The first generation
    # seen after a restart is the baseline.
    live_generation = ((deploy or {}).get("metadata") or {}).get("generation")
    drifted = bool(
        deploy is not None
        and applied == rendered.hash
        and seen.deploy_generation is not None
        and live_generation != seen.deploy_generation
    )
    seen.deploy_generation = live_generation if deploy is not None else None
    if drifted:
        logger.warning(f"Deployment {name} was edited (generation {live_generation}); restoring the planned spec")
    if applied != rendered.hash or drifted:
        # The Deployment carries the applied hash, so it goes last: a crash half-way leaves a stale
        # hash and the next reconcile applies everything again (no missing Service after a restart).
        for api_version, kind, child in rendered.absent:
            try:
                await kube.delete(path_for(api_version, kind, ns, child))
            except KubeError as exc:
                return api_failed(exc, f"deleting {kind} {child}", write=True, planned=planned)
        for obj in sorted(rendered.objects, key=lambda o: o["kind"] == "Deployment"):
            try:
                out = await kube.apply(obj)
            except KubeError as exc:
                return api_failed(exc, f"{obj['kind']} {obj['metadata']['name']}", write=True, planned=planned)
            if obj["kind"] == "Deployment":
                deploy = out
                seen.deploy_generation = (out.get("metadata") or {}).get("generation")
        if old_plan.get("hash") != rendered.hash:
            metrics.PLAN_CHANGES.inc()
            what = (
                f"{placement.result.plan.backend} on {placement.result.plan.node}, "
                f"{placement.result.plan.gpu_layers}/{placement.result.plan.total_layers} GPU layers, "
                f"context {placement.result.plan.context}, memory {placement.result.resources.requests['memory']}"
            )
            await _post_event(kube, body, "PlanChanged", f"new plan: {what}")
            logger.info(f"plan applied: {what}")
    values = workload_conditions(deploy, pods, spec.replicas, template_hash)
    values["Planned"] = planned
    shape = _pinned_shape(new["plan"], state.node_shapes)
    if shape is not None and values["Unschedulable"][0] == "True":
        values["Unschedulable"] = (
            "True",
            WAITING_FOR_NODE,
            f"pods wait for a node of shape {shape.name} (a cluster autoscaler can add one): "
            f"{values['Unschedulable'][2]}",
        )
    elif placement.reason == WAITING_FOR_NODE:
        values["Unschedulable"] = ("True", WAITING_FOR_NODE, placement.message)
    missing = await _missing_reference(kube, ns, spec)
    if missing is not None:
        values["Degraded"] = missing
        was = get_condition(conds, "Degraded") or {}
        if (was.get("reason"), was.get("message")) != missing[1:]:
            logger.warning(f"{missing[1]}: {missing[2]}")
    new["conditions"] = apply_conditions(conds, values, gen)
    dst = (deploy or {}).get("status") or {}
    new["replicas"] = int(dst.get("replicas") or 0)
    new["readyReplicas"] = int(dst.get("readyReplicas") or 0)
    port = spec.service.port if spec.service else api.ServiceSpec().port
    new["endpoint"] = f"http://{name}.{ns}.svc:{port}"
    return _status_patch(old, new), "ready" if values["Ready"][0] == "True" else "progressing"


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


_SHAPE = ("nodeSelector", "backend", "gpuLayers", "context", "kvCacheType", "parallel", "loadMode", "headroomBoost")


def _sticky(
    old: dict[str, Any], gen: Any, old_plan: dict[str, Any], new_plan: dict[str, Any], applied: str | None
) -> bool:
    """Keep the running plan when the spec is unchanged and a re-plan differs only in minor knobs."""
    return bool(
        old_plan.get("hash")
        and old_plan.get("fits")
        and applied == old_plan.get("hash")
        and old.get("observedGeneration") == gen
        and all(old_plan.get(k) == new_plan.get(k) for k in _SHAPE)
    )


def _pinned_shape(plan: dict[str, Any], shapes: list[NodeShape]) -> NodeShape | None:
    """The configured node shape whose labels are the plan's nodeSelector, if any."""
    selector = plan.get("nodeSelector") or {}
    return next((s for s in shapes if selector and s.labels == selector), None)


def _limit_bytes(placement: Placement) -> int:
    assert placement.result is not None
    return int(parse_quantity(placement.result.resources.limits["memory"]))


def _template_hash(deploy: dict[str, Any] | None) -> str | None:
    if deploy is None:
        return None
    annotations: dict[str, str] = deploy["spec"]["template"]["metadata"]["annotations"]
    return annotations.get(HASH_ANNOTATION)


def _merge_into(patch: kopf.Patch, status_patch: dict[str, Any]) -> None:
    for k, v in status_patch.items():
        patch.status[k] = v


# ---- kopf handlers -----------------------------------------------------------------------------

G, V, P = api.GROUP, api.VERSION, api.PLURAL


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # warnings become Events; plan changes are posted explicitly
    settings.watching.server_timeout = 300
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelfit.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="modelfit.io")
    metrics.track_node_facts_age(STATE.snapshot.age)
    STATE.task = asyncio.create_task(resync_loop())


@kopf.on.cleanup(id="close-client")
async def close_client(**_: Any) -> None:
    if STATE.task is not None:
        STATE.task.cancel()
    await get_client().close()


# Explicit ids: kopf keeps a handler's progress (modelfit.io/<id> while it retries) under its id, so a
# renamed function must not change it. This is the id kopf derived from the function before, kept so
# objects in flight keep their progress across the upgrade.
@kopf.on.create(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
@kopf.on.update(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
@kopf.on.resume(G, V, P, id="modeldeployment_changed", retries=HANDLER_RETRIES)
async def modeldeployment_changed(
    body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, retry: int, **_: Any
) -> None:
    try:
        status_patch = await reconcile(dict(body), logger)
    except ApiRetry as exc:
        _merge_into(patch, exc.patch)  # kopf writes the patch even when the handler fails
        raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from None
    _merge_into(patch, status_patch)


@kopf.on.event(G, V, P, id="modeldeployment-events")
def modeldeployment_event(event: kopf.RawEvent, **_: Any) -> None:
    """Keep the bodies the resync loop works on; a timer would need a finalizer on every object."""
    body: dict[str, Any] = dict(event.get("object") or {})
    meta: dict[str, Any] = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    if event.get("type") == "DELETED":
        STATE.forget(key)
        metrics.forget(*key)
    else:
        STATE.bodies[key] = body


async def resync_loop(state: OperatorState = STATE, tick: float = RESYNC_TICK) -> None:
    """Re-plan ModelDeployments whose nodes or pods changed; write their status directly."""
    log = logging.getLogger("modelfit.resync")
    while True:
        await asyncio.sleep(tick)
        for key, body in list(state.bodies.items()):
            if (body.get("metadata") or {}).get("deletionTimestamp") or not state.due(key):
                continue
            logger = _ObjectLog(log, {"object": f"{key[0]}/{key[1]}"})
            path = path_for(api.API_VERSION, api.KIND, key[0], key[1]) + "/status"
            try:
                try:
                    status_patch = await reconcile(body, logger, state=state)
                except ApiRetry as exc:
                    status_patch = exc.patch
                if status_patch:
                    await get_client().merge_patch(path, {"status": status_patch})
            except Exception as exc:  # noqa: BLE001 - one object's failure must not stop the loop
                logger.warning(f"resync failed: {exc}")


class _ObjectLog(logging.LoggerAdapter[logging.Logger]):
    """Resync log lines name their object like kopf's: ``[namespace/name] message``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{(self.extra or {}).get('object')}] {msg}", kwargs


@kopf.on.event("", "v1", "nodes", id="node-events")
def node_event(event: kopf.RawEvent, logger: kopf.Logger, **_: Any) -> None:
    node = event.get("object") or {}
    if STATE.node_changed(event.get("type"), dict(node)):
        logger.debug(f"node {node.get('metadata', {}).get('name')} changed; re-planning on the next tick")


@kopf.on.event("", "v1", "pods", id="pod-events", labels={"app.kubernetes.io/managed-by": "modelfit"})
def pod_event(body: kopf.Body, **_: Any) -> None:
    owner = body.metadata.labels.get(MD_LABEL)
    if owner:
        STATE.seen.setdefault((str(body.metadata.namespace), owner), _Seen()).pods_dirty = True


@kopf.on.event("apps", "v1", "deployments", id="deployment-events", labels={"app.kubernetes.io/managed-by": "modelfit"})
def deployment_event(body: kopf.Body, **_: Any) -> None:
    """A Deployment's status moved (rollout progress, a ReplicaSet that cannot create pods): look again."""
    owner = body.metadata.labels.get(MD_LABEL)
    if owner:
        STATE.seen.setdefault((str(body.metadata.namespace), owner), _Seen()).pods_dirty = True


@kopf.on.probe(id="nodeFactsAgeSeconds")
def node_facts_age(**_: Any) -> float:
    return round(STATE.snapshot.age(), 1)


__all__ = [
    "HEADERS",
    "STATE",
    "ApiRetry",
    "HeaderReads",
    "KubeError",
    "LoadedFacts",
    "OperatorState",
    "load_facts",
    "reconcile",
]
