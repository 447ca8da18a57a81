"""A plan -> the Kubernetes objects that run it. Pure: no I/O.

Children: PersistentVolumeClaim (modelCache.pvc), Deployment, Service and,
with more than one replica, a PodDisruptionBudget; with the admin's
``--network-policy``, a NetworkPolicy. Every child carries the owner reference
and the standard ``app.kubernetes.io/*`` labels.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import api, catalog, scaletozero
from .api import ModelDeploymentSpec
from .cache import host_cache_dir
from .coldstart import STARTUP_PERIOD_S, startup_period
from .download import DIGEST_DIR, DOWNLOAD_SCRIPT, download_env, shard_names
from .memory import LLAMA_CPP_BUILD
from .nodes import GPU_RESOURCES, GiB, MiB, format_memory, parse_quantity
from .placement import Placement
from .routing import GATEWAY_LABELS, picker_labels
from .settings import DEFAULT as DEFAULT_SETTINGS
from .settings import REF_FORMS, REFUSED_NETWORKS, Settings, image_name, pinned

# The only place image tags live. Official llama.cpp server images, pinned to the build the memory model matches.
# Tags, not digests (a digest cannot be looked up offline): an admin pins them, or points them at a private
# mirror, with ``modelfit run --server-image BACKEND=REPO@sha256:...`` and ``--downloader-image``.
IMAGES: dict[str, str] = {
    "cpu": f"ghcr.io/ggml-org/llama.cpp:server-{LLAMA_CPP_BUILD}",
    "cuda": f"ghcr.io/ggml-org/llama.cpp:server-cuda-{LLAMA_CPP_BUILD}",
    "rocm": f"ghcr.io/ggml-org/llama.cpp:server-rocm-{LLAMA_CPP_BUILD}",
    "vulkan": f"ghcr.io/ggml-org/llama.cpp:server-vulkan-{LLAMA_CPP_BUILD}",
}
DOWNLOADER_IMAGE = "docker.io/curlimages/curl:8.11.1"
PORT = 8080
CACHE_DIR = "/models"
SOURCE_DIR = "/model-source"
HASH_ANNOTATION = "modelfit.io/plan-hash"
APPLIED_ANNOTATION = "modelfit.io/applied-hash"
APPLIED_PLAN_ANNOTATION = "modelfit.io/applied-plan"
API_KEY_ANNOTATION = "modelfit.io/api-key-version"  # the pods' API-key Secret resourceVersion
MD_LABEL = "modelfit.io/modeldeployment"
POD_MONITOR_API_VERSION = "monitoring.coreos.com/v1"
UID = 1000


@dataclass(frozen=True)
class ModelFile:
    """Where the GGUF comes from and where llama-server finds it."""

    file_name: str
    url: str | None = None  # None: the file is on a user PVC
    size_bytes: int = 0
    sha256: str | None = None
    pvc_claim: str | None = None
    pvc_path: str | None = None

    @property
    def path(self) -> str:
        if self.pvc_claim:
            return f"{SOURCE_DIR}/{(self.pvc_path or '').lstrip('/')}"
        return f"{CACHE_DIR}/{self.file_name}"


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")


def model_file(spec: ModelDeploymentSpec, size_bytes: int = 0) -> ModelFile:
    m = spec.model
    if m.catalog is not None:
        url = catalog.catalog_url(m.catalog, m.quant or "Q4_K_M")
    elif m.url is not None:
        url = m.url
    elif m.hugging_face is not None:
        hf = m.hugging_face
        url = f"https://huggingface.co/{hf.repo}/resolve/{hf.revision}/{hf.file}"
    else:
        assert m.pvc is not None
        name = m.pvc.path.rsplit("/", 1)[-1]
        return ModelFile(name, None, size_bytes, m.sha256, m.pvc.claim_name, m.pvc.path)
    return ModelFile(cache_file_name(url), url, size_bytes, m.sha256)


def cache_file_name(url: str) -> str:
    """The name the model gets in its cache directory: the URL's last path segment when it is a plain file name
    (the downloader writes exactly there, and llama.cpp finds a split model's shards by their names), else
    ``model.gguf``."""
    name = url.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
    return name if _PLAIN_NAME.fullmatch(name) else "model.gguf"


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llama-server",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "modelfit",
        "app.kubernetes.io/managed-by": "modelfit",
        MD_LABEL: name,
    }


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llama-server", "app.kubernetes.io/instance": name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# A deleted pod's time to leave the routes (EndpointSlices, the gateway's second-by-second lists, the pickers'
# watches: 1-2 s) and to finish what it runs before SIGTERM. Longer holds its requests from the scheduler longer:
# a model woken right after it went to zero on a full node waited 9 s for the old pod with 10 s.
DRAIN_S = 5


def _meta(md_meta: dict[str, Any], name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "namespace": md_meta["namespace"],
        "labels": labels(md_meta["name"]),
        "ownerReferences": [owner_reference(md_meta)],
    }
    if annotations:
        out["annotations"] = annotations
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def startup_failure_threshold(size_bytes: int, period: int = STARTUP_PERIOD_S) -> int:
    """Budget to map and load the weights: a minute plus 30 s per GiB (slow disks), capped at an hour, in probes
    of ``period`` seconds (a short period sees the load end sooner; the budget stays the same)."""
    budget = min(3600, 60 + 30 * math.ceil(size_bytes / GiB))
    return math.ceil(budget / period)


def cache_size(size_bytes: int) -> str:
    return format_memory(int(size_bytes * 1.1) + GiB if size_bytes else 64 * GiB)


def downloader_image(settings: Settings = DEFAULT_SETTINGS) -> str:
    """The init containers' image: the admin's (``--downloader-image``), never a spec's -- ``prepare-cache``
    runs it as root with CAP_CHOWN on a node directory."""
    return settings.downloader_image or DOWNLOADER_IMAGE


def server_image(spec: ModelDeploymentSpec, backend: str, settings: Settings = DEFAULT_SETTINGS) -> str:
    """llama-server's image for ``backend``: the spec's, else the admin's (``--server-image``), else ours."""
    own = getattr(spec.image, backend, None) if spec.image else None
    return own or settings.server_image(backend) or IMAGES[backend]


def image_problem(
    spec: ModelDeploymentSpec, settings: Settings = DEFAULT_SETTINGS, backend: str | None = None
) -> tuple[str, str] | None:
    """Why the spec's pods may not run their images, as (reason, message), or None.

    Every ``spec.image`` entry is checked, whatever the plan's backend (a re-plan may move to another): an image
    reference, from an allowed registry (``--allowed-image-registry``), pinned by digest under
    ``--require-image-digest``. With ``backend`` (the plan's), the server image rendered for it must be pinned
    too, the admin's or the default one. The downloader's is checked once, when the settings are made.
    """
    for name in IMAGES:
        ref = getattr(spec.image, name, None) if spec.image else None
        if not ref:
            continue
        repo = image_name(ref)
        if repo is None:
            return "InvalidSpec", f"spec.image.{name} {ref!r} is not an image reference ({REF_FORMS})"
        if not settings.registry_allowed(ref):
            allowed = ", ".join(settings.allowed_image_registries)
            return "ImageNotAllowed", f"spec.image.{name} {ref} is not from an allowed registry; allowed: {allowed}"
        if settings.require_image_digest and not pinned(ref):
            return "ImageNotAllowed", (
                f"spec.image.{name} {ref} is not pinned by digest, and this operator runs images by digest only: "
                f"use {repo}@sha256:<64 hex>"
            )
    if backend is None or not settings.require_image_digest:
        return None
    ref = server_image(spec, backend, settings)
    if pinned(ref):
        return None
    return "ImageNotAllowed", (
        f"the {backend} server image {ref} is not pinned by digest, and this operator runs images by digest only: "
        f"set spec.image.{backend} to REPO@sha256:<64 hex>, or an admin pins it for every model with "
        f"`modelfit run --server-image {backend}=REPO@sha256:<64 hex>` (chart value images.server.{backend})"
    )


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(
    placement: Placement, spec: ModelDeploymentSpec, honour_memory_override: bool = True
) -> dict[str, dict[str, str]]:
    """The plan's requests and limits, replaced key by key by ``spec.resources``.

    A memory override the operator found too small (see ``memory_override_verdict``) is dropped. A limit
    below the request would make the pod invalid (HTTP 422), so the request follows a lower limit down.
    """
    assert placement.result is not None
    req = dict(placement.result.resources.requests)
    lim = dict(placement.result.resources.limits)
    over_req = dict(spec.resources.requests or {}) if spec.resources else {}
    over_lim = dict(spec.resources.limits or {}) if spec.resources else {}
    if not honour_memory_override:
        over_req.pop("memory", None)
        over_lim.pop("memory", None)
    req.update(over_req)
    lim.update(over_lim)
    for key, value in lim.items():
        if key in req and key not in over_req and parse_quantity(value) < parse_quantity(req[key]):
            req[key] = value
    return {"requests": req, "limits": lim}


def memory_override_bytes(spec: ModelDeploymentSpec) -> int | None:
    """The memory limit (or, without one, request) the user set in ``spec.resources``."""
    if spec.resources is None:
        return None
    value = (spec.resources.limits or {}).get("memory") or (spec.resources.requests or {}).get("memory")
    return int(parse_quantity(value)) if value else None


def memory_override_verdict(placement: Placement, spec: ModelDeploymentSpec, oom_under_override: bool) -> str | None:
    """Why a memory override below the plan is not honoured, or None when it is.

    With ``--load-mode none`` everything is anonymous memory: a limit too small is OOM-killed by the kernel,
    a clear signal, so the override is tried and dropped after its first OOM kill. With mmap the weights are
    clean file pages the kernel can always reclaim: a limit below the plan is never OOM-killed, the pod
    thrashes on page faults (1/18 of its speed, measured), so such an override is never applied.
    """
    assert placement.result is not None
    want = memory_override_bytes(spec)
    need = int(parse_quantity(placement.result.resources.limits["memory"]))
    if want is None or want >= need:
        return None
    have, plan = format_memory(want), format_memory(need)
    if placement.result.plan.load_mode != "none":
        return (
            f"the memory override {have} is below the {plan} the plan needs with mmap; under mmap a tighter limit "
            f"is not OOM-killed but thrashes on page faults, so the planned {plan} is used"
        )
    if oom_under_override:
        return f"the memory override {have} was OOM-killed; the planned {plan} is used instead"
    return None


def _cache_volume(md_meta: dict[str, Any], spec: ModelDeploymentSpec, model: ModelFile) -> dict[str, Any]:
    cache, name = spec.model_cache, md_meta["name"]
    if cache is not None and cache.pvc is not None:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": f"{name}-models"}}
    if cache is not None and cache.host_path is not None:
        split = len(shard_names(model.file_name)) > 1
        path = host_cache_dir(cache.host_path.path, md_meta["namespace"], name, model.sha256, split)
        return {"name": "model-cache", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}
    empty: dict[str, Any] = {"sizeLimit": format_memory(int(model.size_bytes * 1.1) + 512 * MiB)}
    if cache is not None and cache.empty_dir is not None and cache.empty_dir.medium:
        empty["medium"] = cache.empty_dir.medium
    return {"name": "model-cache", "emptyDir": empty}


def _prepare_host_path(image: str) -> dict[str, Any]:
    """Hand the model's own hostPath cache directory (``cache.host_cache_dir``) to the unprivileged downloader.

    The kubelet creates a ``DirectoryOrCreate`` hostPath as root 0755 and fsGroup does not apply to
    hostPath volumes, so uid 1000 could not write the model (curl exit 23 on a real node). This step runs
    as root with only CAP_CHOWN. hostPath volumes are refused by the baseline and restricted Pod Security
    Standards anyway, so a namespace that admits the volume admits this container too.
    """
    script = f'[ "$(stat -c %u {CACHE_DIR})" = {UID} ] || chown {UID}:{UID} {CACHE_DIR}'
    return {
        "name": "prepare-cache",
        "image": image,
        "command": ["/bin/sh", "-c", script],
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_DIR}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _model_volumes(
    md_meta: dict[str, Any], spec: ModelDeploymentSpec, model: ModelFile, image: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(mounts, volumes, init containers) that put the model where llama-server reads it; the init containers
    run ``image``, the admin's downloader (``downloader_image``)."""
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    init: list[dict[str, Any]] = []
    if model.pvc_claim:
        mounts.append({"name": "model-source", "mountPath": SOURCE_DIR, "readOnly": True})
        volumes.append(
            {"name": "model-source", "persistentVolumeClaim": {"claimName": model.pvc_claim, "readOnly": True}}
        )
        return mounts, volumes, init
    mounts.append({"name": "model-cache", "mountPath": CACHE_DIR, "readOnly": True})
    volumes.append(_cache_volume(md_meta, spec, model))
    # The size is checked only when it is the real file's (read from its header); a catalog size is
    # an estimate and a split model's is the sum of its shards.
    exact = spec.model.catalog is None and len(shard_names(model.file_name)) == 1
    env: list[dict[str, Any]] = list(
        download_env(model.url or "", model.path, model.size_bytes if exact else 0, model.sha256)
    )
    token = spec.model.token_secret_ref
    if token is not None:
        # From the Secret at container start: never in the manifest, the args or the logs.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    if volumes[-1].get("hostPath") is not None:
        init.append(_prepare_host_path(image))
    digest_cm = {"name": f"{md_meta['name']}-model-digest", "optional": True}
    volumes.append({"name": "model-digest", "configMap": digest_cm})
    init.append(
        {
            "name": "fetch-model",
            "image": image,
            "command": ["/bin/sh", "-c", DOWNLOAD_SCRIPT],
            "env": env,
            "volumeMounts": [
                {"name": "model-cache", "mountPath": CACHE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "model-digest", "mountPath": DIGEST_DIR, "readOnly": True},
            ],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
            "securityContext": _container_security(),
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
    )
    return mounts, volumes, init


def routed(spec: ModelDeploymentSpec) -> bool:
    """Does an endpoint picker front the pods (``spec.routing.mode`` InferencePool)?"""
    return spec.routing is not None and spec.routing.mode == "InferencePool"


def pod_key(spec: ModelDeploymentSpec) -> bool:
    """Do the pods themselves check the API key? Only without a picker: behind one, the edge does."""
    return spec.api_key_secret_ref is not None and not routed(spec)


def _server_container(
    spec: ModelDeploymentSpec,
    placement: Placement,
    model: ModelFile,
    mounts: list[dict[str, Any]],
    honour_memory_override: bool,
    settings: Settings = DEFAULT_SETTINGS,
) -> dict[str, Any]:
    """The llama-server container: the plan's args, resources and health probes. Behind a picker it runs without
    the API key (the picker scrapes /metrics without one): the edge checks it (``picker.py``)."""
    assert placement.result is not None
    p = placement.result.plan
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    ref = spec.api_key_secret_ref
    if ref is not None and pod_key(spec):
        env.append({"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})

    def probe() -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": "http"}}

    period = startup_period(spec)
    budget_probes = startup_failure_threshold(model.size_bytes, period)
    liveness = {**probe(), "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 6}
    probes: dict[str, Any]
    if scaletozero.applies(spec):
        # A model that may go to zero has a client waiting on every start. The kubelet writes Ready the moment a
        # readiness probe passes, while a passed startup probe waits for its next pod sync (up to a PLEG relist,
        # about 1 s) before readiness is even looked at: so no startup probe, readiness every second (llama-server
        # answers /health at once, 503 while it loads), and liveness held off for the same load budget.
        probes = {
            "readinessProbe": {**probe(), "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 10},
            "livenessProbe": {**liveness, "initialDelaySeconds": budget_probes * period},
        }
    else:
        probes = {
            # Ready within a period of the load (coldstart: the probe stage); the load's budget stays the same
            "startupProbe": {**probe(), "periodSeconds": period, "failureThreshold": budget_probes},
            "readinessProbe": {**probe(), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
            "livenessProbe": liveness,
        }

    return {
        "name": "llama-server",
        "image": server_image(spec, p.backend, settings),
        "args": [*p.args, *(spec.server_args or [])],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(placement, spec, honour_memory_override),
        **probes,
        # A deleted pod keeps serving while the EndpointSlices, the gateway and the pickers stop sending to it:
        # what it runs finishes, what comes meanwhile is answered (llama-server stops at SIGTERM, cutting
        # requests; the gateway retries one cut before its answer began)
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_S}}},
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def deployment(
    md_meta: dict[str, Any],
    spec: ModelDeploymentSpec,
    placement: Placement,
    model: ModelFile,
    honour_memory_override: bool = True,
    surge: bool = False,
    api_key_version: str | None = None,
    settings: Settings = DEFAULT_SETTINGS,
) -> dict[str, Any]:
    """The llama-server Deployment of a plan: pinned to the plan's node class, restricted security context.

    ``api_key_version``: the API-key Secret's resourceVersion. llama-server reads its key once, at start, so
    the pod template carries it: a rotated key rolls the pods (surge where the plan has room), and the old
    key stops working when the last old pod is gone."""
    assert placement.result is not None
    name = md_meta["name"]
    mounts, volumes, init = _model_volumes(md_meta, spec, model, downloader_image(settings))
    container = _server_container(spec, placement, model, mounts, honour_memory_override, settings)
    tolerations = list(spec.tolerations or [])
    for gpu_key in GPU_RESOURCES:  # a pod that asks for a vendor's GPUs tolerates that vendor's GPU taint
        if gpu_key in placement.result.resources.requests:
            tolerations.append({"key": gpu_key, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "nodeSelector": {**(spec.node_selector or {}), **placement.selector},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init,
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if not init:
        del pod_spec["initContainers"]
    # Annotation-based scraping cannot authenticate: with an API key /metrics answers 401, so the
    # pods are scraped through the PodMonitor (Bearer token from the same Secret) instead.
    pod_annotations = (
        {"prometheus.io/scrape": "false"}
        if pod_key(spec)
        else {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    )
    cache_volume = next((v for v in volumes if v["name"] == "model-cache"), {})
    if cache_volume.get("emptyDir") is not None:
        # The cluster autoscaler keeps a node with an emptyDir pod unless it is marked safe to evict. Any replica
        # count: the annotation must not change when the model scales (that would roll its pods); with more than
        # one replica the disruption budget keeps the others serving, a single replica moves with a cold start.
        pod_annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] = "true"
    if pod_key(spec) and api_key_version:
        pod_annotations[API_KEY_ANNOTATION] = api_key_version
    template = {"metadata": {"labels": labels(name), "annotations": pod_annotations}, "spec": pod_spec}
    template["metadata"]["annotations"][HASH_ANNOTATION] = digest(template)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(md_meta, name),
        "spec": {
            "replicas": desired_replicas(spec),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling_update(surge)},
            "template": template,
        },
    }


def desired_replicas(spec: ModelDeploymentSpec) -> int:
    """spec.replicas; under autoscaling kept within its bounds (the HPA writes spec.replicas, minReplicas holds
    from the start)."""
    a = spec.autoscaling
    return spec.replicas if a is None else min(max(spec.replicas, a.min_replicas), a.max_replicas)


def rolling_update(surge: bool) -> dict[str, int]:
    """Surge: the new pod starts before an old one stops, so serving never stops (needs room for one more pod).
    Replace: an old pod stops first, for a node class that cannot hold the old and the new pod at once."""
    return {"maxSurge": 1, "maxUnavailable": 0} if surge else {"maxSurge": 0, "maxUnavailable": 1}


def service(md_meta: dict[str, Any], spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The model's Service: to the pods, or, when a standalone picker fronts them, to its Envoy (same name and
    port: clients keep their URL, and no path to the keyless pods goes around the edge)."""
    svc = spec.service or api.ServiceSpec()
    edge = routed(spec) and spec.routing is not None and spec.routing.gateway == "Standalone"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {
            "type": svc.type,
            "selector": picker_labels(md_meta["name"]) if edge else selector_labels(md_meta["name"]),
            "ports": [{"name": "http", "port": svc.port, "targetPort": "edge" if edge else "http", "protocol": "TCP"}],
        },
    }


def pvc(md_meta: dict[str, Any], spec: ModelDeploymentSpec, model: ModelFile) -> dict[str, Any] | None:
    if spec.model_cache is None or spec.model_cache.pvc is None or model.pvc_claim:
        return None
    c = spec.model_cache.pvc
    body: dict[str, Any] = {
        "accessModes": [c.access_mode],
        "resources": {"requests": {"storage": c.size or cache_size(model.size_bytes)}},
    }
    if c.storage_class:
        body["storageClassName"] = c.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(md_meta, f"{md_meta['name']}-models"),
        "spec": body,
    }


def pod_monitor(md_meta: dict[str, Any], spec: ModelDeploymentSpec) -> dict[str, Any]:
    """A Prometheus Operator PodMonitor for llama-server's /metrics, authenticated when an API key is set."""
    endpoint: dict[str, Any] = {"port": "http", "path": "/metrics", "interval": "15s"}  # HPA metrics: react fast
    ref = spec.api_key_secret_ref
    if ref is not None and pod_key(spec):
        endpoint["authorization"] = {"type": "Bearer", "credentials": {"name": ref.name, "key": ref.key}}
    return {
        "apiVersion": POD_MONITOR_API_VERSION,
        "kind": "PodMonitor",
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {"selector": {"matchLabels": selector_labels(md_meta["name"])}, "podMetricsEndpoints": [endpoint]},
    }


HPA_METRIC = "llamacpp_requests_inflight"  # processing + deferred requests of a pod (the adapter rule's name)


def hpa_target_milli(parallel: int, utilization: int) -> int:
    """The per-pod target of the HPA metric in milli-requests: parallel slots x utilization, at least 100m."""
    return max(100, parallel * utilization * 10)


def hpa(md_meta: dict[str, Any], spec: ModelDeploymentSpec, parallel: int, metric: str) -> dict[str, Any] | None:
    """An autoscaling/v2 HPA on the ModelDeployment's /scale subresource (so every replica the HPA adds goes
    through the operator's placement), with one Pods metric any custom-metrics adapter can serve."""
    a = spec.autoscaling
    if a is None:
        return None
    target = hpa_target_milli(parallel, a.target_utilization)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {
            "scaleTargetRef": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": md_meta["name"]},
            # An HPA's floor is 1 (0 needs the alpha HPAScaleToZero); at zero (spec.replicas 0, written by the
            # operator's scale to zero) the HPA stands aside until a pod is woken.
            "minReplicas": max(1, a.min_replicas),
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": metric},
                        "target": {"type": "AverageValue", "averageValue": f"{target}m"},
                    },
                }
            ],
            # Kubernetes' own default rates (up: double or +4 pods per 15 s, down: all surplus per 15 s);
            # the stabilization windows are the spec's.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": a.scale_up_stabilization_seconds,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": a.scale_down_stabilization_seconds,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
                },
            },
        },
    }


