"""A small async Kubernetes REST client (aiohttp) and the cluster reads the operator needs.

Credentials come from the in-cluster service account or the kubeconfig, via the
kubernetes package's loaders. Server-side apply uses field manager ``modelfit``;
a server that answers 404 to an apply (an emulator) gets a create instead.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import metrics
from .nodes import NodeFacts, node_facts_from_k8s, parse_quantity

FIELD_MANAGER = "modelfit"

_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    "Secret": "secrets",
    "Node": "nodes",
    "Event": "events",
    "PodMonitor": "podmonitors",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "ModelDeployment": "modeldeployments",
}


class KubeError(Exception):
    """An API error: the HTTP status (0 when the server could not be reached) and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying: unreachable, 5xx, conflict or throttled. Any other 4xx fails the same way again."""
        return self.status == 0 or self.status >= 500 or self.status in (409, 429)


def path_for(api_version: str, kind: str, namespace: str | None = None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    return f"{base}{ns}/{_PLURALS[kind]}{tail}"


class Kube:
    """Just enough of the API: get, list, apply, create, delete."""

    def __init__(
        self,
        server: str,
        headers: Callable[[], dict[str, str]] | None = None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self.server = server.rstrip("/")
        self._headers = headers or dict
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    @classmethod
    def from_environment(cls) -> Kube:
        from kubernetes import client, config  # the loaders only; requests go through aiohttp

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        ctx: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            ctx = (
                ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
            )
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)

        def headers() -> dict[str, str]:
            # runs the refresh hook (rotated tokens); kubernetes>=32 keys the token as BearerToken
            token = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
            return {"Authorization": token} if token else {}

        return cls(cfg.host, headers, ctx)

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", **params: str
    ) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        headers = {"Accept": "application/json", **self._headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        self.requests += 1
        metrics.API_REQUESTS.labels(verb=method).inc()
        try:
            async with self._session.request(
                method, self.server + path, data=data, headers=headers, params=params or None, ssl=self._ssl
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise KubeError(
                0, f"{method} {path}: cannot reach the API server ({str(exc) or type(exc).__name__})"
            ) from exc
        if status >= 400:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(status, str(message)[:500])
        return json.loads(text) if text else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = await self._request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return out

    async def list(self, path: str, **params: str) -> list[dict[str, Any]]:
        out = await self._request("GET", path, **params)
        return list(out.get("items") or [])

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._request("POST", path, body)
        return out

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        try:
            out: dict[str, Any] = await self._request(
                "PATCH", path, obj, "application/apply-patch+yaml", fieldManager=FIELD_MANAGER, force="true"
            )
        except KubeError as exc:
            if exc.status != 404:
                raise
            out = await self.create(path_for(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)
        return out

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._request("PATCH", path, body, "application/merge-patch+json")
        return out

    async def delete(self, path: str) -> bool:
        try:
            await self._request("DELETE", path, {"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True


_client: Kube | None = None


def set_client(client: Kube | None) -> None:
    global _client
    _client = client


def get_client() -> Kube:
    global _client
    if _client is None:
        _client = Kube.from_environment()
    return _client


# ---- node facts from the live cluster ------------------------------------------------------------


def node_usable(node: dict[str, Any]) -> bool:
    """Schedulable and not NotReady (a node without a Ready condition yet counts as usable)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return True


def pod_requests(pod: dict[str, Any]) -> tuple[int, int]:
    """(CPU millis, memory bytes) a pod requests: containers summed, init containers at their max."""
    spec = pod.get("spec") or {}

    def req(c: dict[str, Any]) -> tuple[int, int]:
        r = (c.get("resources") or {}).get("requests") or {}
        return int(parse_quantity(r.get("cpu", "0")) * 1000), int(parse_quantity(r.get("memory", "0")))

    cpu = mem = 0
    for c in spec.get("containers") or []:
        a, b = req(c)
        cpu, mem = cpu + a, mem + b
    for c in spec.get("initContainers") or []:
        a, b = req(c)
        cpu, mem = max(cpu, a), max(mem, b)
    over = spec.get("overhead") or {}
    return cpu + int(parse_quantity(over.get("cpu", "0")) * 1000), mem + int(parse_quantity(over.get("memory", "0")))


