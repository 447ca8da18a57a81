"""The shell of scale to zero: read the endpoint picker of every model that may go to zero (``scaletozero``), remember
when it last showed a request, and mark the model for a reconcile when ``should_look`` says a held request waits for
a pod or the idle period is over (``decide`` then asks ``scaletozero.verdict``).

A model at zero is read every ``WAKE_POLL_S`` (only its held count, ``held_of``, between full reads: a held request
waits for that read); the others every ``POLL_S``. The picker's /metrics port admits the operator (the picker's
NetworkPolicy); it is read at the picker pod's own address (Ready, its IP from the kubelet, never from a spec), with
a short timeout and a bounded body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from .api import ModelDeploymentSpec
from .kube import Kube, KubeError, get_client
from .reconciler import OperatorState, reconcile
from .routing import PICKER_METRICS_PORT, picker_labels
from .scaletozero import FAILED, HELD, POLL_S, RUNNING, SERVED, WAKE_POLL_S, Activity, applies, busy, should_look

METRICS_LIMIT = 4 * 2**20  # bytes of a picker's /metrics read at most (one pool's is a few tens of KiB)
READ_TIMEOUT_S = 1.0
ADDRESS_TTL_S = 30.0  # the picker pod's address is looked up again after this, or after a failed read

log = logging.getLogger("modelfit.zerowatch")


def parse_activity(text: str) -> Activity:
    """The picker's counts from its Prometheus text (prometheus-client's parser), summed over labels; an absent
    family counts 0 (the EPP adds a labelled series at its first request). ValueError on malformed text."""
    sums = {SERVED: 0.0, FAILED: 0.0, RUNNING: 0.0, HELD: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums and math.isfinite(sample.value):
                sums[sample.name] += sample.value
    return Activity(served=sums[SERVED], failed=sums[FAILED], running=sums[RUNNING], held=sums[HELD])


def held_of(text: str) -> float:
    """The requests held at the picker, from its Prometheus text without parsing the rest: a model at zero is read
    every ``WAKE_POLL_S``, and only a held request matters then. ValueError on a malformed sample of that family."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(HELD) or line[len(HELD) : len(HELD) + 1] not in ("{", " "):
            continue
        rest = line[line.rindex("}") + 1 :] if "{" in line else line[len(HELD) :]
        value = float(rest.split()[0])
        if math.isfinite(value):
            total += value
    return total


class Unreadable(Exception):
    """A picker's /metrics could not be read or parsed (the message says why)."""


async def read_activity(session: aiohttp.ClientSession, url: str, held_only: Activity | None = None) -> Activity:
    """One read of a picker's /metrics; ``Unreadable`` when it cannot be read or parsed. ``held_only``: the last
    activity, with only its held count read again (``held_of``)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)) as resp:
            if resp.status != 200:
                raise Unreadable(f"HTTP {resp.status}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(64 * 1024):  # to the end: one read returns what came
                size += len(chunk)
                if size > METRICS_LIMIT:
                    raise Unreadable(f"/metrics larger than {METRICS_LIMIT} bytes")
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise Unreadable(f"{type(exc).__name__}: {exc}") from None
    text = b"".join(chunks).decode("utf-8", "replace")
    try:
        if held_only is not None:
            return dataclasses.replace(held_only, held=held_of(text))
        return parse_activity(text)
    except (ValueError, IndexError) as exc:
        raise Unreadable(f"not Prometheus text: {exc}") from None


def _ready_ip(pod: dict[str, Any]) -> str | None:
    st = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
    ip = st.get("podIP")
    return str(ip) if ready and ip and not (pod.get("metadata") or {}).get("deletionTimestamp") else None


async def picker_url(kube: Kube, ns: str, name: str) -> str | None:
    """The /metrics URL of the model's Ready picker pod, if one is."""
    selector = ",".join(f"{k}={v}" for k, v in picker_labels(name).items())
    try:
        pods = await kube.list(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector)
    except KubeError as exc:
        log.debug(f"listing the picker of {ns}/{name}: {exc}")
        return None
    ip = next((ip for ip in map(_ready_ip, pods) if ip), None)
    if ip is None:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{PICKER_METRICS_PORT}/metrics"


Reconcile = Callable[[dict[str, Any], logging.Logger, Kube, OperatorState], Awaitable[dict[str, Any]]]


class ZeroWatch:
    """The loop's memory: each model's picker address (looked up again now and then, and after a failed read).

    A held request at zero is reconciled at once (``act``: the reconciler, under its per-model lock), not through
    the resync loop's debounce: every second there is a second the client waits. Going to zero can wait for it.
    """

    def __init__(self, state: OperatorState, kube: Kube, act: Reconcile | None = None) -> None:
        self.state, self.kube = state, kube
        self.act: Reconcile = act or reconcile
        self.urls: dict[tuple[str, str], tuple[str | None, float]] = {}
        self.readable: dict[tuple[str, str], bool] = {}  # logged when it changes, not every second
        self.looked: dict[tuple[str, str], float] = {}  # the last full read of each model's picker (monotonic)

    def _due(self, key: tuple[str, str]) -> bool:
        """Is a full read of the model's picker due (every ``POLL_S``)?"""
        return time.monotonic() - self.looked.get(key, 0.0) >= POLL_S

    def _at_zero(self, key: tuple[str, str], body: dict[str, Any]) -> bool:
        seen = self.state.seen.get(key)
        if seen is not None and seen.scaled is not None:
            return seen.scaled[1] == 0
        return (body.get("spec") or {}).get("replicas") == 0

    async def _url(self, key: tuple[str, str]) -> str | None:
        url, at = self.urls.get(key, (None, 0.0))
        if url is None or time.monotonic() - at > ADDRESS_TTL_S:
            url = await picker_url(self.kube, *key)
            self.urls[key] = (url, time.monotonic())
        return url

    async def look(self, session: aiohttp.ClientSession, key: tuple[str, str], body: dict[str, Any]) -> bool:
        """Read one model's picker; True when it was marked for a reconcile."""
        try:
            spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return False  # the reconcile reports it
        seen = self.state.seen.get(key)
        if seen is None or not applies(spec):
            return False
        url = await self._url(key)
        activity, why = None, "no Ready picker pod"
        if url is not None:
            try:  # at zero, between full reads, only whether a request is held
                fast = self._at_zero(key, body) and seen.activity is not None and not self._due(key)
                activity = await read_activity(session, url, seen.activity if fast else None)
            except Unreadable as exc:
                why = f"{url}: {exc}"
            if activity is not None and not fast:
                self.looked[key] = time.monotonic()
        if self.readable.get(key) != (activity is not None):
            self.readable[key] = activity is not None
            if activity is None:
                log.warning(f"[{key[0]}/{key[1]}] cannot read its picker's metrics ({why}): it stays as it is")
            else:
                log.info(f"[{key[0]}/{key[1]}] reading its picker's metrics at {url}: {activity}")
        if activity is None:
            self.urls.pop(key, None)
            seen.activity = None
            return False
        now = time.time()
        if busy(seen.activity, activity):
            seen.last_busy = now
        seen.activity = activity
        if seen.scaled is not None:  # our own /scale write: the body may not show it yet
            spec = spec.model_copy(update={"replicas": seen.scaled[1]})
        ready = int((body.get("status") or {}).get("readyReplicas") or 0)
        if not should_look(spec, ready, activity, seen.last_busy, now):
            return False
        if spec.replicas == 0:
            try:
                await self.act(self.state.bodies.get(key, body), log, self.kube, self.state)
            except Exception as exc:  # noqa: BLE001 - (ApiRetry: its condition is written) the resync loop retries
                log.warning(f"waking {key[0]}/{key[1]}: {exc}")
                self.state.mark_dirty(key)
        else:
            self.state.mark_dirty(key)
        return True

    async def tick(self, session: aiohttp.ClientSession) -> None:
        """Read the picker of every model that may go to zero: those at zero every tick (``WAKE_POLL_S``), the
        others every ``POLL_S``."""
        every = [
            (key, body)
            for key, body in list(self.state.bodies.items())
            if ((body.get("spec") or {}).get("autoscaling") or {}).get("minReplicas") == 0
        ]
        for gone in (set(self.urls) | set(self.readable) | set(self.looked)) - {k for k, _ in every}:
            self.urls.pop(gone, None)
            self.readable.pop(gone, None)
            self.looked.pop(gone, None)
        keys = [(k, b) for k, b in every if self._at_zero(k, b) or self._due(k)]
        for (key, _), out in zip(
            keys,
            await asyncio.gather(*(self.look(session, k, b) for k, b in keys), return_exceptions=True),
            strict=True,
        ):
            if isinstance(out, Exception):  # one model's failure is logged; the others were looked at
                log.warning(f"[{key[0]}/{key[1]}] scale-to-zero watch failed: {out}")


async def zero_loop(state: OperatorState, kube: Kube | None = None, tick: float = WAKE_POLL_S) -> None:
    """The task kopf's startup starts beside the resync loop: one tick every ``tick`` seconds."""
    watch = ZeroWatch(state, kube or get_client())
    async with aiohttp.ClientSession() as session:
        while True:
            started = time.monotonic()
            try:
                await watch.tick(session)
            except Exception as exc:  # noqa: BLE001 - one failed tick must not stop the loop
                log.warning(f"scale-to-zero watch failed: {exc}")
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))


__all__ = ["Unreadable", "ZeroWatch", "held_of", "parse_activity", "picker_url", "read_activity", "zero_loop"]