def pdb(md_meta: dict[str, Any], spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    """One pod at a time may be evicted, when there can be more than one (a single replica has no budget that
    would not block every drain)."""
    most = max(spec.replicas, spec.autoscaling.max_replicas if spec.autoscaling else 0)
    if most <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(md_meta["name"])},
            # A pod that is not Ready (still loading, or failing) never blocks a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _ip_block(cidr: Network, refused: list[Network]) -> dict[str, Any] | None:
    """An ipBlock of ``cidr`` without the ``refused`` networks inside it (None: all of it is refused)."""
    inside = [n for n in refused if n.version == cidr.version and n.subnet_of(cidr)]  # type: ignore[arg-type]
    if cidr in inside:
        return None
    block: dict[str, Any] = {"cidr": str(cidr)}
    if inside:
        block["except"] = sorted({str(n) for n in inside})
    return block


def egress_blocks(settings: Settings = DEFAULT_SETTINGS) -> list[dict[str, Any]]:
    """Where a model's pods may connect: what the operator's own header reads may reach (``refused_address``).

    Everywhere but loopback, link-local and unspecified (``REFUSED_NETWORKS``) and the admin's denied
    networks (the cluster's pod and service ranges), plus each allowed network without the denied networks
    more specific than it (a tie is refused, as ``refused_address`` refuses it).
    """
    deny = [ipaddress.ip_network(n, strict=False) for n in settings.deny_networks]
    blocks = [_ip_block(cidr, [*(n for n, _ in REFUSED_NETWORKS), *deny]) for cidr in _ANYWHERE]
    for text in settings.allow_networks:
        allowed = ipaddress.ip_network(text, strict=False)
        blocks.append(_ip_block(allowed, [n for n in deny if n.prefixlen >= allowed.prefixlen]))
    return [{"ipBlock": b} for b in blocks if b is not None]


