"""Unit tests never reach huggingface.co: a catalog model's header read fails at once, so catalog models
are planned from the catalog's facts on every machine (tests of the header read bring their own server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from modelfit import sources
from modelfit.gguf_reader import GGUFError, GGUFHeader
from modelfit.render import HASH_ANNOTATION, MD_LABEL


def _offline(url: str, headers: dict[str, str] | None, timeout: float, settings: object = None) -> GGUFHeader:
    raise GGUFError(f"{url}: not read in unit tests")


@pytest.fixture(autouse=True)
def offline_catalog_headers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sources, "HEADERS", sources.HeaderReads(reader=_offline))
    yield


# ---- builders of the Kubernetes objects a reconcile reads (factories as fixtures: tests and e2e share the
# name ``conftest``, so these are not imported) -----------------------------------------------------------

NODE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {"cpu": "2", "memory": "4Gi"},
    "cpu-large": {"cpu": "16", "memory": "64Gi"},
    "gpu-24g": {
        "cpu": "8",
        "memory": "32Gi",
        "gpus": 1,
        "gpu_mem": 24576,
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    },
}


def k8s_node(
    name: str,
    cpu: str | None = None,
    memory: str | None = None,
    labels: dict[str, str] | None = None,
    gpus: int | None = None,
    gpu_mem: int | None = None,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A Ready Node; ``cpu-small`` (2 CPUs, 4Gi), ``cpu-large`` (16, 64Gi) and ``gpu-24g`` (8, 32Gi, one 24 GiB
    NVIDIA GPU, tainted) are presets, any other name is 16 CPUs and 64Gi unless told."""
    preset = NODE_PRESETS.get(name, {})
    cpu, memory = cpu or preset.get("cpu", "16"), memory or preset.get("memory", "64Gi")
    gpus = preset.get("gpus", 0) if gpus is None else gpus
    gpu_mem = gpu_mem or preset.get("gpu_mem")
    taints = preset.get("taints", []) if taints is None else taints
    lab = {"kubernetes.io/hostname": name, "kubernetes.io/arch": "amd64", **(labels or {})}
    alloc = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
        lab["nvidia.com/gpu.memory"] = str(gpu_mem)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": lab},
        "spec": {"taints": taints},
        "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def md_pod(
    name: str = "qwen-1",
    *,
    node: str | None = None,
    template: str | None = None,
    owner: str | None = "qwen",
    namespace: str = "default",
    requests: dict[str, str] | None = None,
    ready: bool = False,
    unschedulable: str | None = None,
    oom_killed: bool = False,
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod: Running on ``node``, else Pending (refused by the scheduler with ``unschedulable``); of
    ModelDeployment ``owner`` (None: another tenant's) and pod template ``template`` (the plan-hash annotation),
    pinned by ``node_selector`` as its template says."""
    status: dict[str, Any] = {"phase": "Running" if node else "Pending", "conditions": []}
    if ready:
        status["conditions"].append({"type": "Ready", "status": "True"})
    if unschedulable is not None:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    if oom_killed:
        status["containerStatuses"] = [{"name": "llama-server", "lastState": {"terminated": {"reason": "OOMKilled"}}}]
    spec: dict[str, Any] = {"containers": [{"resources": {"requests": requests or {}}}]}
    if node:
        spec["nodeName"] = node
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MD_LABEL: owner} if owner else {},
            "annotations": {HASH_ANNOTATION: template} if template else {},
        },
        "spec": spec,
        "status": status,
    }


@pytest.fixture
def make_node() -> Callable[..., dict[str, Any]]:
    """``k8s_node``: a Node object."""
    return k8s_node


@pytest.fixture
def make_pod() -> Callable[..., dict[str, Any]]:
    """``md_pod``: a pod of a ModelDeployment, or another tenant's."""
    return md_pod
