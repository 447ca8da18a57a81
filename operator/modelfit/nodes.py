"""Node facts: the capacity a plan must fit, from a profile, this host, or a Kubernetes Node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

MiB = 1 << 20
GiB = 1 << 30

GpuVendor = Literal["none", "nvidia", "amd", "intel"]


@dataclass(frozen=True)
class GpuVendorInfo:
    """How a GPU vendor shows up on Kubernetes nodes, and the llama.cpp backend that drives it."""

    vendor: GpuVendor
    resource: str  # the device plugin's extended resource; GPU node pools are tainted with the same key
    memory_label: str  # GPU memory per GPU, from the vendor's feature discovery
    memory_in_mib: bool  # the label is a number of MiB (NVIDIA GFD), else a Kubernetes quantity
    backend: str


# Adding a GPU vendor is one row: the nodes' GPUs and memory, the pods' requests and tolerations, the
# backend auto picks, and the GPUs other pods hold all come from here.
GPU_VENDORS: tuple[GpuVendorInfo, ...] = (
    GpuVendorInfo("nvidia", "nvidia.com/gpu", "nvidia.com/gpu.memory", True, "cuda"),
    GpuVendorInfo("amd", "amd.com/gpu", "amd.com/gpu.vram", False, "rocm"),
    GpuVendorInfo("intel", "gpu.intel.com/i915", "gpu.intel.com/memory.max", False, "vulkan"),
)
GPU_RESOURCES = tuple(v.resource for v in GPU_VENDORS)


def gpu_vendor_info(vendor: str) -> GpuVendorInfo | None:
    return next((v for v in GPU_VENDORS if v.vendor == vendor), None)


@dataclass(frozen=True)
class Requests:
    """What pods ask the scheduler for: CPU millicores, memory bytes and GPUs (any vendor's resource)."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    gpus: int = 0

    def __add__(self, other: Requests) -> Requests:
        return Requests(
            self.cpu_millis + other.cpu_millis, self.memory_bytes + other.memory_bytes, self.gpus + other.gpus
        )

    def __sub__(self, other: Requests) -> Requests:
        return Requests(
            self.cpu_millis - other.cpu_millis, self.memory_bytes - other.memory_bytes, self.gpus - other.gpus
        )

    def most(self, other: Requests) -> Requests:
        """Each resource's larger value (init containers run one at a time: the pod needs their largest)."""
        return Requests(
            max(self.cpu_millis, other.cpu_millis),
            max(self.memory_bytes, other.memory_bytes),
            max(self.gpus, other.gpus),
        )

    def covers(self, other: Requests) -> bool:
        """Whether this much free room holds ``other``."""
        return (
            self.cpu_millis >= other.cpu_millis and self.memory_bytes >= other.memory_bytes and self.gpus >= other.gpus
        )


# Nodes do not publish their memory bandwidth; a node (or node shape) may carry it as a label, in GB/s
# (10^9 bytes per second), for the planner's thread count (sizing._threads). Without it the policy's default holds.
BANDWIDTH_LABEL = "modelfit.io/memory-bandwidth-gbps"


class NodeFacts(BaseModel):
    """What a node (or node class) offers to one llama-server pod."""

    name: str = "node"
    cpu_millis: int = 2000  # allocatable (free) CPU
    memory_bytes: int | None = None  # allocatable (free) memory; None = report needs only
    gpus: int = 0
    gpu_vendor: GpuVendor = "none"
    gpu_memory_bytes: int = 0  # per GPU
    cpu_arch: Literal["amd64", "arm64"] = "amd64"
    cpu_features: list[str] = Field(default_factory=lambda: ["avx2"])
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[dict[str, str]] = Field(default_factory=list)
    count: int = 1  # nodes of this class
    memory_bandwidth_bytes: int | None = None  # bytes/s, from BANDWIDTH_LABEL; None = the policy's default


def bandwidth_from_labels(labels: dict[str, str]) -> int | None:
    """The node's memory bandwidth in bytes/s from its BANDWIDTH_LABEL (GB/s), or None when absent or unreadable."""
    raw = labels.get(BANDWIDTH_LABEL)
    if raw is None:
        return None
    try:
        gbps = float(raw)
    except ValueError:
        return None
    return int(gbps * 1e9) if 0 < gbps < 1e6 else None


PROFILES: dict[str, NodeFacts] = {
    "cpu": NodeFacts(name="cpu", cpu_millis=4000, memory_bytes=None),
    "cpu-small": NodeFacts(name="cpu-small", cpu_millis=2000, memory_bytes=4 * GiB),
    "cpu-large": NodeFacts(
        name="cpu-large", cpu_millis=16000, memory_bytes=64 * GiB, cpu_features=["avx2", "avx512f", "avx512bw"]
    ),
    "rtx-3060-12gb": NodeFacts(
        name="rtx-3060-12gb",
        cpu_millis=8000,
        memory_bytes=32 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=12288 * MiB,
    ),
    "rtx-4090-24gb": NodeFacts(
        name="rtx-4090-24gb",
        cpu_millis=16000,
        memory_bytes=64 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=24564 * MiB,
    ),
    "l4-24gb": NodeFacts(
        name="l4-24gb",
        cpu_millis=8000,
        memory_bytes=32 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=23034 * MiB,
    ),
    "a100-80gb": NodeFacts(
        name="a100-80gb",
        cpu_millis=32000,
        memory_bytes=128 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=81920 * MiB,
    ),
    "h100-80gb": NodeFacts(
        name="h100-80gb",
        cpu_millis=32000,
        memory_bytes=128 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=81559 * MiB,
    ),
}


def profile(name: str) -> NodeFacts:
    try:
        return PROFILES[name].model_copy(deep=True)
    except KeyError as exc:
        raise KeyError(f"unknown node profile {name!r}; known: {', '.join(PROFILES)}") from exc


# ---- Kubernetes quantities ------------------------------------------------------------------

_BIN = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DEC = {
    "n": 10**-9,
    "u": 10**-6,
    "m": 10**-3,
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ("4Gi", "1500m", "2", "1e3") as a number."""
    if isinstance(q, (int, float)):
        return float(q)
    s = str(q).strip()
    for suf, mult in _BIN.items():
        if s.endswith(suf):
            return float(s[: -len(suf)]) * mult
    if s and s[-1] in _DEC and not s[-1].isdigit():
        return float(s[:-1]) * _DEC[s[-1]]
    return float(s)


def format_memory(n: int) -> str:
    """Bytes as a Kubernetes quantity in Mi (rounded up)."""
    return f"{-(-n // MiB)}Mi"


def format_cpu(millis: int) -> str:
    return f"{millis // 1000}" if millis % 1000 == 0 else f"{millis}m"


# ---- Kubernetes Node objects -----------------------------------------------------------------

# The taints Kubernetes' node lifecycle controller puts on a cordoned, NotReady or unreachable node: the scheduler
# keeps pods off such a node unless they tolerate the taint (DaemonSets do), so a node carries them here too.
CORDONED_TAINT = "node.kubernetes.io/unschedulable"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    """Whether a pod with these tolerations may be scheduled despite the taint (the scheduler's matching)."""
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if op == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if op == "Equal" and t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _state_taints(node: dict[str, Any], taints: list[dict[str, str]]) -> list[dict[str, str]]:
    """The NoSchedule taint of a cordon (spec.unschedulable) or of a Ready condition that is not True, where the
    node lifecycle controller has not put it yet (a node without a Ready condition yet counts as ready)."""
    keys = []
    if (node.get("spec") or {}).get("unschedulable"):
        keys.append(CORDONED_TAINT)
    ready = [c.get("status") for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
    if ready and ready[0] != "True":
        keys.append(NOT_READY_TAINT if ready[0] == "False" else UNREACHABLE_TAINT)
    have = {(t.get("key"), t.get("effect")) for t in taints}
    return [{"key": k, "effect": "NoSchedule"} for k in keys if (k, "NoSchedule") not in have]


NFD_FEATURES = {
    "feature.node.kubernetes.io/cpu-cpuid.AVX2": "avx2",
    "feature.node.kubernetes.io/cpu-cpuid.AVX512F": "avx512f",
    "feature.node.kubernetes.io/cpu-cpuid.AVX512BW": "avx512bw",
    "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI": "avx512_vnni",
    "feature.node.kubernetes.io/cpu-cpuid.AMXINT8": "amx_int8",
    "feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "amx_bf16",
}


def _gpus(alloc: dict[str, Any], labels: dict[str, str]) -> tuple[GpuVendor, int, int]:
    """(vendor, GPUs, memory per GPU) of the first vendor in GPU_VENDORS the node advertises."""
    for info in GPU_VENDORS:
        n = int(parse_quantity(alloc.get(info.resource, "0")))
        if n > 0:
            raw = labels.get(info.memory_label)
            if raw is None:
                return info.vendor, n, 0
            return info.vendor, n, int(float(raw)) * MiB if info.memory_in_mib else int(parse_quantity(raw))
    return "none", 0, 0


def node_facts_from_k8s(node: dict[str, Any], used: Requests | None = None) -> NodeFacts:
    """Facts of a Node object, less what pods already request on it (``used``: CPU, memory and GPUs).

    A cordoned or not Ready node carries the taint the node lifecycle controller gives it (``_state_taints``), so
    placement leaves it out as the scheduler does and says why. GPUs come from the first vendor of GPU_VENDORS the node advertises, their memory from that vendor's
    feature-discovery label, CPU features from node-feature-discovery labels; without NFD labels an amd64
    node is assumed to have AVX2 (every x86-64 server CPU since 2013).
    """
    used = used or Requests()
    meta = node.get("metadata") or {}
    status = node.get("status") or {}
    labels: dict[str, str] = dict(meta.get("labels") or {})
    alloc = status.get("allocatable") or status.get("capacity") or {}
    cpu = int(parse_quantity(alloc.get("cpu", "0")) * 1000) - used.cpu_millis
    mem = int(parse_quantity(alloc.get("memory", "0"))) - used.memory_bytes
    vendor, gpus, gpu_mem = _gpus(alloc, labels)
    arch = labels.get("kubernetes.io/arch", "amd64")
    features = [feat for label, feat in NFD_FEATURES.items() if labels.get(label) == "true"]
    if not features and arch == "amd64":
        features = ["avx2"]
    taints = [{k: str(v) for k, v in t.items()} for t in (node.get("spec") or {}).get("taints") or []]
    taints += _state_taints(node, taints)
    return NodeFacts(
        name=str(meta.get("name", "node")),
        cpu_millis=max(cpu, 0),
        memory_bytes=max(mem, 0),
        gpus=max(gpus - used.gpus, 0),
        gpu_vendor=vendor,
        gpu_memory_bytes=gpu_mem,
        cpu_arch="arm64" if arch == "arm64" else "amd64",
        cpu_features=features,
        labels=labels,
        taints=taints,
        memory_bandwidth_bytes=bandwidth_from_labels(labels),
    )


# ---- node shapes a cluster autoscaler can add -----------------------------------------------------


class NodeShape(BaseModel):
    """A node a cluster autoscaler can add (a NodePool or node group): its labels and allocatable resources."""

    model_config = {"extra": "forbid", "populate_by_name": True}

    name: str = Field(min_length=1)
    labels: dict[str, str] = Field(min_length=1)
    cpu: str | int | float
    memory: str | int
    gpus: int = Field(default=0, ge=0)
    gpu_vendor: GpuVendor = Field(default="nvidia", alias="gpuVendor")
    gpu_memory: str | int = Field(default=0, alias="gpuMemory")  # per GPU
    taints: list[dict[str, str]] = Field(default_factory=list)

    def facts(self) -> NodeFacts:
        """The shape as an empty node of that shape."""
        arch = self.labels.get("kubernetes.io/arch", "amd64")
        return NodeFacts(
            name=self.name,
            cpu_millis=int(parse_quantity(self.cpu) * 1000),
            memory_bytes=int(parse_quantity(self.memory)),
            gpus=self.gpus,
            gpu_vendor=self.gpu_vendor if self.gpus else "none",
            gpu_memory_bytes=int(parse_quantity(self.gpu_memory)) if self.gpus else 0,
            cpu_arch="arm64" if arch == "arm64" else "amd64",
            cpu_features=[] if arch == "arm64" else ["avx2"],
            labels=dict(self.labels),
            taints=list(self.taints),
            memory_bandwidth_bytes=bandwidth_from_labels(self.labels),
        )


def parse_node_shapes(data: Any) -> list[NodeShape]:
    """Node shapes from YAML/JSON data: a list, or ``{nodeShapes: [...]}``; ValueError names a bad entry."""
    if isinstance(data, dict) and set(data) == {"nodeShapes"}:
        data = data["nodeShapes"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("node shapes must be a list of {name, labels, cpu, memory[, gpus, gpuMemory]}")
    shapes = []
    for i, item in enumerate(data):
        try:
            shape = NodeShape.model_validate(item)
            shape.facts()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"node shape {i}: {exc}") from exc
        shapes.append(shape)
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"node shape names must be unique: {', '.join(names)}")
    return shapes
