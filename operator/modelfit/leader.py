"""Leader election for ``modelfit run --leader-elect``: one replica works, the others wait to take over.

The kubernetes client's own elector (``kubernetes.leaderelection``, a coordination.k8s.io Lease) does the
election, with controller-runtime's timings: a lease of 15 s, renewed every 2 s, given up when it cannot be
renewed for 10 s. Around it, what an operator process needs:
- a standby answers its liveness probe while it waits (kopf's own endpoint starts only with kopf), so the
  kubelet does not restart it in a loop;
- leading starts only once the lease is held, and the process exits when it is lost (as controller-runtime
  does): a new process starts as a follower, never two leaders working at once;
- a clean exit hands the lease back (holder cleared), so a rollout fails over in one retry period, not a
  whole lease; a crash fails over when the lease runs out.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2

log = logging.getLogger("modelfit.leader")


def identity() -> str:
    """This process among the candidates: the pod's name ($POD_NAME; the host name is the node's under
    hostNetwork) and a random suffix (a restarted container differs)."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _load_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


class _Healthz(http.server.BaseHTTPRequestHandler):
    path_ok = "/healthz"

    def do_GET(self) -> None:
        ok = urllib.parse.urlsplit(self.path).path == self.path_ok
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"leader": false}' if ok else b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def standby_liveness(url: str | None) -> Callable[[], None]:
    """Serve ``url`` (kopf's ``--liveness`` endpoint) while this replica waits; returns the stop function."""
    if not url:
        return lambda: None
    parts = urllib.parse.urlsplit(url)
    handler = type("Healthz", (_Healthz,), {"path_ok": parts.path or "/"})
    server = http.server.ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class Leadership:
    """This process's hold on the Lease ``namespace/name``."""

    def __init__(self, name: str, namespace: str, who: str | None = None) -> None:
        from kubernetes.leaderelection import electionconfig, leaderelection
        from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

        _load_config()
        self.lock = LeaseLock(name, namespace, who or identity())  # type: ignore[no-untyped-call]
        self.lost = threading.Event()
        self.released = False
        config = electionconfig.Config(  # type: ignore[no-untyped-call]
            self.lock,
            lease_duration=LEASE_SECONDS,
            renew_deadline=RENEW_DEADLINE_SECONDS,
            retry_period=RETRY_SECONDS,
            onstarted_leading=lambda: None,
            onstopped_leading=self.lost.set,
        )
        self.election = leaderelection.LeaderElection(config)  # type: ignore[no-untyped-call]
        logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every retry at INFO

    def acquire(self, on_lost: Callable[[], None]) -> None:
        """Block until this process holds the lease; then keep renewing it in a thread, and call ``on_lost``
        when a renewal fails for longer than the renew deadline."""
        log.info(f"{self.lock.identity}: waiting for the lease {self.lock.namespace}/{self.lock.name}")
        self.election.acquire()  # type: ignore[no-untyped-call]
        log.info(f"{self.lock.identity}: leading (lease {self.lock.namespace}/{self.lock.name})")

        def renew() -> None:
            self.election.renew_loop()  # type: ignore[no-untyped-call]
            if not self.released:
                log.error(f"{self.lock.identity}: lost the lease {self.lock.namespace}/{self.lock.name}")
                on_lost()

        threading.Thread(target=renew, name="lease-renewal", daemon=True).start()

    def release(self) -> None:
        """Hand the lease back (holder cleared) if this process still holds it: a follower takes over at once."""
        self.released = True
        try:
            lease = self.lock.api_instance.read_namespaced_lease(self.lock.name, self.lock.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.lock.identity:
                return
            lease.spec.holder_identity = None
            self.lock.api_instance.replace_namespaced_lease(self.lock.name, self.lock.namespace, lease)
            log.info(f"{self.lock.identity}: released the lease")
        except Exception as exc:  # noqa: BLE001 - best effort: the lease runs out by itself
            log.warning(f"{self.lock.identity}: could not release the lease ({exc}); it expires in {LEASE_SECONDS}s")


def exit_now() -> None:
    """What a process that lost the lease does: stop at once (as controller-runtime does); its pod restarts
    it as a follower. No cleanup: another replica may be leading already."""
    logging.shutdown()
    os._exit(3)
