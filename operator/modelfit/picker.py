"""The children of standard routing (``routing.py`` holds their configuration): the InferencePool, the endpoint
picker's Deployment (with Envoy beside it in the standalone topology), its Service, ConfigMap, ServiceAccount and
namespaced RBAC, and, failing open, the headless Service of the pods. Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Any

from . import routing, scaletozero
from .api import ModelDeploymentSpec
from .render import (
    API_KEY_ANNOTATION,
    PORT,
    _container_security,
    _meta,
    digest,
    selector_labels,
)
from .routing import (
    EDGE_PORT,
    GRPC_PORT,
    HEALTH_PORT,
    PICKER_METRICS_PORT,
    PICKER_UID,
    POOL_API_VERSION,
    POOL_KIND,
    PickerProfile,
    picker_labels,
    picker_name,
    pods_service_name,
)
from .settings import DEFAULT as DEFAULT_SETTINGS
from .settings import Settings

CONFIG_ANNOTATION = "modelfit.io/picker-config"  # the ConfigMap's digest: the picker reads it once, at start
PICKER_PARTS = (  # every routing child, for deleting them when routing is turned off: (apiVersion, kind, suffix)
    (POOL_API_VERSION, POOL_KIND, ""),
    ("apps/v1", "Deployment", "-epp"),
    ("v1", "Service", "-epp"),
    ("v1", "ConfigMap", "-epp"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "-epp"),
    ("rbac.authorization.k8s.io/v1", "Role", "-epp"),
    ("v1", "ServiceAccount", "-epp"),
    ("v1", "Service", "-pods"),
    ("networking.k8s.io/v1", "NetworkPolicy", "-epp"),
)


def standalone(spec: ModelDeploymentSpec) -> bool:
    return spec.routing is not None and spec.routing.gateway == "Standalone"


def _picker_meta(md_meta: dict[str, Any], name: str) -> dict[str, Any]:
    meta = _meta(md_meta, name)
    meta["labels"] = {**{k: v for k, v in meta["labels"].items() if k != "modelfit.io/modeldeployment"}}
    meta["labels"].update(picker_labels(md_meta["name"]))
    return meta


def pool(md_meta: dict[str, Any], spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The InferencePool v1 of the model's pods, pointing at its picker."""
    failure = spec.routing.failure_mode if spec.routing is not None else "FailClose"
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": POOL_KIND,
        "metadata": _meta(md_meta, md_meta["name"]),
        "spec": {
            "selector": {"matchLabels": selector_labels(md_meta["name"])},
            "targetPorts": [{"number": PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker_name(md_meta["name"]),
                "port": {"number": GRPC_PORT},
                "failureMode": failure,
            },
        },
    }


