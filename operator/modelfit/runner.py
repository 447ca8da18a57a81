"""`modelfit run`: the operator process (kopf) with liveness, Prometheus metrics and structured logs."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .nodes import NodeShape
    from .settings import Settings


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers, metrics
    from .reconciler import STATE

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    STATE.node_shapes = node_shapes(args.node_shapes)
    if STATE.node_shapes:
        names = ", ".join(s.name for s in STATE.node_shapes)
        logging.getLogger("modelfit").info(f"node shapes a cluster autoscaler can add: {names}")
    STATE.hpa_metric = args.hpa_metric or os.environ.get("MODELFIT_HPA_METRIC") or STATE.hpa_metric
    STATE.settings = settings(args)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    leadership = None
    if args.leader_elect:
        from .leader import Leadership, exit_now, standby_liveness

        namespace = args.leader_elect_namespace or os.environ.get("POD_NAMESPACE") or "default"
        leadership = Leadership(args.leader_elect_id, namespace)
        stop_liveness = standby_liveness(args.liveness)
        try:
            leadership.acquire(on_lost=exit_now)
        finally:
            stop_liveness()  # kopf serves it from here on
    clusterwide = args.all_namespaces or not args.namespace
    try:
        kopf.run(
            standalone=args.standalone,
            clusterwide=clusterwide,
            namespaces=[] if clusterwide else args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    finally:
        if leadership is not None:
            leadership.release()
    del handlers  # imported for its decorators
    return 0


def node_shapes(path: str | None) -> list[NodeShape]:
    """The node shapes of ``--node-shapes`` (else $MODELFIT_NODE_SHAPES); none when neither is set."""
    from .host import load_node_shapes

    path = path or os.environ.get("MODELFIT_NODE_SHAPES") or None
    if not path:
        return []
    try:
        return load_node_shapes(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"argument --node-shapes: {path}: {exc}") from exc


def settings(args: argparse.Namespace) -> Settings:
    """The admin's settings from the flags, else their $MODELFIT_* variables (comma-separated lists; a switch
    is on for true, 1 or yes)."""
    from .settings import Settings

    def listed(values: list[str] | None, env: str) -> tuple[str, ...]:
        if values:
            return tuple(values)
        return tuple(v.strip() for v in os.environ.get(env, "").split(",") if v.strip())

    def switch(value: bool | None, env: str) -> bool:
        if value is not None:
            return value
        raw = os.environ.get(env, "").strip().lower()
        if raw not in ("", "true", "1", "yes", "false", "0", "no"):
            raise ValueError(f"${env}={raw!r} is not true or false")
        return raw in ("true", "1", "yes")

    def pairs(values: tuple[str, ...], flag: str) -> tuple[tuple[str, str], ...]:
        out = []
        for value in values:
            backend, eq, ref = value.partition("=")
            if not eq:
                raise ValueError(f"{flag} {value!r} is not BACKEND=IMAGE")
            out.append((backend.strip(), ref.strip()))
        return tuple(out)

    try:
        return Settings(
            host_path_roots=listed(args.host_path_root, "MODELFIT_HOST_PATH_ROOTS"),
            allow_networks=listed(args.allow_network, "MODELFIT_ALLOW_NETWORKS"),
            deny_networks=listed(args.deny_network, "MODELFIT_DENY_NETWORKS"),
            downloader_image=args.downloader_image or os.environ.get("MODELFIT_DOWNLOADER_IMAGE") or None,
            picker_image=args.picker_image or os.environ.get("MODELFIT_PICKER_IMAGE") or None,
            edge_image=args.edge_image or os.environ.get("MODELFIT_EDGE_IMAGE") or None,
            server_images=pairs(listed(args.server_image, "MODELFIT_SERVER_IMAGES"), "--server-image"),
            require_image_digest=switch(args.require_image_digest, "MODELFIT_REQUIRE_IMAGE_DIGEST"),
            allowed_image_registries=listed(args.allowed_image_registry, "MODELFIT_ALLOWED_IMAGE_REGISTRIES"),
            network_policy=switch(args.network_policy, "MODELFIT_NETWORK_POLICY"),
            network_policy_ingress_namespaces=listed(
                args.network_policy_ingress_namespace_label, "MODELFIT_NETWORK_POLICY_INGRESS_NAMESPACE_LABELS"
            ),
            operator_namespace=os.environ.get("POD_NAMESPACE") or None,
            gateway_namespace=args.gateway_namespace or os.environ.get("MODELFIT_GATEWAY_NAMESPACE") or None,
        )
    except ValueError as exc:
        raise ValueError(f"operator settings: {exc}") from exc


def register(sub: Any) -> None:
    sp = sub.add_parser("run", help="run the ModelDeployment operator")
    scope = sp.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)")
    sp.add_argument(
        "--standalone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run without kopf peering (default); --no-standalone coordinates replicas via peering",
    )
    sp.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL ('' to disable)")
    sp.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0 to disable)")
    sp.add_argument("--log-format", choices=["json", "plain"], default="json", help="log format (default json)")
    sp.add_argument(
        "--node-shapes",
        metavar="FILE",
        help="YAML list of node shapes a cluster autoscaler can add (name, labels, cpu, memory[, gpus, gpuMemory]); "
        "when no present node fits, the Deployment is sized for the smallest fitting shape and pinned to its labels "
        "(default $MODELFIT_NODE_SHAPES)",
    )
    sp.add_argument(
        "--hpa-metric",
        metavar="NAME",
        help="per-pod custom metric of the HPAs rendered for spec.autoscaling: requests in flight plus deferred, "
        "as your metrics adapter names it (default llamacpp_requests_inflight, or $MODELFIT_HPA_METRIC)",
    )
    sp.add_argument(
        "--host-path-root",
        action="append",
        metavar="DIR",
        help="a node directory under which spec.modelCache.hostPath caches may live (repeatable; default none: "
        "hostPath caches are refused; $MODELFIT_HOST_PATH_ROOTS, comma-separated)",
    )
    sp.add_argument(
        "--allow-network",
        action="append",
        metavar="CIDR",
        help="let model header reads reach this network although it is refused by default (loopback, link-local, "
        "unspecified); repeatable ($MODELFIT_ALLOW_NETWORKS)",
    )
    sp.add_argument(
        "--deny-network",
        action="append",
        metavar="CIDR",
        help="refuse model header reads to this network too, e.g. the cluster's pod and service ranges; "
        "repeatable ($MODELFIT_DENY_NETWORKS)",
    )
    sp.add_argument(
        "--downloader-image",
        metavar="REF",
        help="image of the init containers that fetch the model (curl and a POSIX shell; the cache-preparing one "
        "runs as root with CAP_CHOWN, so only this setting, never a spec, names it): REPO:TAG, REPO@sha256:<64 hex> "
        "or REPO:TAG@sha256:<64 hex>, e.g. a private mirror's (default docker.io/curlimages/curl:8.11.1; "
        "$MODELFIT_DOWNLOADER_IMAGE)",
    )
    sp.add_argument(
        "--picker-image",
        metavar="REF",
        help="the endpoint picker's image for spec.routing InferencePool (default "
        "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0; $MODELFIT_PICKER_IMAGE)",
    )
    sp.add_argument(
        "--edge-image",
        metavar="REF",
        help="the Envoy beside the picker (default docker.io/envoyproxy/envoy:v1.40.0; $MODELFIT_EDGE_IMAGE)",
    )
    sp.add_argument(
        "--server-image",
        action="append",
        metavar="BACKEND=REF",
        help="llama-server image for a backend (cpu, cuda, rocm, vulkan) where a spec sets none, e.g. a private "
        "mirror's or one pinned by digest; repeatable (default the official ghcr.io/ggml-org/llama.cpp server "
        "images; $MODELFIT_SERVER_IMAGES, comma-separated)",
    )
    sp.add_argument(
        "--require-image-digest",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every image a model's pods run is pinned by digest (REPO@sha256:...): a spec.image with a tag only "
        "is refused (condition Planned=False, reason ImageNotAllowed), and so is a model whose backend's server "
        "image is not pinned (pin the defaults with --server-image); the downloader image must be pinned for the "
        "operator to start (default off; $MODELFIT_REQUIRE_IMAGE_DIGEST)",
    )
    sp.add_argument(
        "--allowed-image-registry",
        action="append",
        metavar="PREFIX",
        help="a registry (registry.example.com) or a path under one (registry.example.com/team, docker.io/library) "
        "that spec.image may use; repeatable (default none: any; $MODELFIT_ALLOWED_IMAGE_REGISTRIES)",
    )
    sp.add_argument(
        "--network-policy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render a NetworkPolicy for every model: ingress to its port from pods of its namespace (and the "
        "namespaces of --network-policy-ingress-namespace-label) only; egress DNS, and TCP to the addresses the "
        "operator's header reads may reach (--allow-network, --deny-network) for the model download "
        "(default off; $MODELFIT_NETWORK_POLICY)",
    )
    sp.add_argument(
        "--network-policy-ingress-namespace-label",
        action="append",
        metavar="KEY=VALUE",
        help="with --network-policy, pods of the namespaces with this label may reach the models too (a gateway, "
        "Prometheus: kubernetes.io/metadata.name=monitoring); repeatable "
        "($MODELFIT_NETWORK_POLICY_INGRESS_NAMESPACE_LABELS)",
    )
    sp.add_argument(
        "--gateway-namespace",
        metavar="NAMESPACE",
        help="with --network-policy, the shared gateway's pods of this namespace (the chart's, gateway.enabled) may "
        "reach every model ($MODELFIT_GATEWAY_NAMESPACE)",
    )
    sp.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run as one of several replicas: only the holder of a coordination.k8s.io Lease works, the others "
        "wait to take over (lease 15 s, renewed every 2 s; a clean exit hands it over at once)",
    )
    sp.add_argument(
        "--leader-elect-namespace",
        metavar="NS",
        help="namespace of the leader Lease (default $POD_NAMESPACE, else default)",
    )
    sp.add_argument("--leader-elect-id", metavar="NAME", default="modelfit-operator", help="name of the leader Lease")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_run)
