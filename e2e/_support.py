"""Helpers shared by the e2e scenarios and bench/operator_latency.py: the operator as a
subprocess (``modelfit run`` with a kubeconfig), ModelDeployment manifests, condition waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "modelfit.io_modeldeployments.yaml"
POOL_LABEL = "modelfit.io/e2e-pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODE_DIR = Path(os.environ.get("MODELFIT_NODE_DIR", "/tmp/modelfit-node"))
HOST_CACHE_ROOT = NODE_DIR / "host-cache"  # the one hostPath root the e2e operator allows
# The e2e's model servers listen on loopback and the pod bridge: networks header reads refuse by default.
SETTINGS_ARGS = [
    "--host-path-root", str(HOST_CACHE_ROOT), "--allow-network", "127.0.0.0/8", "--allow-network", "10.88.0.0/16",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """``modelfit run -A`` as a child process, talking to the cluster of ``kubeconfig``."""

    def __init__(self, kubeconfig: str, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_args = extra_args or ["-A"]
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Operator:
        if self.running():
            return self
        self.metrics_port = free_port()
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, PYTHONUNBUFFERED="1")
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        cmd = [
            sys.executable, "-m", "modelfit.cli", "run", *self.extra_args, *SETTINGS_ARGS, "--standalone",
            "--log-format", "plain", "--liveness", "", "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        log.close()
        self.starts += 1
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no final patches (a crash)."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log_tail(self, n: int = 80) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def rss_kib(self) -> tuple[int, int]:
        """(current RSS, peak RSS) in KiB from /proc."""
        vals = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0])
        return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def md(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """A ModelDeployment manifest; the model defaults to the seed's (qwen3.5-0.8b Q4_0)."""
    spec.setdefault("model", {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"})
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "modelfit.io/v1alpha1", "kind": "ModelDeployment", "metadata": meta, "spec": spec}


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def serve_inference_pool_crd(cluster: Any) -> None:
    """The Gateway API Inference Extension's InferencePool CRD (GIE v1.5.0), applied and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "e2e" / "inferencepool-crd.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/inferencepools.inference.networking.k8s.io")


def wait_condition(
    cluster: Any,
    namespace: str,
    name: str,
    type_: str,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60,
    operator: Operator | None = None,
) -> dict[str, Any]:
    """Wait until a ModelDeployment has the condition; returns the object."""

    def check() -> dict[str, Any] | None:
        obj = cluster.get_json("-n", namespace, "modeldeployment", name)
        c = condition(obj, type_)
        if c.get("status") == status and (reason is None or c.get("reason") == reason):
            return dict(obj)
        return None

    try:
        return dict(
            cluster.wait_for(check, timeout=timeout, what=f"{namespace}/{name} {type_}={status} {reason or ''}")
        )
    except TimeoutError as exc:
        obj = cluster.get_json("-n", namespace, "modeldeployment", name, check=False)
        conds = ((obj or {}).get("status") or {}).get("conditions")
        extra = f"\nconditions: {conds}"
        if operator is not None:
            extra += f"\n--- operator log ---\n{operator.log_tail()}"
        raise TimeoutError(f"{exc}{extra}") from None


def wait_plan(cluster: Any, namespace: str, name: str, timeout: float = 60, **expected: Any) -> dict[str, Any]:
    """Wait until status.plan has the expected values (camelCase keys); returns the object."""

    def check() -> dict[str, Any] | None:
        obj = cluster.get_json("-n", namespace, "modeldeployment", name)
        plan = (obj.get("status") or {}).get("plan") or {}
        if all(plan.get(k) == v for k, v in expected.items()):
            return dict(obj)
        return None

    try:
        return dict(cluster.wait_for(check, timeout=timeout, what=f"{namespace}/{name} plan {expected}"))
    except TimeoutError as exc:
        obj = cluster.get_json("-n", namespace, "modeldeployment", name, check=False)
        plan = ((obj or {}).get("status") or {}).get("plan") or {}
        got = {k: plan.get(k) for k in ("backend", "gpuLayers", "totalLayers", "context", "nodeClass", "memoryRequest")}
        conds = ((obj or {}).get("status") or {}).get("conditions")
        raise TimeoutError(f"{exc}\nplan: {got}\nconditions: {conds}") from None


def container(deploy: dict[str, Any], name: str = "llama-server") -> dict[str, Any]:
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise KeyError(name)


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
