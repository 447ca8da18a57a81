"""pytest fixtures for the modelfit e2e suite.

A real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) plus kwok for fake nodes/pods, built from Go modules by
``e2e/build.sh`` and started by ``e2e/cluster.sh``.

Environment:
  MODELFIT_KUBECONFIG  reuse an existing cluster (nothing is built/started/stopped)
  MODELFIT_CACHE       binary cache (default ~/.cache/modelfit)
  MODELFIT_STATE       cluster state dir (default /tmp/modelfit-cluster)
  MODELFIT_KEEP_CLUSTER=1  leave the cluster running after the session
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

E2E_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
BIN = CACHE / "bin"
HELM_PLUGINS = CACHE / "helm-plugins"
CONTROL_PLANE_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)
BUILD_TIMEOUT = int(os.environ.get("MODELFIT_BUILD_TIMEOUT", 3600))

FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


# --------------------------------------------------------------------------- pytest hooks
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against a real (kwok-backed) Kubernetes control plane")
    config.addinivalue_line(
        "markers", "realnode: real pods on one real node (kubelet + containerd + runc) from e2e/node.sh"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            Path(str(item.fspath)).resolve().relative_to(E2E_DIR)
        except ValueError:
            continue
        item.add_marker(pytest.mark.e2e)
    # Real-node scenarios last: they add a node (tainted, so kwok scenarios never plan onto it) and CRDs.
    items.sort(key=lambda i: i.get_closest_marker("realnode") is not None)


# --------------------------------------------------------------------------- helpers
class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (
            f"kubectl {' '.join(map(str, self.cmd[1:]))} failed (rc={self.returncode})\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )


def _env_with_tools(kubeconfig: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HELM_PLUGINS"] = str(HELM_PLUGINS)
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        env.setdefault(var, str(CACHE / "helm" / sub))
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return env


def _taint(t: str | Mapping[str, str]) -> dict[str, str]:
    """Accept {'key','value','effect'} dicts or 'key=value:Effect' / 'key:Effect' strings."""
    if isinstance(t, Mapping):
        return {k: str(v) for k, v in t.items()}
    kv, _, effect = t.rpartition(":")
    if not kv:
        raise ValueError(f"taint {t!r} needs an effect, e.g. 'key=value:NoSchedule'")
    key, _, value = kv.partition("=")
    out = {"key": key, "effect": effect}
    if value:
        out["value"] = value
    return out


class Cluster:
    """Handle on the e2e cluster: ``.kubeconfig``, ``.kubectl(...)``, node helpers."""

    def __init__(self, kubeconfig: str, managed: bool) -> None:
        self.kubeconfig = kubeconfig
        self.managed = managed  # True if this session started it (and will stop it)
        self.env = _env_with_tools(kubeconfig)
        local = BIN / "kubectl"
        self.kubectl_bin = str(local) if local.exists() else (shutil.which("kubectl") or "kubectl")

    # -- kubectl -------------------------------------------------------------
    def kubectl(
        self, *args: Any, input: str | bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        cmd = [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *map(str, args)]
        if isinstance(input, (dict, list)):
            input = json.dumps(input)
        text = not isinstance(input, bytes)
        proc = subprocess.run(cmd, input=input, capture_output=True, text=text, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def get_json(self, *args: Any, check: bool = True) -> Any:
        proc = self.kubectl("get", *args, "-o", "json", check=check)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def apply(self, obj: Mapping[str, Any] | str) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "-f", "-", input=obj if isinstance(obj, str) else json.dumps(obj))

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5, what: str = "condition"
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except (KubectlError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
            time.sleep(interval)

    # -- fake nodes ------------------------------------------------------------
    def make_node(
        self,
        name: str,
        cpu: str = "2",
        memory: str = "4Gi",
        gpus: int = 0,
        gpu_memory_mib: int | None = None,
        labels: Mapping[str, str] | None = None,
        taints: Iterable[str | Mapping[str, str]] | None = None,
        pods: str = "110",
        wait_ready: bool = True,
    ) -> dict:
        """Create a kwok-managed fake Node and (by default) wait until kwok marks it Ready."""
        resources = {"cpu": str(cpu), "memory": str(memory), "pods": str(pods)}
        if gpus:
            resources["nvidia.com/gpu"] = str(gpus)
        node_labels = {
            "type": "kwok",
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        if gpu_memory_mib is not None:
            node_labels["nvidia.com/gpu.memory"] = str(gpu_memory_mib)
        node_labels.update({k: str(v) for k, v in (labels or {}).items()})
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": node_labels,
                "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"taints": [_taint(t) for t in (taints or [])]},
            "status": {
                "allocatable": dict(resources),
                "capacity": dict(resources),
                "nodeInfo": {
                    "kubeletVersion": "fake",
                    "kubeProxyVersion": "fake",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        }
        self.kubectl("create", "-f", "-", input=json.dumps(node))
        if wait_ready:
            self.wait_for(lambda: self.node_ready(name), timeout=60, what=f"node {name} Ready")
        return self.get_json("node", name)

    def node_ready(self, name: str) -> bool:
        node = self.get_json("node", name, check=False)
        conds = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def delete_node(self, name: str, wait: bool = True) -> None:
        self.kubectl("delete", "node", name, "--ignore-not-found", f"--wait={str(wait).lower()}")


# --------------------------------------------------------------------------- build / start
def _missing_binaries() -> list[str]:
    return [b for b in CONTROL_PLANE_BINARIES if not os.access(BIN / b, os.X_OK)]


def _ensure_built() -> None:
    if not _missing_binaries():
        return
    cmd = [str(E2E_DIR / "build.sh"), "k8s", "etcd", "kwok"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"e2e/build.sh timed out after {BUILD_TIMEOUT}s", pytrace=False)
    if proc.returncode != 0 or _missing_binaries():
        pytest.fail(
            f"e2e/build.sh failed (rc={proc.returncode}); missing: {_missing_binaries()}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}",
            pytrace=False,
        )


def _cluster_sh(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(E2E_DIR / "cluster.sh"), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"e2e/cluster.sh {' '.join(args)} failed (rc={proc.returncode})\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc


# KCM's HPA controller looks every 5 s here instead of upstream's 15 s: the HPA scenarios wait less.
os.environ.setdefault("MODELFIT_HPA_SYNC_PERIOD", "5s")


@pytest.fixture(scope="session")
def cluster() -> Iterable[Cluster]:
    reuse = os.environ.get("MODELFIT_KUBECONFIG")
    if reuse:
        yield Cluster(reuse, managed=False)
        return
    _ensure_built()
    already_running = _cluster_sh("status", check=False).returncode == 0
    _cluster_sh("up")
    kubeconfig = _cluster_sh("kubeconfig").stdout.strip()
    c = Cluster(kubeconfig, managed=not already_running)
    try:
        yield c
    finally:
        if c.managed and os.environ.get("MODELFIT_KEEP_CLUSTER") != "1":
            _cluster_sh("down", check=False)


@pytest.fixture
def make_node(cluster: Cluster) -> Iterable[Callable[..., dict]]:
    """Factory: ``make_node(name, cpu=..., memory=..., gpus=..., gpu_memory_mib=..., labels=..., taints=...)``.
    Nodes created through it are deleted when the test ends."""
    created: list[str] = []

    def _make(name: str, **kwargs: Any) -> dict:
        node = cluster.make_node(name, **kwargs)
        created.append(name)
        return node

    yield _make
    for name in reversed(created):
        cluster.delete_node(name, wait=False)


@pytest.fixture
def delete_node(cluster: Cluster) -> Callable[[str], None]:
    return cluster.delete_node


def _fresh_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    return name


@pytest.fixture
def namespace(cluster: Cluster) -> Iterable[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = _fresh_namespace(cluster, "e2e")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def ns(cluster: Cluster, real_node: Any) -> Iterable[str]:
    """A fresh namespace for a real-node test; afterwards deleted, waiting until its pods no longer hold the
    node's CPU and memory (the next test plans on what they free)."""
    name = _fresh_namespace(cluster, "rn")
    yield name
    real_node.wait_gone(name)