def network_policy(
    md_meta: dict[str, Any], model: ModelFile, settings: Settings = DEFAULT_SETTINGS, behind_picker: bool = False
) -> dict[str, Any]:
    """The model's pods, fenced in: ingress to llama-server's port from the pods of its own namespace and of the
    admin's namespaces (``--network-policy-ingress-namespace-label``: a gateway, Prometheus); egress to DNS,
    and for a downloaded model TCP on any port (a mirror may serve on any) to ``egress_blocks``. A model on a
    PVC downloads nothing and gets no egress at all: llama-server itself connects nowhere. Behind a picker the
    pods run without a key: only the picker's pod (the picker and its Envoy) and the admin's namespaces.
    """
    own = {"podSelector": {"matchLabels": picker_labels(md_meta["name"])}} if behind_picker else {"podSelector": {}}
    peers: list[dict[str, Any]] = [own]
    for label in settings.network_policy_ingress_namespaces:
        key, _, value = label.partition("=")
        peers.append({"namespaceSelector": {"matchLabels": {key: value}}})
    if settings.gateway_namespace and not behind_picker:  # behind a picker the gateway reaches the edge instead
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.gateway_namespace}},
                "podSelector": {"matchLabels": dict(GATEWAY_LABELS)},
            }
        )
    egress: list[dict[str, Any]] = []
    if not model.pvc_claim:
        dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        egress = [{"ports": dns}, {"to": egress_blocks(settings), "ports": [{"protocol": "TCP"}]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(md_meta["name"])},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": PORT}]}],
            "egress": egress,
        },
    }


