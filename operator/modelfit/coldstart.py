"""A new llama-server pod's cold start: predicted by stage from the model's size and where its file is, and measured
on the pods. Pure: no I/O.

The prediction is what a request held while a model scales from zero waits (the picker's queue TTL, ``routing``) and
what ``status.coldStart`` shows beside the last measured one. Its stages, from the pod's creation to Ready:

- scheduling: bound to a node already present, the sandbox, and a second per init container until llama-server
  starts (the kubelet's relist; a node a cluster autoscaler adds takes minutes more and is not predicted);
- image: 0 -- the images are taken to be on the node (``IfNotPresent``; an earlier pod pulled them); a node's first
  pull adds its download, which is not predicted;
- fetch: the model's download, when the cache is not the node's (emptyDir: every new pod downloads); 0 when a
  hostPath or PVC cache holds it, or the model is on a PVC of its own;
- verify: the downloader's sha256 of a download (in the page cache as it lands); a node's cached file was hashed
  once, after its download, and a later start trusts the stamp written then while the file is unchanged
  (``download.py``); a model on its own PVC is not checked;
- load: llama-server reads (``--load-mode none``) or maps the weights and repacks them: a download from the page
  cache, a cached file or a PVC's from disk unless the node's page cache holds it (the warm prediction);
- warmup: llama-server's context (the KV cache is cleared) and its warm-up run, until it listens;
- probe: the kubelet sees it at the probe's next look, at most ``startup_period`` later: 1 s for a model that may go
  to zero (its readiness probe, Ready at once), else 2 s (the startup probe; readiness follows at the next pod sync).

The speeds were measured on this project's CI machine kind (see the constants); a node with a faster disk or more
cores starts sooner.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

from . import scaletozero
from .api import ColdStartStages, ColdStartStatus, ModelDeploymentSpec

# The llama-server container's startup probe period (render.py): Ready at most this long after the load.
STARTUP_PERIOD_S = 2
# A model that may go to zero has a client waiting on every start: no startup probe, its readiness probe looks every
# second and the kubelet writes Ready the moment it passes (render.py).
ZERO_STARTUP_PERIOD_S = 1
# Measured on this project's CI machine kind (2 vCPUs of an AMD EPYC, virtio disk, 23 GiB; llama.cpp b11434, its
# CPU build): bench runs of llama-server against synth models with the file evicted (POSIX_FADV_DONTNEED) or in the
# page cache, and pods of the real-node e2e (containerd, kubelet v1.35.4). The e2e's downloader is Debian's busybox
# 1.35; a busybox built with SHA-NI hashes several times faster.
#
# Created -> the first container started: the scheduler's bind, the sandbox and its network. Real node (kubelet log,
# bench/coldstart_stages.py): within 0.6-1.6 s of a held request, the PLEG's relist included.
SCHEDULING_S = 0.5
# Each init container costs one relist of the kubelet's PLEG (generic PLEG: every second): the kubelet starts the
# next container only in the pod sync after a relist saw the last one exit. The real node's kubelet log shows the
# cache's owner set, the file's stamp checked and llama-server started exactly 1.0 s apart (issue 16).
RELIST_S = 1.0
IMAGE_S = 0.0
# A Hugging Face download into one pod: not measured (no internet here); a typical CDN stream.
DOWNLOAD_BYTES_PER_S = 50 * 10**6
# busybox sha256sum, file in the page cache: 1.32 GB in 5.8-5.9 s (coreutils: 3.6-3.9 s).
HASH_BYTES_PER_S = 220 * 10**6
# llama-server reading a file not in the page cache, beyond its load from the page cache: 1.6-2.0 GB/s with
# --load-mode none, 0.6-2.2 GB/s through mmap's page faults.
DISK_BYTES_PER_S = 1000 * 10**6
# llama-server's weights from the page cache, repack included (log "loading model" -> "threadpool init"): Q4_0 and
# Q4_K_M (repacked for AVX-512) 0.53-0.54 GB/s with --load-mode none, 0.68-0.77 GB/s with mmap. Q8_0 and F16 load
# faster (1.3-1.4 and 4.6-4.8 GB/s): predicted at the Q4 speed, the seed's and the catalog's default quants.
LOAD_BYTES_PER_S: dict[str, float] = {"none": 500 * 10**6, "mmap": 700 * 10**6, "mlock": 700 * 10**6}
# Context and warm-up run ("threadpool init" -> "model loaded"): 0.01 s for a 3 MB model, 0.09 s at 0.5 GB, 0.18 s
# at 1.3 GB, 0.23-0.26 s at 2 GB: the warm-up reads every weight once.
WARMUP_S = 0.05
WARMUP_BYTES_PER_S = 10 * 10**9
# The KV cache is cleared at context creation: its memory touched for the first time. The seed's 1.7 GB (q8_0,
# 262144 tokens) added 1.0-1.5 s, a 3.2 GB f16 one 5-6 s (this VM's first touch of guest memory; 0.4 GB: 0.1 s).
CLEAR_BYTES_PER_S = 1000 * 10**6

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


def init_containers(spec: ModelDeploymentSpec) -> int:
    """How many init containers a pod of ``spec`` runs before llama-server (render.py): none for a model on its own
    PVC; the download (or the cached file's check), after the hostPath cache's owner is set when the cache is one."""
    if place(spec) == "volume":
        return 0
    cache = spec.model_cache
    return 2 if cache is not None and cache.host_path is not None else 1


def startup_period(spec: ModelDeploymentSpec) -> int:
    """How often the llama-server container's probe looks while it loads (render.py): 1 s for a model that may go to
    zero (autoscaling.minReplicas 0: a held request waits on every start; its readiness probe), else 2 s (its
    startup probe)."""
    return ZERO_STARTUP_PERIOD_S if scaletozero.applies(spec) else STARTUP_PERIOD_S


def predict(model_bytes: int, spec: ModelDeploymentSpec, load_mode: str = "none", kv_bytes: int = 0) -> ColdStart:
    """The predicted cold start of a new pod of ``spec`` for a file of ``model_bytes`` (see the module docstring):
    ``load_mode`` is the plan's (``--load-mode``), ``kv_bytes`` its KV cache (cleared at start)."""
    if model_bytes < 0 or kv_bytes < 0:
        raise ValueError(f"model_bytes and kv_bytes must be >= 0, got {model_bytes} and {kv_bytes}")
    where = place(spec)
    gb = model_bytes / 1e9
    fetch = model_bytes / DOWNLOAD_BYTES_PER_S if where == "download" else 0.0
    # A download is hashed as it lands (in the page cache). A node's cached file was hashed once, after its
    # download; a later start trusts the stamp written then (``download.py``): the load reads it, from disk
    # unless the page cache holds it. A model on its own PVC is read in place, unchecked.
    verify = model_bytes / HASH_BYTES_PER_S if where == "download" else 0.0
    speed = LOAD_BYTES_PER_S.get(load_mode, LOAD_BYTES_PER_S["none"])
    disk = model_bytes / DISK_BYTES_PER_S if where != "download" else 0.0
    load = model_bytes / speed + disk
    warmup = WARMUP_S + model_bytes / WARMUP_BYTES_PER_S + kv_bytes / CLEAR_BYTES_PER_S
    stages = {
        "scheduling": SCHEDULING_S + RELIST_S * init_containers(spec),
        "image": IMAGE_S,
        "fetch": fetch,
        "verify": verify,
        "load": load,
        "warmup": warmup,
        "probe": float(startup_period(spec)),
    }
    fetched = {
        "download": f"fetch: {gb:.2f} GB at {DOWNLOAD_BYTES_PER_S / 1e6:.0f} MB/s (no node cache: every new pod "
        "downloads)",
        "node": "fetch: none, the node's cache holds the model (downloaded once)",
        "volume": "fetch: none, the model is read in place from its PVC",
    }[where]
    checked = {
        "download": f"verify: sha256 of the download at {HASH_BYTES_PER_S / 1e6:.0f} MB/s (in the page cache)",
        "node": "verify: none on a wake; the cached file was hashed once, after its download, and a start trusts "
        "the stamp written then while the file is unchanged (size, ctime, inode)",
        "volume": "verify: none (a model on its own PVC is not checked)",
    }[where]
    reasons = (
        f"scheduling: {SCHEDULING_S:g} s on a node already present (a new node takes minutes more), and "
        f"{RELIST_S:g} s for each of its {init_containers(spec)} init container(s) (the kubelet starts the next "
        "container after its next look at the runtime, every second)",
        "image: 0 s, the images are taken to be on the node already (a node's first pull adds its download)",
        fetched,
        checked,
        f"load: {gb:.2f} GB at {speed / 1e9:g} GB/s (--load-mode {load_mode}, from the page cache"
        + (
            f"; read from disk at {DISK_BYTES_PER_S / 1e9:g} GB/s first when it does not hold the file)"
            if disk
            else ")"
        ),
        f"warmup: context ({kv_bytes / 1e9:.2f} GB of KV cache cleared) and llama-server's warm-up run",
        f"probe: the {'readiness' if scaletozero.applies(spec) else 'startup'} probe looks every "
        f"{startup_period(spec)} s",
    )
    return ColdStart(stages, sum(stages.values()) - disk, reasons)


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
    "RELIST_S",
    "SCHEDULING_S",
    "STARTUP_PERIOD_S",
    "ZERO_STARTUP_PERIOD_S",
    "ColdStart",
    "Measured",
    "init_containers",
    "measured",
    "place",
    "predict",
    "startup_period",
    "status",
]