def node_facts(
    nodes: list[dict[str, Any]], pods: list[dict[str, Any]], exclude: Callable[[dict[str, Any]], bool] | None = None
) -> list[NodeFacts]:
    """Facts of usable nodes, less what their running pods request (pods matching ``exclude`` don't count)."""
    used: dict[str, tuple[int, int]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed") or (exclude is not None and exclude(pod)):
            continue
        cpu, mem = pod_requests(pod)
        a, b = used.get(node, (0, 0))
        used[node] = (a + cpu, b + mem)
    out = []
    for n in nodes:
        if not node_usable(n):
            continue
        name = str((n.get("metadata") or {}).get("name"))
        cpu, mem = used.get(name, (0, 0))
        out.append(node_facts_from_k8s(n, cpu, mem))
    return out


@dataclass(frozen=True)
class Reservation:
    """What the pods of one of our Deployments will request, and where they may go (the pod template's
    nodeSelector): counted on the nodes until the pods show up scheduled in a node list."""

    selector: tuple[tuple[str, str], ...]
    cpu_millis: int
    memory_bytes: int
    replicas: int

    @classmethod
    def of(cls, deploy: dict[str, Any]) -> Reservation:
        spec = deploy.get("spec") or {}
        pod_spec = (spec.get("template") or {}).get("spec") or {}
        cpu, mem = pod_requests({"spec": pod_spec})
        selector = tuple(sorted((pod_spec.get("nodeSelector") or {}).items()))
        return cls(selector, cpu, mem, int(spec.get("replicas", 1) or 0))


class ClusterSnapshot:
    """Nodes and pods, listed at most every ``ttl`` seconds unless invalidated by a node event.

    One list at a time: reconciles that find it stale while a list is in flight wait for that list. What the
    pods request is summed per node once per list; ``node_facts`` then only takes one owner's pods back out.
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.nodes: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []
        self.taken = 0.0
        self.generation = 0  # lists so far; invalidate() does not bump it
        self._lock: asyncio.Lock | None = None
        self._usage: tuple[int, dict[str, tuple[int, int]], dict[tuple[str, str], list[tuple[str, int, int]]]] | None
        self._usage = None
        self._base: tuple[int, list[NodeFacts]] | None = None
        # Where the pods of reservations not yet seen scheduled will go (a guess: the scheduler's spread)
        self._pending: tuple[Any, dict[str, tuple[int, int]], dict[tuple[str, str], list[tuple[str, int, int]]]] | None
        self._pending = None

    def invalidate(self) -> None:
        self.taken = 0.0

    def age(self) -> float:
        return time.monotonic() - self.taken if self.taken else 0.0

    def _fresh(self) -> bool:
        return bool(self.taken and time.monotonic() - self.taken < self.ttl)

    async def refresh(self, kube: Kube) -> None:
        if self._fresh():
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        wanted_after = self.generation
        async with self._lock:
            # A list that began after we found the snapshot stale is as fresh as one of our own.
            if self._fresh() or self.generation > wanted_after:
                return
            nodes = await kube.list("/api/v1/nodes")
            pods = await kube.list("/api/v1/pods", fieldSelector="status.phase!=Succeeded,status.phase!=Failed")
            self.nodes, self.pods = nodes, pods
            self.taken = time.monotonic()
            self.generation += 1

    def usage(
        self, owner_label: str
    ) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], list[tuple[str, int, int]]]]:
        """What the listed pods request per node, and per (namespace, owner label value) the pods' own
        (node, CPU millis, memory bytes); computed once per list."""
        if self._usage is None or self._usage[0] != self.generation:
            used: dict[str, tuple[int, int]] = {}
            by_owner: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
            for pod in self.pods:
                node = (pod.get("spec") or {}).get("nodeName")
                phase = (pod.get("status") or {}).get("phase")
                if not node or phase in ("Succeeded", "Failed"):
                    continue
                cpu, mem = pod_requests(pod)
                a, b = used.get(node, (0, 0))
                used[node] = (a + cpu, b + mem)
                meta = pod.get("metadata") or {}
                owner = (meta.get("labels") or {}).get(owner_label)
                if owner:
                    by_owner.setdefault((str(meta.get("namespace")), str(owner)), []).append((node, cpu, mem))
            self._usage = (self.generation, used, by_owner)
        return self._usage[1], self._usage[2]

    def _pending_usage(
        self, owner_label: str, reservations: dict[tuple[str, str], Reservation], version: int
    ) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], list[tuple[str, int, int]]]]:
        """Reserved pods not in the node list yet (planned, not created or not scheduled), put on the matching
        node with the most room left, as the scheduler's default spread would; per node and per owner."""
        key = (self.generation, version)
        if self._pending is not None and self._pending[0] == key:
            return self._pending[1], self._pending[2]
        used, by_owner = self.usage(owner_label)
        assert self._base is not None
        free = {
            b.name: [b.cpu_millis - used.get(b.name, (0, 0))[0], (b.memory_bytes or 0) - used.get(b.name, (0, 0))[1]]
            for b in self._base[1]
        }
        labels = {b.name: b.labels for b in self._base[1]}
        pending: dict[str, tuple[int, int]] = {}
        placed: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for owner, r in sorted(reservations.items()):
            missing = r.replicas - len(by_owner.get(owner, []))
            for _ in range(max(0, missing)):
                fits = [
                    n
                    for n, (c, m) in free.items()
                    if c >= r.cpu_millis and m >= r.memory_bytes and all(labels[n].get(k) == v for k, v in r.selector)
                ]
                if not fits:
                    break  # the scheduler will refuse it too; it takes nothing
                n = max(fits, key=lambda x: (free[x][0], free[x][1], x))
                free[n][0] -= r.cpu_millis
                free[n][1] -= r.memory_bytes
                a, b = pending.get(n, (0, 0))
                pending[n] = (a + r.cpu_millis, b + r.memory_bytes)
                placed.setdefault(owner, []).append((n, r.cpu_millis, r.memory_bytes))
        self._pending = (key, pending, placed)
        return pending, placed

    def node_facts(
        self,
        owner_label: str,
        owner: tuple[str, str],
        reservations: dict[tuple[str, str], Reservation] | None = None,
        version: int = 0,
    ) -> list[NodeFacts]:
        """``node_facts(nodes, pods, exclude=the owner's pods)``, from the per-list sums, less the pods of
        ``reservations`` (other than the owner's) that the list does not show scheduled yet."""
        used, by_owner = self.usage(owner_label)
        if self._base is None or self._base[0] != self.generation:
            self._base = (self.generation, [node_facts_from_k8s(n) for n in self.nodes if node_usable(n)])
        pending, placed = self._pending_usage(owner_label, reservations or {}, version)
        mine: dict[str, tuple[int, int]] = {}
        for node, cpu, mem in by_owner.get(owner, []) + placed.get(owner, []):
            a, b = mine.get(node, (0, 0))
            mine[node] = (a + cpu, b + mem)
        out = []
        for base in self._base[1]:
            cpu, mem = used.get(base.name, (0, 0))
            p_cpu, p_mem = pending.get(base.name, (0, 0))
            own_cpu, own_mem = mine.get(base.name, (0, 0))
            cpu, mem = cpu + p_cpu - own_cpu, mem + p_mem - own_mem
            out.append(
                base.model_copy(
                    update={
                        "cpu_millis": max(base.cpu_millis - cpu, 0),
                        "memory_bytes": max((base.memory_bytes or 0) - mem, 0),
                    }
                )
            )
        return out
