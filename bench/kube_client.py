"""The operator's API client against the maintained ones, on the real local control plane.

The reconcile loop makes a few GETs, a pod LIST and, when a plan changes, server-side applies. This
times the same calls through

  * ``modelfit``     ``modelfit.kube.Kube`` (aiohttp, the session kopf's event loop already runs),
  * ``kubernetes``   the official client's ``DynamicClient`` (synchronous; run in threads with
                     ``asyncio.to_thread`` so the event loop is not blocked),
  * ``k8s-asyncio``  ``kubernetes_asyncio`` when it is importable (not a dependency; e.g.
                     ``pip install --target /tmp/kasync kubernetes_asyncio`` and ``PYTHONPATH=/tmp/kasync``),

with the same concurrency, and prints calls per second and the memory each client adds to a process
that already runs kopf. Rows are interleaved (round-robin) so a shared machine's noise hits all alike.

    bash e2e/cluster.sh up && python bench/kube_client.py [--calls 200] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf  # noqa: F401 - the operator's process always has it loaded: measure on top of it

from modelfit.kube import Kube

NS = "default"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"bench-{i}", "namespace": NS, "labels": {"bench": "kube-client"}},
        "spec": {"ports": [{"port": 8080, "name": "http"}], "selector": {"app": f"bench-{i}"}},
    }


async def run_calls(fn: Callable[[int], Awaitable[Any]], calls: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await fn(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return calls / (time.perf_counter() - t0)


class ModelfitClient:
    name = "modelfit"

    def __init__(self) -> None:
        self.kube = Kube.from_environment()

    async def get(self, i: int) -> Any:
        return await self.kube.get(f"/api/v1/namespaces/{NS}/services/kubernetes")

    async def list_pods(self, i: int) -> Any:
        return await self.kube.list("/api/v1/pods")

    async def apply(self, i: int) -> Any:
        return await self.kube.apply(service(i % 20))


class OfficialClient:
    name = "kubernetes"

    def __init__(self) -> None:
        from kubernetes import config, dynamic
        from kubernetes.client import api_client

        self.client = dynamic.DynamicClient(api_client.ApiClient(configuration=config.load_kube_config()))
        self.svc = self.client.resources.get(api_version="v1", kind="Service")
        self.pod = self.client.resources.get(api_version="v1", kind="Pod")

    async def get(self, i: int) -> Any:
        return await asyncio.to_thread(self.svc.get, name="kubernetes", namespace=NS)

    async def list_pods(self, i: int) -> Any:
        return await asyncio.to_thread(self.pod.get)

    async def apply(self, i: int) -> Any:
        body = service(i % 20)
        return await asyncio.to_thread(
            self.svc.server_side_apply, body=body, namespace=NS, field_manager="bench", force_conflicts=True
        )


class AsyncioClient:
    name = "k8s-asyncio"

    async def setup(self) -> None:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient, CoreV1Api

        await config.load_kube_config()
        self.api = ApiClient()
        self.core = CoreV1Api(self.api)

    async def get(self, i: int) -> Any:
        return await self.core.read_namespaced_service("kubernetes", NS)

    async def list_pods(self, i: int) -> Any:
        return await self.core.list_pod_for_all_namespaces()

    async def apply(self, i: int) -> Any:
        body = service(i % 20)
        return await self.core.patch_namespaced_service(
            body["metadata"]["name"],
            NS,
            body,
            field_manager="bench",
            force=True,
            _content_type="application/apply-patch+yaml",
        )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not os.environ.get("KUBECONFIG"):
        os.environ["KUBECONFIG"] = os.path.join(os.environ.get("MODELFIT_STATE", "/tmp/modelfit-cluster"), "kubeconfig")
    clients: list[Any] = []
    memory: dict[str, float] = {}
    for cls in (ModelfitClient, OfficialClient, AsyncioClient):
        before = rss_mib()
        try:
            c = cls()
            if hasattr(c, "setup"):
                await c.setup()
            await c.get(0)
        except ImportError as exc:
            print(f"{cls.name}: not importable ({exc}); skipped", file=sys.stderr)
            continue
        memory[c.name] = rss_mib() - before
        clients.append(c)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for op in ("get", "list_pods", "apply"):
            for c in clients:
                rate = await run_calls(getattr(c, op), args.calls, args.concurrency)
                results.setdefault((c.name, op), []).append(rate)
    print(f"\n{args.calls} calls per row, concurrency {args.concurrency}, median of {args.rounds} rounds (calls/s)")
    print(f"{'client':<14}{'GET':>10}{'LIST pods':>12}{'apply':>10}{'+RSS MiB':>10}")
    base = {op: statistics.median(results[("modelfit", op)]) for op in ("get", "list_pods", "apply")}
    for c in clients:
        row = [statistics.median(results[(c.name, op)]) for op in ("get", "list_pods", "apply")]
        print(f"{c.name:<14}" + "".join(f"{v:>10.0f}  " for v in row) + f"{memory[c.name]:>8.1f}")
        print(" " * 14 + "".join(f"{v / base[op]:>9.2f}x  " for v, op in zip(row, base, strict=True)))
    kube = clients[0].kube
    for i in range(20):
        await kube.delete(f"/api/v1/namespaces/{NS}/services/bench-{i}")
    await kube.close()
    for c in clients:
        if isinstance(c, AsyncioClient):
            await c.api.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