@dataclass
class Rendered:
    objects: list[dict[str, Any]]  # in apply order
    absent: list[tuple[str, str, str]]  # (apiVersion, kind, name) that must not exist
    hash: str  # the plan's hash: every child, the Deployment's replica count excluded (scaling is not a new plan)
    applied: str = ""  # every child as applied, replicas included: what the Deployment's annotation records

    def by_kind(self, kind: str) -> dict[str, Any] | None:
        """The model's own child of this kind (the llama-server Deployment, not the endpoint picker's)."""
        mine = (o for o in self.objects if o["kind"] == kind and not _is_picker_child(o))
        return next(mine, None)


def _is_picker_child(obj: dict[str, Any]) -> bool:
    return bool((obj["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "endpoint-picker")


def digest_config_map(md_meta: dict[str, Any], digests: list[str] | None) -> dict[str, Any]:
    """The digests every download of the model is held to (``status.modelDigest``), as the fetch-model container
    reads them: a ConfigMap, so that recording them after the first pod changes no pod template (no roll)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(md_meta, f"{md_meta['name']}-model-digest"),
        "data": {"sha256": "".join(f"{d}\n" for d in digests or [])},
    }


def _without_key_version(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the plan hash sees it: a rotated API key rolls the pods but is not a new plan."""
    if obj["kind"] != "Deployment":
        return obj
    template: dict[str, Any] = obj["spec"]["template"]
    annotations: dict[str, str] = template["metadata"].get("annotations") or {}
    if API_KEY_ANNOTATION not in annotations:
        return obj
    kept = {k: v for k, v in annotations.items() if k not in (API_KEY_ANNOTATION, HASH_ANNOTATION)}
    metadata = {**template["metadata"], "annotations": kept}
    return {**obj, "spec": {**obj["spec"], "template": {**template, "metadata": metadata}}}


def render(
    md_meta: dict[str, Any],
    spec: ModelDeploymentSpec,
    placement: Placement,
    model: ModelFile,
    *,
    with_pod_monitor: bool = False,
    honour_memory_override: bool = True,
    surge: bool = False,
    hpa_metric: str = HPA_METRIC,
    api_key_version: str | None = None,
    model_digests: list[str] | None = None,
    settings: Settings = DEFAULT_SETTINGS,
    picker_children: tuple[list[dict[str, Any]], list[tuple[str, str, str]]] | None = None,
    gone_picker: list[tuple[str, str, str]] | None = None,
) -> Rendered:
    """Every child of a ModelDeployment for a fitting placement.

    ``with_pod_monitor``: the cluster serves monitoring.coreos.com/v1 PodMonitors (the shell checks).
    ``surge``: roll out new pods before old ones stop (see ``rolling_update``).
    ``settings``: the admin's images and NetworkPolicy switch (``image_problem`` says what is refused).
    ``picker_children``: the routing children and those that must not exist (``picker.objects``), when a picker
    fronts the pods; else ``gone_picker``: the routing children to delete (routing was on).
    """
    name = md_meta["name"]
    if picker_children is None and spec.routing is not None:
        spec = spec.model_copy(update={"routing": None})  # no picker (yet): the pods keep the key, the Service
    objs: list[dict[str, Any]] = []
    absent: list[tuple[str, str, str]] = []
    claim = pvc(md_meta, spec, model)
    if claim is not None:
        objs.append(claim)
    deploy = deployment(
        md_meta, spec, placement, model, honour_memory_override, surge, api_key_version, settings=settings
    )
    objs.append(deploy)
    objs.append(service(md_meta, spec))
    if with_pod_monitor:
        objs.append(pod_monitor(md_meta, spec))
    budget = pdb(md_meta, spec)
    if budget is not None:
        objs.append(budget)
    else:
        absent.append(("policy/v1", "PodDisruptionBudget", name))
    autoscaler = hpa(md_meta, spec, placement.result.plan.parallel if placement.result else 1, hpa_metric)
    if autoscaler is not None:
        objs.append(autoscaler)
    else:
        absent.append(("autoscaling/v2", "HorizontalPodAutoscaler", name))
    behind_picker = picker_children is not None
    if settings.network_policy or (behind_picker and spec.api_key_secret_ref is not None):
        # Keyless pods behind a picker with a key at the edge: the policy is what keeps the key meaningful.
        objs.append(network_policy(md_meta, model, settings, behind_picker))
    else:
        absent.append(("networking.k8s.io/v1", "NetworkPolicy", name))
    replicas = deploy["spec"].pop("replicas")
    if model.url is not None:
        objs.insert(0, digest_config_map(md_meta, model_digests))
    else:
        absent.append(("v1", "ConfigMap", f"{name}-model-digest"))
    # Neither the budget nor the recorded digests are a new plan (the digests reach new pods without a roll).
    # Nor is the NetworkPolicy: turning it on or off applies it, it does not re-plan.
    unplanned = ("PodDisruptionBudget", "ConfigMap", "NetworkPolicy")
    plan_hash = digest([_without_key_version(o) for o in objs if o["kind"] not in unplanned])
    deploy["spec"]["replicas"] = replicas
    # The picker's children are derived from the plan but are not a new plan of the pods (no PlanChanged).
    if picker_children is not None:
        objs += picker_children[0]
        absent += picker_children[1]
    else:
        absent += gone_picker or []
    applied = digest(objs)
    deploy["metadata"]["annotations"] = {APPLIED_ANNOTATION: applied, APPLIED_PLAN_ANNOTATION: plan_hash}
    return Rendered(objs, absent, plan_hash, applied)
