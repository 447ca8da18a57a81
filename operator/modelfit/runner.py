"""`modelfit run`: the operator process (kopf) with liveness, Prometheus metrics and structured logs."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers, metrics

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    clusterwide = args.all_namespaces or not args.namespace
    kopf.run(
        standalone=args.standalone,
        clusterwide=clusterwide,
        namespaces=[] if clusterwide else args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    del handlers  # imported for its decorators
    return 0


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
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_run)
