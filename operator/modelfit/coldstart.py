"""A new llama-server pod's cold start: predicted by stage from the model's size and where its file is, and measured
on the pods. Pure: no I/O.

The prediction is what a request held while a model scales from zero waits (the picker's queue TTL, ``routing``) and
what ``status.coldStart`` shows beside the last measured one. Its stages, from the pod's creation to Ready:

- scheduling: bound to a node already present, the sandbox and the containers started (a node a cluster autoscaler
  adds takes minutes more and is not predicted);
- image: 0 -- the images are taken to be on the node (``IfNotPresent``; an earlier pod pulled them); a node's first
  pull adds its download, which is not predicted;
- fetch: the model's download, when the cache is not the node's (emptyDir: every new pod downloads); 0 when a
  hostPath or PVC cache holds it, or the model is on a PVC of its own;
- verify: the downloader's sha256 of the file, on every start (``download.py``: a cached file is checked too); it
  is where a cached file is first read, from disk unless the node's page cache holds it;
- load: llama-server reads (``--load-mode none``) or maps the weights and repacks them, from the page cache the
  verify just filled (a model on its own PVC is not verified: the load reads it from disk);
- warmup: llama-server's context (the KV cache is cleared) and its warm-up run, until it listens;
- probe: the kubelet sees it at the startup probe's next look, at most ``STARTUP_PERIOD_S`` later.

The speeds were measured on this project's CI machine kind (2 vCPUs of an AMD EPYC with SHA-NI and AVX-512, virtio
disk, llama.cpp b11434; see each constant); a node with a faster disk or more cores starts sooner.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

from .api import ColdStartStages, ColdStartStatus, ModelDeploymentSpec

# The llama-server container's startup probe period (render.py): Ready at most this long after the load.
STARTUP_PERIOD_S = 2
# Created -> the llama-server container started, less the init containers' own work: scheduling, the sandbox and
# three container starts; measured on the real node (e2e, containerd + kubelet v1.35 on this machine kind).
SCHEDULING_S = 3.0
IMAGE_S = 0.0
# A Hugging Face download into one pod: not measured here (no internet); a typical CDN stream.
DOWNLOAD_BYTES_PER_S = 50 * 10**6
# sha256 of a file in the page cache by the downloader image's busybox sha256sum (coreutils' is faster).
HASH_BYTES_PER_S = 200 * 10**6
# Sequential read of a file not in the page cache (dd, bs=4M, after POSIX_FADV_DONTNEED / drop_caches).
DISK_BYTES_PER_S = 1000 * 10**6
# llama-server's weight load from the page cache, repack included (log: "loading model" -> "threadpool init").
LOAD_BYTES_PER_S: dict[str, float] = {"none": 500 * 10**6, "mmap": 500 * 10**6, "mlock": 500 * 10**6}
# llama-server's start beyond the weights: context, the KV cache cleared, the warm-up run.
WARMUP_S = 0.3
CLEAR_BYTES_PER_S = 4 * 10**9  # the KV cache is zeroed at context creation (memset)

Place = Literal["download", "node", "volume"]


@dataclass(frozen=True)
class ColdStart:
    """A predicted cold start: each stage in seconds (page cache cold), the warm total, and the words for it."""

    stages: dict[str, float]
    warm_seconds: float  # the same with the file already in the node's page cache
    reasons: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())


@dataclass(frozen=True)
class Measured:
    """A pod's creation to its Ready condition."""

    pod: str
    seconds: float
    ready_at: str


def place(spec: ModelDeploymentSpec) -> Place:
    """Where a new pod finds the model: downloaded into its own emptyDir, in the node's cache (hostPath or the
    model's PVC cache: downloaded once), or on a PVC of the user's (read in place, no download, no check)."""
    if spec.model.pvc is not None:
        return "volume"
    cache = spec.model_cache
    if cache is not None and (cache.host_path is not None or cache.pvc is not None):
        return "node"
    return "download"


