"""Helpers of the real-node scenarios: pinning a ModelDeployment to the node, reading its pods'
cgroups and processes on this machine, talking to llama-server on the pod IP."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
IMAGES_DIR = Path(os.environ.get("MODELFIT_IMAGES", CACHE / "images"))
NODE_DIR = Path(os.environ.get("MODELFIT_NODE_DIR", "/tmp/modelfit-node"))
NODE_NAME = os.environ.get("NODE_NAME", "real-0")
NODE_LABEL = "modelfit.io/real-node"
NODE_TAINT = "modelfit.io/real-node"
BRIDGE_IP = "10.88.0.1"
MEMCG = Path("/sys/fs/cgroup/memory")


def pinned(**spec: Any) -> dict[str, Any]:
    """Spec fields that put a ModelDeployment's pods on the real node (and only there)."""
    spec.setdefault("nodeSelector", {NODE_LABEL: "true"})
    spec.setdefault("tolerations", [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}])
    return spec


def sha256_of(path: Path) -> str:
    side = path.with_name(path.name + ".sha256")
    if side.exists() and side.stat().st_mtime >= path.stat().st_mtime:
        return side.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    side.write_text(h.hexdigest())
    return h.hexdigest()


def http(
    url: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
    timeout: float = 120,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod IPs: never through a proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def drop_page_cache() -> None:
    """So that the next pod to touch the model is the one its pages are charged to (cgroup v1)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


@dataclass
class Usage:
    """One container's memory as the kernel saw it."""

    cgroup_peak: int  # memory.max_usage_in_bytes: anonymous + page cache charged to the container
    vm_hwm: int  # peak RSS of llama-server (what memory.total_bytes predicts)
    rss: int  # memory.stat total_rss (anonymous)
    mapped_file: int  # memory.stat total_mapped_file
    cache: int  # memory.stat total_cache
    failcnt: int  # times the limit was hit


class RealNode:
    def __init__(self, cluster: Any, images_s: float, up_s: float, log: str) -> None:
        self.cluster = cluster
        self.images_s = images_s
        self.up_s = up_s
        self.log = log

    def pods(self, ns: str, name: str, terminating: bool = False) -> list[dict[str, Any]]:
        out = self.cluster.get_json("-n", ns, "pods", "-l", f"app.kubernetes.io/instance={name}")
        return [p for p in out["items"] if terminating or not p["metadata"].get("deletionTimestamp")]

    def ready_pod(self, ns: str, name: str, timeout: float = 240) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for p in self.pods(ns, name):
                conds = {c["type"]: c["status"] for c in p["status"].get("conditions") or []}
                if conds.get("Ready") == "True":
                    return p
            return None

        return dict(self.cluster.wait_for(check, timeout=timeout, interval=1, what=f"a Ready pod of {ns}/{name}"))

    def base_url(self, pod: dict[str, Any]) -> str:
        return f"http://{pod['status']['podIP']}:8080"

    def cgroup(self, pod: dict[str, Any], container: str = "llama-server") -> Path:
        cs = next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)
        cid = cs["containerID"].split("://", 1)[1]
        found = glob.glob(str(MEMCG / "kubepods*" / "**" / f"pod{pod['metadata']['uid']}" / cid), recursive=True)
        if not found:
            raise FileNotFoundError(f"no memory cgroup for container {cid} of pod {pod['metadata']['name']}")
        return Path(found[0])

    def usage(self, pod: dict[str, Any]) -> Usage:
        cg = self.cgroup(pod)
        stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
        hwm = 0
        for pid in (cg / "cgroup.procs").read_text().split():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) * 1024)
        return Usage(
            cgroup_peak=int((cg / "memory.max_usage_in_bytes").read_text()),
            vm_hwm=hwm,
            rss=int(stat.get("total_rss", 0)),
            mapped_file=int(stat.get("total_mapped_file", 0)),
            cache=int(stat.get("total_cache", 0)),
            failcnt=int((cg / "memory.failcnt").read_text()),
        )

    def chat(self, pod: dict[str, Any], prompt: str, key: str | None = None, max_tokens: int = 8) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
        code, text = http(f"{self.base_url(pod)}/v1/chat/completions", body, key)
        assert code == 200, f"chat completion: HTTP {code}: {text[:500]}"
        return dict(json.loads(text))

    def wait_gone(self, ns: str, timeout: float = 120) -> None:
        """Delete a namespace and wait until none of its pods holds the node's CPU or memory."""
        self.cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cluster.get_json("-n", ns, "pods", check=False)
            if not out or not out.get("items"):
                return
            time.sleep(1)


def prompt_of(tokens: int) -> str:
    """A prompt of about ``tokens`` tokens (enough to fill a ubatch: the compute buffer's peak)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    return " ".join(words[i % len(words)] for i in range(tokens))


def host_path_dir(ns: str, name: str, sha256: str | None = None) -> Path:
    """Where the operator puts a model's files on the node for ``modelCache.hostPath.path: HOST_CACHE_ROOT``
    (the e2e operator's one allowed root): its own directory, or the content-addressed one of its digest."""
    from _support import HOST_CACHE_ROOT

    return HOST_CACHE_ROOT / (f"sha256-{sha256}" if sha256 else f"{ns}/{name}")


def run(cmd: list[str], timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
