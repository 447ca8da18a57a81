"""The shared gateway's shell: list the ModelDeployments and their Services' EndpointSlices every ``POLL_S``,
render Envoy's routes and clusters (``gateway``), and replace the files Envoy watches when they change.

It runs beside Envoy and BBR in the gateway's pod, with read-only rights on those two kinds and nothing else
(no Secret: a model with its own key checks it itself). Envoy keeps serving its last routes when the API server
cannot be read; a failed list is logged once per change, not per poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from . import gateway
from .kube import Kube, KubeError, get_client
from .routing import dump_yaml

POLL_S = 1.0
MD_PATH = "/apis/modelfit.io/v1alpha1"
SLICE_PATH = "/apis/discovery.k8s.io/v1"

log = logging.getLogger("modelfit.gateway")


async def snapshot(kube: Kube, namespaces: frozenset[str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ModelDeployments and the modelfit-managed EndpointSlices, of every namespace or of ``namespaces``."""
    mds: list[dict[str, Any]] = []
    slices: list[dict[str, Any]] = []
    scopes = [""] if namespaces is None else [f"/namespaces/{ns}" for ns in sorted(namespaces)]
    for scope in scopes:
        mds += await kube.list(f"{MD_PATH}{scope}/modeldeployments")
        slices += await kube.list(f"{SLICE_PATH}{scope}/endpointslices", labelSelector=gateway.MANAGED_SELECTOR)
    return mds, slices


def write_files(directory: Path, files: dict[str, str]) -> list[str]:
    """Replace each file whose content changed, by rename (the move Envoy's watch reacts to, never a half-written
    file); the names replaced."""
    staging = directory / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in files.items():
        target = directory / name
        if target.exists() and target.read_text() == text:
            continue
        tmp = staging / name
        tmp.write_text(text)
        os.replace(tmp, target)
        changed.append(name)
    return changed


def versions(*lists: list[dict[str, Any]]) -> tuple[tuple[str, ...], ...]:
    """Each listed object's namespace, name and resourceVersion: the same again means the same routes."""
    return tuple(
        (str(m.get("namespace")), str(m.get("name")), str(m.get("resourceVersion")))
        for objs in lists
        for m in (o.get("metadata") or {} for o in objs)
    )


def render(
    mds: list[dict[str, Any]], slices: list[dict[str, Any]], namespaces: frozenset[str] | None
) -> tuple[gateway.Table, dict[str, str]]:
    t = gateway.table(mds, slices, namespaces)
    return t, gateway.xds_files(t)


def write_bootstrap(directory: Path) -> None:
    """Envoy's bootstrap and empty route and cluster files: Envoy can start before the first list."""
    write_files(directory, {gateway.BOOTSTRAP_FILE: dump_yaml(gateway.bootstrap(str(directory)))})
    if not (directory / gateway.CDS_FILE).exists():
        write_files(directory, gateway.xds_files(gateway.Table()))


async def run(directory: Path, namespaces: frozenset[str] | None, once: bool = False, poll_s: float = POLL_S) -> int:
    """Keep the files in ``directory`` the gateway's routes; ``once``: one pass (an init container), 1 if the API
    server could not be read."""
    kube = get_client()
    problem: str | None = None
    refused: tuple[gateway.Refused, ...] = ()
    seen: tuple[tuple[str, ...], ...] | None = None
    try:
        while True:
            try:
                mds, slices = await snapshot(kube, namespaces)
            except KubeError as exc:
                if str(exc) != problem:
                    log.warning("cannot list the models (the gateway keeps its routes): %s", exc)
                    problem = str(exc)
                if once:
                    return 1
            else:
                if problem is not None:
                    log.info("listing the models again")
                    problem = None
                now = versions(mds, slices)
                if now == seen and not once:  # nothing changed since the last render
                    await asyncio.sleep(poll_s)
                    continue
                seen = now
                t, files = render(mds, slices, namespaces)
                changed = write_files(directory, files)
                if changed:
                    served = ", ".join(f"{'|'.join(s.ids)}={len(s.endpoints)}" for s in t.models) or "none"
                    log.info("routes updated (%s): %s", ", ".join(changed), served)
                if t.refused != refused:
                    for r in t.refused:
                        log.warning("%s/%s is not served as %r: %s", r.namespace, r.name, r.model, r.why)
                    refused = t.refused
                if once:
                    return 0
            await asyncio.sleep(poll_s)
    finally:
        await kube.close()


def _command(args: Any) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = Path(args.dir)
    if args.bootstrap:
        write_bootstrap(directory)
    namespaces = frozenset(args.namespace) if args.namespace else None
    return asyncio.run(run(directory, namespaces, once=args.once, poll_s=args.poll))


def register(sub: Any) -> None:
    sp = sub.add_parser("gateway", help="keep the shared gateway's Envoy routes (a sidecar of the gateway's pod)")
    sp.add_argument("--dir", default=gateway.XDS_DIR, help=f"where Envoy's files live (default {gateway.XDS_DIR})")
    sp.add_argument(
        "-n", "--namespace", action="append", help="serve this namespace's models (repeatable; default all)"
    )
    sp.add_argument("--bootstrap", action="store_true", help="write Envoy's bootstrap and empty routes first")
    sp.add_argument("--once", action="store_true", help="one pass, then exit (1 if the API server cannot be read)")
    sp.add_argument("--poll", type=float, default=POLL_S, help=f"seconds between lists (default {POLL_S})")
    sp.set_defaults(func=_command)
