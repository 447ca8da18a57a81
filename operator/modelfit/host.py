"""What this machine and the operator's files say: the host's capacity (``modelfit serve``) and the node
shapes file (``--node-shapes``). The I/O beside the pure ``nodes`` module."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .nodes import GiB, NodeFacts, NodeShape, parse_node_shapes


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw and raw != "max":
            val = int(raw)
            if val < 1 << 60:
                return val
    return None


def _cgroup_cpu_millis() -> int | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(int(quota) * 1000 / int(period))
    except (OSError, ValueError):
        pass
    return None


def cpu_features_from_cpuinfo(text: str) -> list[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    wanted = [
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "amx_int8",
        "amx_bf16",
        "fma",
        "f16c",
        "asimddp",
        "i8mm",
        "sve",
    ]
    return [f for f in wanted if f in flags]


def host_facts() -> NodeFacts:
    """This machine, bounded by its cgroup's CPU and memory limits."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 4 * GiB
    limit = _cgroup_memory_limit()
    memory = min(avail, limit) if limit else avail
    cpus = len(os.sched_getaffinity(0)) * 1000
    quota = _cgroup_cpu_millis()
    if quota:
        cpus = min(cpus, quota)
    try:
        features = cpu_features_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        features = []
    arch = "arm64" if platform.machine() in ("aarch64", "arm64") else "amd64"
    return NodeFacts(name="localhost", cpu_millis=cpus, memory_bytes=memory, cpu_arch=arch, cpu_features=features)


def load_node_shapes(path: str | os.PathLike[str]) -> list[NodeShape]:
    """The node shapes in a YAML file (see ``nodes.parse_node_shapes``)."""
    import yaml

    return parse_node_shapes(yaml.safe_load(Path(path).read_text()))
