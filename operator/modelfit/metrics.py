"""Prometheus metrics of the operator."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("modelfit_reconciles_total", "ModelDeployment reconciles by result", ["result"])
RECONCILE_SECONDS = Histogram(
    "modelfit_reconcile_duration_seconds",
    "Time to reconcile one ModelDeployment",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PLAN_CHANGES = Counter("modelfit_plan_changes_total", "Plans that changed and were rolled out")
PLANNED_MEMORY = Gauge(
    "modelfit_planned_memory_bytes", "Planned memory request per pod of a ModelDeployment", ["namespace", "name"]
)
API_REQUESTS = Counter(
    "modelfit_api_requests_total", "Requests the operator's own client sent to the API server", ["verb"]
)
NODE_FACTS_AGE = Gauge("modelfit_node_facts_age_seconds", "Age of the node facts last used for planning")


def track_node_facts_age(age: Callable[[], float]) -> None:
    NODE_FACTS_AGE.set_function(age)


def forget(namespace: str, name: str) -> None:
    try:
        PLANNED_MEMORY.remove(namespace, name)
    except KeyError:
        pass


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
