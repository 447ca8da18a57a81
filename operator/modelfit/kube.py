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
from typing import Any

import aiohttp

from . import metrics, occupancy
from .nodes import NodeFacts, node_facts_from_k8s
from .occupancy import Reservation

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
    "NetworkPolicy": "networkpolicies",
    "ConfigMap": "configmaps",
    "ModelDeployment": "modeldeployments",
    "InferencePool": "inferencepools",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
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
        self._usage: tuple[int, occupancy.PerNode, occupancy.PerOwner] | None = None
        self._base: tuple[int, list[NodeFacts]] | None = None
        # Where the pods of reservations not yet seen scheduled will go (a guess: the scheduler's spread)
        self._pending: tuple[tuple[int, int], occupancy.PerNode, occupancy.PerOwner] | None = None

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

    def usage(self, owner_label: str) -> tuple[occupancy.PerNode, occupancy.PerOwner]:
        """``occupancy.usage`` of the listed pods, computed once per list."""
        if self._usage is None or self._usage[0] != self.generation:
            self._usage = (self.generation, *occupancy.usage(self.pods, owner_label))
        return self._usage[1], self._usage[2]

    def empty_nodes(self) -> list[NodeFacts]:
        """The usable nodes as if no pod ran on them (their allocatable), once per list."""
        if self._base is None or self._base[0] != self.generation:
            self._base = (self.generation, [node_facts_from_k8s(n) for n in self.nodes if occupancy.node_usable(n)])
        return self._base[1]

    def _pending_usage(
        self, owner_label: str, reservations: dict[tuple[str, str], Reservation], version: int
    ) -> tuple[occupancy.PerNode, occupancy.PerOwner]:
        """``occupancy.place_reserved`` for this list and this version of the reservations, computed once."""
        key = (self.generation, version)
        if self._pending is None or self._pending[0] != key:
            used, by_owner = self.usage(owner_label)
            self._pending = (key, *occupancy.place_reserved(self.empty_nodes(), used, by_owner, reservations))
        return self._pending[1], self._pending[2]

    def node_facts(
        self,
        owner_label: str,
        owner: tuple[str, str],
        reservations: dict[tuple[str, str], Reservation] | None = None,
        version: int = 0,
    ) -> list[NodeFacts]:
        """``occupancy.node_facts(nodes, pods, exclude=the owner's pods)`` from the per-list sums, less the pods
        of ``reservations`` (other than the owner's) that the list does not show scheduled yet."""
        used, by_owner = self.usage(owner_label)
        base = self.empty_nodes()
        pending, placed = self._pending_usage(owner_label, reservations or {}, version)
        own = by_owner.get(owner, []) + placed.get(owner, [])
        return occupancy.free(base, occupancy.add(used, pending), own)