def predict(model_bytes: int, spec: ModelDeploymentSpec, load_mode: str = "none", kv_bytes: int = 0) -> ColdStart:
    """The predicted cold start of a new pod of ``spec`` for a file of ``model_bytes`` (see the module docstring):
    ``load_mode`` is the plan's (``--load-mode``), ``kv_bytes`` its KV cache (cleared at start)."""
    if model_bytes < 0 or kv_bytes < 0:
        raise ValueError(f"model_bytes and kv_bytes must be >= 0, got {model_bytes} and {kv_bytes}")
    where = place(spec)
    gb = model_bytes / 1e9
    disk = model_bytes / DISK_BYTES_PER_S
    fetch = model_bytes / DOWNLOAD_BYTES_PER_S if where == "download" else 0.0
    hashing = model_bytes / HASH_BYTES_PER_S if where != "volume" else 0.0
    verify = hashing + (disk if where == "node" else 0.0)  # a downloaded file is in the page cache already
    speed = LOAD_BYTES_PER_S.get(load_mode, LOAD_BYTES_PER_S["none"])
    load = model_bytes / speed + (disk if where == "volume" else 0.0)
    warmup = WARMUP_S + kv_bytes / CLEAR_BYTES_PER_S
    stages = {
        "scheduling": SCHEDULING_S,
        "image": IMAGE_S,
        "fetch": fetch,
        "verify": verify,
        "load": load,
        "warmup": warmup,
        "probe": float(STARTUP_PERIOD_S),
    }
    fetched = {
        "download": f"fetch: {gb:.2f} GB at {DOWNLOAD_BYTES_PER_S / 1e6:.0f} MB/s (no node cache: every new pod "
        "downloads)",
        "node": "fetch: none, the node's cache holds the model (downloaded once)",
        "volume": "fetch: none, the model is read in place from its PVC",
    }[where]
    checked = (
        "verify: none (a model on its own PVC is not checked)"
        if where == "volume"
        else f"verify: sha256 at {HASH_BYTES_PER_S / 1e6:.0f} MB/s on every start"
        + (f", the file read from disk at {DISK_BYTES_PER_S / 1e9:g} GB/s" if where == "node" else "")
    )
    reasons = (
        "image: 0 s, the images are taken to be on the node already (a node's first pull adds its download)",
        fetched,
        checked,
        f"load: {gb:.2f} GB at {speed / 1e9:g} GB/s (--load-mode {load_mode}, from the page cache"
        + (f"; read from disk at {DISK_BYTES_PER_S / 1e9:g} GB/s first)" if where == "volume" else ")"),
        f"probe: the startup probe looks every {STARTUP_PERIOD_S} s",
    )
    cold_read = disk if where in ("node", "volume") else 0.0
    return ColdStart(stages, sum(stages.values()) - cold_read, reasons)


def _time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp of the API (UTC when it names no zone), or None."""
    try:
        at = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)


def measured(pods: list[dict[str, Any]]) -> Measured | None:
    """The newest pod's creation to its Ready condition's last transition, when that pod is Ready (else None: it
    is still starting). The API's timestamps are whole seconds."""
    dated = [(t, p) for p in pods if (t := _time((p.get("metadata") or {}).get("creationTimestamp"))) is not None]
    if not dated:
        return None
    created, pod = max(dated, key=lambda tp: (tp[0], str((tp[1].get("metadata") or {}).get("name"))))
    st = pod.get("status") or {}
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        return None
    at = _time(ready.get("lastTransitionTime"))
    if at is None or at < created:
        return None
    name = str((pod.get("metadata") or {}).get("name") or "")
    return Measured(name, (at - created).total_seconds(), str(ready.get("lastTransitionTime")))


def status(prediction: ColdStart, pods: list[dict[str, Any]], old: ColdStartStatus | None) -> ColdStartStatus:
    """status.coldStart: the prediction (to 0.1 s) and the newest Ready pod's measured start; the last measured one
    is kept while no newer pod is Ready, and a pod once measured is not measured again (a later Ready flip after a
    failed readiness probe is not its start)."""
    out = ColdStartStatus(
        predicted_seconds=round(prediction.seconds, 1),
        predicted_warm_seconds=round(prediction.warm_seconds, 1),
        stages=ColdStartStages(**{k: round(v, 1) for k, v in prediction.stages.items()}),
        reasons=list(prediction.reasons),
    )
    got = measured(pods)
    if got is not None and (old is None or old.last_measured_pod != got.pod):
        out.last_measured_seconds, out.last_measured_pod, out.last_measured_at = got.seconds, got.pod, got.ready_at
    elif old is not None:
        out.last_measured_seconds, out.last_measured_pod = old.last_measured_seconds, old.last_measured_pod
        out.last_measured_at = old.last_measured_at
    return out


__all__ = [
    "STARTUP_PERIOD_S",
    "ColdStart",
    "Measured",
    "measured",
    "place",
    "predict",
    "status",
]