# --------------------------------------------------------------------------- modelfit
@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    """The ModelDeployment CRD, applied from crds/ and Established."""
    from _support import CRD_FILE

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.modelfit.io", "--timeout=60s")
    return "modeldeployments.modelfit.io"


@pytest.fixture(scope="session")
def operator(cluster: Cluster, crd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterable[Any]:
    """``modelfit run -A`` as a subprocess for the whole session (tests may stop/kill/start it)."""
    from _support import Operator

    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(cluster.kubeconfig, log).start()
    time.sleep(1)
    assert op.running(), op.log_tail()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("MODELFIT_E2E_SHOW_LOG"):
            print(op.log_tail(400))


@pytest.fixture
def pool(make_node: Callable[..., dict]) -> Any:
    """A private node pool: ``pool.add(name, **make_node_kwargs)``; ``pool.selector`` for the spec's nodeSelector."""
    from _support import POOL_LABEL

    class Pool:
        def __init__(self) -> None:
            self.id = f"p{uuid.uuid4().hex[:6]}"
            self.selector = {POOL_LABEL: self.id}

        def name(self, suffix: str) -> str:
            return f"{self.id}-{suffix}"

        def add(self, suffix: str, **kwargs: Any) -> str:
            labels = {**self.selector, **(kwargs.pop("labels", None) or {})}
            name = self.name(suffix)
            make_node(name, labels=labels, **kwargs)
            return name

    return Pool()


# --------------------------------------------------------------------------- one real node
def _real_node_missing() -> str | None:
    """Why a real node cannot run here, or None."""
    if os.geteuid() != 0:
        return "a real node needs root"
    for path in ("/usr/bin/containerd", "/usr/sbin/runc", "/usr/lib/cni/bridge", "/usr/bin/umoci", "/usr/bin/skopeo"):
        if not os.access(path, os.X_OK):
            return f"{path} missing (apt-get install containerd runc containernetworking-plugins umoci skopeo)"
    if not os.access(BIN / "kubelet", os.X_OK):
        return f"{BIN / 'kubelet'} missing (e2e/build.sh k8s)"
    if not os.access("/sys/fs/cgroup/memory", os.W_OK):
        return "no writable cgroup v1 memory controller"
    return None


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> Iterable[Any]:
    """``e2e/images.sh`` then ``e2e/node.sh up``: one real node, tainted so only pinned pods land there.

    Skips when the machine cannot host a node, unless MODELFIT_REQUIRE_REALNODE=1 (CI), then fails.
    """
    from _realnode import IMAGES_DIR, NODE_LABEL, NODE_TAINT, RealNode

    why = _real_node_missing()
    if why:
        if os.environ.get("MODELFIT_REQUIRE_REALNODE") == "1":
            pytest.fail(f"real node required but unavailable: {why}", pytrace=False)
        pytest.skip(why)
    t0 = time.monotonic()
    # The routing scenarios' picker and Envoy, and the gateway's body-based router, too (the venv's bin on PATH: images.sh finds the envoy wheel there).
    images = ["pause", "curl", "operator", "llama", "epp", "bbr", "envoy"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [str(E2E_DIR / "images.sh"), str(IMAGES_DIR), *images],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=env,
    )
    if proc.returncode != 0:
        pytest.fail(f"e2e/images.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    t1 = time.monotonic()
    env = dict(os.environ, NODE_TAINT=f"{NODE_TAINT}=true:NoSchedule", NODE_LABELS=f"{NODE_LABEL}=true")
    proc = subprocess.run([str(E2E_DIR / "node.sh"), "up"], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        subprocess.run([str(E2E_DIR / "node.sh"), "down"], capture_output=True, timeout=180, env=env)
        pytest.fail(f"e2e/node.sh up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    node = RealNode(cluster, images_s=t1 - t0, up_s=time.monotonic() - t1, log=proc.stderr)
    print(f"\n[realnode] images {node.images_s:.1f}s, node up {node.up_s:.1f}s\n{proc.stderr.strip()}")
    try:
        yield node
    finally:
        if os.environ.get("MODELFIT_KEEP_CLUSTER") != "1":
            subprocess.run([str(E2E_DIR / "node.sh"), "down"], capture_output=True, timeout=180, env=env)


@pytest.fixture(scope="session")
def model_server(real_node: Any) -> Iterable[Any]:
    """Files over HTTP on the node bridge's address (the harness's own), reachable from real pods."""
    from _modelserver import ModelServer
    from _realnode import BRIDGE_IP

    srv = ModelServer(BRIDGE_IP).start()
    try:
        yield srv
    finally:
        srv.stop()