def _rbac(md_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """What the picker reads: the pods, its pool, and the optional objectives and rewrites of the inference API."""
    name = picker_name(md_meta["name"])
    read = ["get", "list", "watch"]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _picker_meta(md_meta, name),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _picker_meta(md_meta, name),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": read},
                {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": read},
                {
                    "apiGroups": ["inference.networking.x-k8s.io"],
                    "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                    "verbs": read,
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _picker_meta(md_meta, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": md_meta["namespace"]}],
        },
    ]


def config_map(md_meta: dict[str, Any], spec: ModelDeploymentSpec, prof: PickerProfile) -> dict[str, Any]:
    data = {"epp.yaml": routing.dump_yaml(routing.picker_config(prof))}
    if standalone(spec):
        data["envoy.yaml"] = routing.dump_yaml(routing.envoy_config(md_meta, spec, math.ceil(prof.cold_start_s)))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _picker_meta(md_meta, picker_name(md_meta["name"])),
        "data": data,
    }


def _picker_container(md_meta: dict[str, Any], spec: ModelDeploymentSpec, prof: PickerProfile, image: str) -> Any:
    secure = not standalone(spec)  # standalone: Envoy reaches it on loopback inside the pod
    return {
        "name": "epp",
        "image": image,
        "args": [
            f"--pool-name={md_meta['name']}",
            f"--pool-namespace={md_meta['namespace']}",
            "--config-file=/config/epp.yaml",
            f"--grpc-port={GRPC_PORT}",
            f"--grpc-health-port={HEALTH_PORT}",
            f"--metrics-port={PICKER_METRICS_PORT}",
            f"--secure-serving={str(secure).lower()}",
            "--metrics-endpoint-auth=false",  # the NetworkPolicy confines it; no TokenReview rights needed
            f"--refresh-metrics-interval={int(routing.REFRESH_SECONDS * 1000)}ms",
            f"--metrics-staleness-threshold={int(prof.staleness_s * 1000)}ms",
            "--tracing=false",
            "--zap-encoder=json",
            "--v=1",
        ],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": PICKER_METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "inference-extension"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "inference-extension"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/config", "readOnly": True}],
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _edge_container(spec: ModelDeploymentSpec, image: str) -> dict[str, Any]:
    env: list[dict[str, Any]] = []
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append({"name": "MODELFIT_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return {
        "name": "envoy",
        "image": image,
        "command": ["/usr/local/bin/envoy"],
        "args": [
            "-c",
            "/config/envoy.yaml",
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--base-id-path",
            "/tmp/base-id",
        ],
        "env": env,
        "ports": [{"name": "edge", "containerPort": EDGE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": EDGE_PORT}, "periodSeconds": 2, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [
            {"name": "config", "mountPath": "/config", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def picker_deployment(
    md_meta: dict[str, Any],
    spec: ModelDeploymentSpec,
    prof: PickerProfile,
    config: dict[str, Any],
    api_key_version: str | None,
    settings: Settings,
) -> dict[str, Any]:
    """One picker pod (upstream's default; its state is a cache that refills from scrapes), with Envoy beside
    it when standalone. It goes where the tenant's pods may go (the spec's nodeSelector and tolerations)."""
    name = picker_name(md_meta["name"])
    containers = [_picker_container(md_meta, spec, prof, settings.picker_image or routing.PICKER_IMAGE)]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}}]
    if standalone(spec):
        containers.append(_edge_container(spec, settings.edge_image or routing.EDGE_IMAGE))
        volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}})
    annotations = {CONFIG_ANNOTATION: digest(config["data"])}
    if standalone(spec) and spec.api_key_secret_ref is not None and api_key_version:
        annotations[API_KEY_ANNOTATION] = api_key_version  # a rotated key restarts the edge, not the model
    pod_spec: dict[str, Any] = {
        "serviceAccountName": name,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PICKER_UID,
            "runAsGroup": PICKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    template_labels = {**picker_labels(md_meta["name"]), "app.kubernetes.io/part-of": "modelfit"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _picker_meta(md_meta, name),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": picker_labels(md_meta["name"])},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": template_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def picker_service(md_meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _picker_meta(md_meta, picker_name(md_meta["name"])),
        "spec": {
            "type": "ClusterIP",
            "selector": picker_labels(md_meta["name"]),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "http2"},
                {"name": "metrics", "port": PICKER_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def pods_service(md_meta: dict[str, Any]) -> dict[str, Any]:
    """Headless: Envoy resolves the pods' addresses itself (FailOpen's route), no kube-proxy in between."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(md_meta, pods_service_name(md_meta["name"])),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(md_meta["name"]),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def picker_network_policy(md_meta: dict[str, Any], spec: ModelDeploymentSpec, settings: Settings) -> dict[str, Any]:
    """The picker's pod: the edge port from anywhere (it checks the key), the picker's gRPC from the admin's
    namespaces (an External gateway), its metrics from the admin's namespaces and, for a model that may go to zero,
    the operator's; egress to the API server and the pods is left open (the API server's address is the cluster's
    to know)."""
    admin = [
        {"namespaceSelector": {"matchLabels": {k: v}}}
        for k, _, v in (label.partition("=") for label in settings.network_policy_ingress_namespaces)
    ]
    ingress: list[dict[str, Any]] = []
    if standalone(spec):
        ingress.append({"ports": [{"protocol": "TCP", "port": EDGE_PORT}]})
    if admin:
        ports = [{"protocol": "TCP", "port": PICKER_METRICS_PORT}]
        if not standalone(spec):
            ports.append({"protocol": "TCP", "port": GRPC_PORT})
        ingress.append({"from": admin, "ports": ports})
    if settings.operator_namespace and scaletozero.applies(spec):  # the operator reads who waits at zero
        operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}}}
        ingress.append({"from": [operator], "ports": [{"protocol": "TCP", "port": PICKER_METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _picker_meta(md_meta, picker_name(md_meta["name"])),
        "spec": {
            "podSelector": {"matchLabels": picker_labels(md_meta["name"])},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def objects(
    md_meta: dict[str, Any],
    spec: ModelDeploymentSpec,
    prof: PickerProfile,
    api_key_version: str | None = None,
    settings: Settings = DEFAULT_SETTINGS,
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """(The routing children in apply order, those that must not exist)."""
    name = md_meta["name"]
    config = config_map(md_meta, spec, prof)
    objs = [*_rbac(md_meta), config, picker_service(md_meta)]
    absent: list[tuple[str, str, str]] = []
    fail_open = spec.routing is not None and spec.routing.failure_mode == "FailOpen"
    if fail_open and standalone(spec):
        objs.append(pods_service(md_meta))
    else:
        absent.append(("v1", "Service", pods_service_name(name)))
    if settings.network_policy:
        objs.append(picker_network_policy(md_meta, spec, settings))
    else:
        absent.append(("networking.k8s.io/v1", "NetworkPolicy", picker_name(name)))
    objs.append(picker_deployment(md_meta, spec, prof, config, api_key_version, settings))
    objs.append(pool(md_meta, spec))
    return objs, absent


def all_parts(name: str) -> list[tuple[str, str, str]]:
    """Every routing child of ``name``: what turning routing off deletes."""
    return [(v, k, f"{name}{suffix}") for v, k, suffix in PICKER_PARTS]
