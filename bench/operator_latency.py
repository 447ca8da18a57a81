"""Operator latency and packing on the real local control plane (e2e/cluster.sh: etcd, kube-apiserver,
controller-manager, scheduler, kwok nodes), with ``modelfit run`` (this tree's package) as a subprocess.

    python bench/operator_latency.py [--applies 20] [--node-events 3] [--bulk 200] [--nodes auto|N]
        [--node-cpu 32] [--node-memory 128Gi] [--classes type|host] [--ready-timeout 240] [--stall 90]
        [--py-spy BIN] [--json FILE] [--keep]

1. apply -> Deployment created (p50/p95 over --applies sequential applies; 0 skips).
2. GPU node added (or removed) -> plan updated (--node-events cycles; 0 skips).
3. Packing burst (--bulk; 0 skips): that many ModelDeployments (qwen3.5-0.8b Q4_0, context 4096) created at
   once on kwok nodes of --node-cpu/--node-memory, with the operator's own resource requests (nothing
   overridden). ``--nodes auto`` asks the planner (``modelfit plan -f``, the operator's placement call) what one
   of them requests on an empty node of the shape and makes room for all with 25% to spare (at least 4 nodes,
   at most --max-nodes); when the request does not pack (a whole node per model), that is the verdict.
   Prints: time to all Planned and to all Ready, the counts over time, where the time goes per step (operator,
   controller-manager, scheduler, kwok; from the objects' timestamps), pods per node with what they request,
   the scheduler's refusals (FailedScheduling), operator RSS (VmRSS at the end, VmHWM peak), CPU seconds of
   the operator and every control-plane process, reconciles and plan changes from the operator's /metrics,
   API requests (the operator's own client; the API server's apiserver_request_total), and last
   ``RESULT: PASS`` (all Ready) or ``RESULT: FAIL: why``; exit code 0 or 1.

Uses an already running e2e cluster (MODELFIT_KUBECONFIG, or MODELFIT_STATE's, default /tmp/modelfit-cluster)
or starts one (and stops it unless --keep). Its namespace, then its nodes, are deleted at the end (an earlier
run's namespace still terminating is waited for first: this operator would reconcile it too). Everything talks
to 127.0.0.1 only. ``--py-spy BIN`` samples the operator with py-spy during the burst (needs ptrace) and
prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))
sys.path.insert(0, str(ROOT / "operator"))

from _support import CRD_FILE, GPU_TAINT, POOL_LABEL, Operator, md  # noqa: E402

CACHE = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
STATE = Path(os.environ.get("MODELFIT_STATE", "/tmp/modelfit-cluster"))
KUBECTL = str(CACHE / "bin" / "kubectl")
CLASS_LABEL = "node.kubernetes.io/instance-type"
MD_LABEL = "modelfit.io/modeldeployment"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPY_RATE = 50


def kubectl(kubeconfig: str, *args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        [KUBECTL, "--kubeconfig", kubeconfig, *args], input=input, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def node(name: str, cpu: str, memory: str, labels: dict[str, str], gpus: int = 0, taints: list | None = None) -> dict:
    res = {"cpu": cpu, "memory": memory, "pods": "250"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                **labels,
            },
        },
        "spec": {"taints": taints or []},
        "status": {"allocatable": res, "capacity": res},
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def quantity(q: str | int | float) -> float:
    from modelfit.nodes import parse_quantity

    return parse_quantity(q)


def apiserver_requests(kubeconfig: str) -> Counter[tuple[str, str]]:
    """apiserver_request_total summed by (resource, verb)."""
    out: Counter[tuple[str, str]] = Counter()
    for line in kubectl(kubeconfig, "get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        out[(labels.get("resource", ""), labels.get("verb", ""))] += int(float(line.rsplit(" ", 1)[1]))
    return out


def op_metrics(op: Operator) -> dict[str, float]:
    """The operator's own series: name{labels} -> value."""
    out: dict[str, float] = {}
    for line in op.metrics().splitlines():
        if line.startswith("modelfit_") and " " in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def metric_sum(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    vals = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def control_plane_pids() -> dict[str, int]:
    out = {}
    for f in sorted((STATE / "pids").glob("*.pid")):
        try:
            out[f.stem] = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
    return out


def planner_requests(manifest: dict[str, Any], cpu: str, memory: str) -> tuple[float, float, str]:
    """(CPU cores, memory bytes, summary) one ModelDeployment requests on an empty node of the shape,
    from the operator's own placement call (``modelfit plan -f``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "modelfit.cli", "plan", "-f", "-", "--cpus", cpu, "--memory", memory, "-o", "json"],
        input=json.dumps(manifest),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"modelfit plan -f failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    out = out[0] if isinstance(out, list) else out
    req = out["resources"]["requests"]
    plan = out["plan"]
    summary = f"threads {plan.get('threads')}, context {plan.get('context')}, requests cpu {req.get('cpu')} memory {req.get('memory')}"
    return quantity(req.get("cpu", "0")), quantity(req.get("memory", "0")), summary


class Sampler(threading.Thread):
    """Every ``interval`` s: the operator's RSS; every 2 s: the namespace's ModelDeployments and pods (counts)."""

    def __init__(self, core: Any, custom: Any, ns: str, pid: int, prefix: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.core, self.custom, self.ns, self.pid, self.prefix = core, custom, ns, pid, prefix
        self.interval = interval
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.rss_peak_kib = 0
        self.rss_samples: list[tuple[float, int]] = []
        self.timeline: list[dict[str, Any]] = []  # t, planned, ready, unschedulable, pods, pods_scheduled, ...
        self.latest: dict[str, Any] = {}
        self.first: dict[str, float] = {}  # name -> first time seen Ready
        self.errors = 0

    def _list(self, fn: Any, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        resp = fn(*args, _preload_content=False, _request_timeout=30, **kw)
        return list(json.loads(resp.data).get("items") or [])

    def snapshot(self) -> dict[str, Any]:
        mds = self._list(
            self.custom.list_namespaced_custom_object, "modelfit.io", "v1alpha1", self.ns, "modeldeployments"
        )
        pods = self._list(self.core.list_namespaced_pod, self.ns)
        planned = ready = unsched = 0
        reasons: Counter[str] = Counter()
        for o in mds:
            name = o["metadata"]["name"]
            if not name.startswith(self.prefix):
                continue
            st = o.get("status") or {}
            current = st.get("observedGeneration") == o["metadata"].get("generation")
            conds = {c["type"]: c for c in st.get("conditions") or []}
            if current and conds.get("Planned", {}).get("status") == "True":
                planned += 1
            if current and conds.get("Ready", {}).get("status") == "True":
                ready += 1
                self.first.setdefault(name, time.monotonic())
            else:
                planned_c = conds.get("Planned") or {}
                c = conds.get("Ready") or planned_c if planned_c.get("status") == "True" else planned_c
                why = f"{c.get('type', 'no status')}={c.get('status', '')} {c.get('reason', '')}".strip()
                if c is planned_c and c.get("message"):
                    why += ": " + re.sub(r"bulk-\d+|\d+(\.\d+)?", "N", c["message"])[:160]
                reasons[why] += 1
            if conds.get("Unschedulable", {}).get("status") == "True":
                unsched += 1
        ours = [
            p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(MD_LABEL, "").startswith(self.prefix)
        ]
        scheduled = sum(1 for p in ours if (p.get("spec") or {}).get("nodeName"))
        running_ready = sum(
            1
            for p in ours
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        )
        return {
            "planned": planned,
            "ready": ready,
            "unschedulable": unsched,
            "pods": len(ours),
            "pods_scheduled": scheduled,
            "pods_ready": running_ready,
            "not_ready_reasons": reasons,
            "md_items": mds,
            "pod_items": ours,
        }

    def run(self) -> None:
        last_list = 0.0
        while not self.stop.is_set():
            rss, _hwm = proc_mem_kib(self.pid)
            now = time.monotonic()
            self.rss_peak_kib = max(self.rss_peak_kib, rss)
            self.rss_samples.append((now - self.t0, rss))
            if now - last_list >= 2.0:
                last_list = now
                try:
                    snap = self.snapshot()
                except Exception:  # noqa: BLE001 - a slow list must not end the sampling
                    self.errors += 1
                else:
                    self.latest = snap
                    self.timeline.append(
                        {"t": now - self.t0, **{k: v for k, v in snap.items() if isinstance(v, int)}, "rss_kib": rss}
                    )
            self.stop.wait(self.interval)


def ts(value: str | None) -> float | None:
    """An API timestamp (RFC 3339, seconds) as epoch seconds."""
    if not value:
        return None
    import datetime

    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def stages(
    mds: list[dict[str, Any]], deploys: list[dict[str, Any]], pods: list[dict[str, Any]], t0: float
) -> list[str]:
    """Where the time to Ready goes, per ModelDeployment (API timestamps: 1 s resolution): p50/max of each step
    and when the last object finished it (seconds after the burst began)."""
    dep = {d["metadata"]["name"]: ts(d["metadata"].get("creationTimestamp")) for d in deploys}
    dep_ready: dict[str, float | None] = {}  # the Deployment's status says its new ReplicaSet is available
    for d in deploys:
        for c in (d.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Progressing" and c.get("reason") == "NewReplicaSetAvailable":
                dep_ready[d["metadata"]["name"]] = ts(c.get("lastUpdateTime"))
    first_pod: dict[str, dict[str, Any]] = {}
    for p in pods:
        owner = p["metadata"]["labels"].get(MD_LABEL, "")
        if (
            owner not in first_pod
            or p["metadata"]["creationTimestamp"] < first_pod[owner]["metadata"]["creationTimestamp"]
        ):
            first_pod[owner] = p

    def cond(obj: dict[str, Any], type_: str) -> float | None:
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == type_ and c.get("status") == "True":
                return ts(c.get("lastTransitionTime"))
        return None

    steps: dict[str, list[tuple[float, float]]] = defaultdict(list)  # step -> (delay, done at)
    names = [
        "ModelDeployment created -> Deployment (operator)",
        "Deployment -> pod created (controller-manager)",
        "pod created -> scheduled (scheduler)",
        "scheduled -> pod Ready (kwok)",
        "pod Ready -> Deployment status available (controller-manager)",
        "Deployment available -> ModelDeployment Ready (operator)",
    ]
    for o in mds:
        name = o["metadata"]["name"]
        pod = first_pod.get(name)
        chain = [
            ts(o["metadata"].get("creationTimestamp")),
            dep.get(name),
            ts(pod["metadata"].get("creationTimestamp")) if pod else None,
            cond(pod, "PodScheduled") if pod else None,
            cond(pod, "Ready") if pod else None,
            dep_ready.get(name),
            cond(o, "Ready"),
        ]
        for i, label in enumerate(names):
            a, b = chain[i], chain[i + 1]
            if a is not None and b is not None:
                steps[label].append((max(0.0, b - a), b - t0))
    width = max(len(n) for n in names)
    out = [f"  {'step':<{width}}  {'n':>4}  {'p50':>5}  {'p95':>5}  {'max':>5}  last done at"]
    for label in names:
        xs = steps.get(label) or []
        if not xs:
            out.append(f"  {label:<{width}}  {0:>4}")
            continue
        d = [x for x, _ in xs]
        out.append(
            f"  {label:<{width}}  {len(xs):>4}  {pct(d, 0.5):5.1f}  {pct(d, 0.95):5.1f}  {max(d):5.1f}  "
            f"{max(t for _, t in xs):6.1f} s"
        )
    return out


def wait_namespaces_gone(core: Any, names: list[str], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        present = {n.metadata.name for n in core.list_namespace().items}
        if not present & set(names):
            return True
        time.sleep(1)
    return False


def pyspy_top(raw: Path, seconds: float, rate: int, n: int = 22) -> list[str]:
    """Self and inclusive shares per function from py-spy's collapsed stacks (--format raw)."""

    def short(frame: str) -> str:
        m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if not m:
            return frame
        path = "/".join(m.group(2).split("/")[-2:])
        return f"{m.group(1)} ({path})"

    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        c = int(count)
        samples += c
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    if not samples:
        return ["(no samples)"]
    busy = samples / max(1.0, seconds * rate)
    out = [
        f"{samples} samples of non-idle threads in {seconds:.0f} s at {rate} Hz (busy {100 * busy:.0f}% of one core)"
    ]
    out.append("self (% of samples):")
    out += [f"  {100 * c / samples:5.1f}%  {k}" for k, c in own.most_common(n)]
    out.append("inclusive (% of samples):")
    out += [f"  {100 * c / samples:5.1f}%  {k}" for k, c in total.most_common(n)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--applies", type=int, default=20, help="sequential applies (0 skips)")
    ap.add_argument("--node-events", type=int, default=3, help="GPU node add/remove cycles (0 skips)")
    ap.add_argument("--bulk", type=int, default=200, help="ModelDeployments in the packing burst (0 skips)")
    ap.add_argument("--nodes", default="auto", help="kwok nodes for the burst, or auto (room for all, 25%% spare)")
    ap.add_argument("--max-nodes", type=int, default=32, help="cap of --nodes auto")
    ap.add_argument("--node-cpu", default="32", help="allocatable CPU of each burst node")
    ap.add_argument("--node-memory", default="128Gi", help="allocatable memory of each burst node")
    ap.add_argument("--context", type=int, default=4096, help="context of the burst's ModelDeployments")
    ap.add_argument(
        "--classes",
        choices=["type", "host"],
        default="type",
        help="burst nodes share an instance type (one node class), or carry none (every node its own class)",
    )
    ap.add_argument("--ready-timeout", type=float, default=240, help="seconds to wait for all Ready")
    ap.add_argument("--stall", type=float, default=90, help="stop waiting when Ready has not moved for this long")
    ap.add_argument("--py-spy", metavar="BIN", help="profile the operator with this py-spy during the burst")
    ap.add_argument("--keep", action="store_true", help="leave a cluster this bench started running")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    # The operator subprocess and ``modelfit plan`` run this tree's package.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "operator"), os.environ.get("PYTHONPATH")]))

    from kubernetes import client, config

    started_cluster = False
    kubeconfig = os.environ.get("MODELFIT_KUBECONFIG") or str(STATE / "kubeconfig")
    if subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "status"], capture_output=True).returncode != 0 and not (
        os.environ.get("MODELFIT_KUBECONFIG")
    ):
        print("starting the local control plane (e2e/cluster.sh up)", file=sys.stderr)
        subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "up"], check=True)
        started_cluster = True
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/modeldeployments.modelfit.io", "--timeout=60s")

    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 8
    api = client.ApiClient(cfg)
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    run = uuid.uuid4().hex[:6]
    ns = f"bench-{run}"
    pool = f"bench-{run}"
    nodes: list[str] = []
    logdir = Path(tempfile.mkdtemp(prefix="modelfit-bench-"))
    op = Operator(kubeconfig, logdir / "operator.log")
    results: dict[str, Any] = {}
    failures: list[str] = []
    rows: list[tuple[str, str]] = []
    extra: list[str] = []
    spy: subprocess.Popen[bytes] | None = None

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def add_node(name: str, **kw: Any) -> None:
        core.create_node(node(name, **kw))
        nodes.append(name)

    def get_md(name: str) -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments", name))

    def create_md(obj: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments", obj)

    def delete_md(name: str) -> None:
        custom.delete_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments", name)

    def wait(pred: Any, timeout: float, what: str, interval: float = 0.01) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if pred():
                    return time.monotonic()
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} after {timeout}s; operator log:\n{op.log_tail(30)}")
            time.sleep(interval)

    # A namespace of an earlier run still terminating would be reconciled by this operator (-A) too.
    left = [n.metadata.name for n in core.list_namespace().items if n.metadata.name.startswith("bench-")]
    if left:
        print(f"waiting for earlier bench namespaces to go: {', '.join(left)}", file=sys.stderr)
        for n in left:
            kubectl(kubeconfig, "delete", "namespace", n, "--wait=false", check=False)
        if not wait_namespaces_gone(core, left, 300):
            print("warning: earlier bench namespaces still terminating; numbers include their objects", file=sys.stderr)
    try:
        core.create_namespace({"metadata": {"name": ns}})
        op.start()
        time.sleep(2)
        log(f"operator pid {op.pid}, log {op.log_path}")

        # 1. apply -> Deployment created (a private pool, so the burst's nodes do not change these plans)
        if args.applies:
            spool = f"{pool}-s"
            for i in range(args.applies):  # a node each: every apply gets its Deployment whatever the CPU rule
                add_node(f"{spool}-{i}", cpu="16", memory="64Gi", labels={POOL_LABEL: spool, CLASS_LABEL: spool})
            lat = []
            for i in range(args.applies):
                name = f"seq-{i}"
                t0 = time.monotonic()
                create_md(md(name, nodeSelector={POOL_LABEL: spool}, context=4096))
                t1 = wait(lambda n=name: apps.read_namespaced_deployment(n, ns), 30, f"Deployment {name}")
                lat.append(t1 - t0)
            results["apply_to_deployment_s"] = {
                "p50": pct(lat, 0.5),
                "p95": pct(lat, 0.95),
                "max": max(lat),
                "n": len(lat),
            }
            for i in range(args.applies):  # out of the way of the burst (their pods need not fit)
                delete_md(f"seq-{i}")
            a = results["apply_to_deployment_s"]
            rows.append(("apply -> Deployment created", f"p50 {a['p50'] * 1000:.0f} ms, p95 {a['p95'] * 1000:.0f} ms, max {a['max'] * 1000:.0f} ms (n={a['n']})"))  # fmt: skip

        # 2. node added/removed -> plan updated (backend auto: a GPU node means a cuda plan)
        if args.node_events:
            gpool = f"{pool}-g"
            add_node(f"{gpool}-cpu", cpu="16", memory="64Gi", labels={POOL_LABEL: gpool})
            create_md(md("auto", backend="auto", context=8192, nodeSelector={POOL_LABEL: gpool}))
            wait(lambda: (get_md("auto").get("status") or {}).get("plan", {}).get("backend") == "cpu", 30, "cpu plan")
            added, removed = [], []
            for i in range(args.node_events):
                gname = f"{gpool}-gpu-{i}"
                labels = {POOL_LABEL: gpool, "nvidia.com/gpu.memory": "24576"}
                t0 = time.monotonic()
                add_node(gname, cpu="8", memory="32Gi", labels=labels, gpus=1, taints=[GPU_TAINT])
                t1 = wait(lambda: get_md("auto")["status"]["plan"]["backend"] == "cuda", 60, "cuda plan", 0.05)
                t2 = wait(lambda: "nvidia.com/gpu" in str(apps.read_namespaced_deployment("auto", ns).spec.template.spec.containers[0].resources.limits), 30, "GPU Deployment", 0.05)  # fmt: skip
                added.append((t1 - t0, t2 - t0))
                t0 = time.monotonic()
                core.delete_node(gname)
                nodes.remove(gname)
                t1 = wait(lambda: get_md("auto")["status"]["plan"]["backend"] == "cpu", 60, "cpu plan again", 0.05)
                removed.append(t1 - t0)
            delete_md("auto")
            results["node_added_to_plan_s"] = {"p50": pct([a for a, _ in added], 0.5), "max": max(a for a, _ in added)}
            results["node_added_to_rollout_s"] = {"p50": pct([b for _, b in added], 0.5), "max": max(b for _, b in added)}  # fmt: skip
            results["node_removed_to_plan_s"] = {"p50": pct(removed, 0.5), "max": max(removed)}
            rows += [
                ("GPU node added -> plan cuda", f"p50 {results['node_added_to_plan_s']['p50']:.2f} s, max {results['node_added_to_plan_s']['max']:.2f} s (n={args.node_events})"),
                ("GPU node added -> Deployment rolled", f"p50 {results['node_added_to_rollout_s']['p50']:.2f} s, max {results['node_added_to_rollout_s']['max']:.2f} s"),
                ("GPU node removed -> plan cpu", f"p50 {results['node_removed_to_plan_s']['p50']:.2f} s, max {results['node_removed_to_plan_s']['max']:.2f} s"),
            ]  # fmt: skip

        # 3. the packing burst
        if args.bulk:
            bpool = f"{pool}-b"
            selector = {POOL_LABEL: bpool}
            manifest = md("probe", context=args.context)  # the profile node has no pool label
            cpu_req, mem_req, summary = planner_requests(manifest, args.node_cpu, args.node_memory)
            node_cpu, node_mem = quantity(args.node_cpu), quantity(args.node_memory)
            per_node = min(
                math.floor(node_cpu / cpu_req) if cpu_req else 250,
                math.floor(node_mem / mem_req) if mem_req else 250,
                250,
            )
            if args.nodes == "auto":
                want = math.ceil(args.bulk * 1.25 / per_node) if per_node else args.max_nodes
                n_nodes = max(4, min(args.max_nodes, want))
            else:
                n_nodes = int(args.nodes)
            room = per_node * n_nodes
            sizing = (
                f"{n_nodes} kwok nodes of {args.node_cpu} CPU / {args.node_memory} (pods 250), "
                f"{'one instance type' if args.classes == 'type' else 'no instance type (a class per node)'}; "
                f"the planner on an empty node: {summary} -> {per_node} per node, room for {room}"
            )
            log(sizing)
            results["bulk_sizing"] = {
                "nodes": n_nodes, "node_cpu": args.node_cpu, "node_memory": args.node_memory,
                "planner": summary, "per_node": per_node, "room": room,
            }  # fmt: skip
            if room < args.bulk:
                why = "it does not pack" if args.nodes == "auto" else "too few nodes (--nodes) for this request"
                failures.append(
                    f"the operator's request ({summary}) leaves room for {room} of {args.bulk} on {n_nodes} nodes "
                    f"of {args.node_cpu} CPU / {args.node_memory}: {why}"
                )
            group = dict(selector)
            if args.classes == "type":
                group[CLASS_LABEL] = f"{bpool}-c{args.node_cpu}m{args.node_memory}"
            for i in range(n_nodes):
                add_node(f"{bpool}-{i}", cpu=args.node_cpu, memory=args.node_memory, labels=group)
            wait(lambda: sum(
                1 for n in core.list_node(label_selector=f"{POOL_LABEL}={bpool}").items
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            ) == n_nodes, 60, "burst nodes Ready", 0.5)  # fmt: skip
            time.sleep(1)  # the operator sees the nodes

            api_before, m_before = apiserver_requests(kubeconfig), op_metrics(op)
            cp_pids = control_plane_pids()
            cpu_before = {k: proc_cpu_s(p) for k, p in {**cp_pids, "operator": op.pid}.items()}
            if args.py_spy:
                spy_out = logdir / "py-spy.txt"
                spy = subprocess.Popen(
                    [args.py_spy, "record", "--pid", str(op.pid), "--format", "raw", "--rate", str(SPY_RATE),
                     "--output", str(spy_out), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                time.sleep(1)
            sampler = Sampler(core, custom, ns, op.pid, "bulk-")
            names = [f"bulk-{i}" for i in range(args.bulk)]
            sampler.start()
            t0 = sampler.t0
            t0_wall = time.time() - (time.monotonic() - t0)
            create_lat = []
            for n in names:
                tc = time.monotonic()
                create_md(md(n, nodeSelector=selector, context=args.context))
                create_lat.append(time.monotonic() - tc)
            t_created = time.monotonic() - t0
            log(
                f"{args.bulk} ModelDeployments created in {t_created:.1f} s (one create: p50 "
                f"{1000 * pct(create_lat, 0.5):.0f} ms, max {1000 * max(create_lat):.0f} ms)"
            )

            def reached(key: str, timeout: float, stall: float) -> float | None:
                last, moved = -1, time.monotonic()
                while time.monotonic() - t0 < timeout:
                    cur = sampler.latest.get(key, 0)
                    if cur >= args.bulk:
                        return sampler.timeline[-1]["t"]
                    if cur != last:
                        last, moved = cur, time.monotonic()
                    elif time.monotonic() - moved > stall:
                        log(f"{key}: stuck at {cur}/{args.bulk} for {stall:.0f} s")
                        return None
                    time.sleep(0.2)
                return None

            t_planned = reached("planned", args.ready_timeout, args.stall)
            log(f"all planned: {t_planned if t_planned is None else round(t_planned, 1)} s")
            t_ready = reached("ready", args.ready_timeout, args.stall)
            log(f"all Ready: {t_ready if t_ready is None else round(t_ready, 1)} s")
            spy_s = time.monotonic() - t0
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(30)
            time.sleep(1.5)  # one more sample
            sampler.stop.set()
            sampler.join(10)
            snap = sampler.snapshot()
            deploys = json.loads(apps.list_namespaced_deployment(ns, _preload_content=False).data)["items"]
            bulk_mds = [o for o in snap["md_items"] if o["metadata"]["name"].startswith("bulk-")]
            stage_lines = stages(bulk_mds, deploys, snap["pod_items"], t0_wall)
            t_end = time.monotonic() - t0
            rss, hwm = proc_mem_kib(op.pid)
            cpu_after = {k: proc_cpu_s(p) for k, p in {**cp_pids, "operator": op.pid}.items()}
            api_after, m_after = apiserver_requests(kubeconfig), op_metrics(op)
            delta = api_after - api_before
            by_res: Counter[str] = Counter()
            for (res, _verb), v in delta.items():
                by_res[res or "(non-resource)"] += v

            def mdelta(name: str) -> float:
                return metric_sum(m_after, name) - metric_sum(m_before, name)

            reconciles = {
                re.search(r'result="([^"]*)"', k).group(1): v - m_before.get(k, 0.0)  # type: ignore[union-attr]
                for k, v in m_after.items()
                if k.startswith("modelfit_reconciles_total{") and v - m_before.get(k, 0.0)
            }
            n_rec = mdelta("modelfit_reconcile_duration_seconds_count")
            rec_s = mdelta("modelfit_reconcile_duration_seconds_sum")
            api_verbs = {
                re.search(r'verb="([^"]*)"', k).group(1): int(v - m_before.get(k, 0.0))  # type: ignore[union-attr]
                for k, v in m_after.items()
                if k.startswith("modelfit_api_requests_total{") and v - m_before.get(k, 0.0)
            }

            # pods per node, with what they request
            per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
            for p in snap["pod_items"]:
                nn = (p.get("spec") or {}).get("nodeName") or "(not scheduled)"
                from modelfit.occupancy import pod_requests

                req = pod_requests(p)
                per[nn][0] += 1
                per[nn][1] += req.cpu_millis / 1000
                per[nn][2] += req.memory_bytes / 2**30
            # why pods were refused: the scheduler's FailedScheduling events, latest message per pod
            refused: dict[str, str] = {}
            for e in core.list_namespaced_event(ns, field_selector="reason=FailedScheduling").items:
                if (e.involved_object.name or "").startswith("bulk-"):
                    refused[e.involved_object.name] = re.sub(r"\d+/\d+ nodes", "N nodes", e.message or "")[:200]
            rollouts = mdelta("modelfit_plan_changes_total")
            plan_events = sum(
                (e.count or 1)
                for e in core.list_namespaced_event(ns, field_selector="reason=PlanChanged").items
                if (e.involved_object.name or "").startswith("bulk-")
            )
            replicasets = sum(
                1 for r in apps.list_namespaced_replica_set(ns).items if r.metadata.name.startswith("bulk-")
            )
            n_deps = sum(1 for d in apps.list_namespaced_deployment(ns).items if d.metadata.name.startswith("bulk-"))
            results["bulk"] = {
                "n": args.bulk,
                "create_s": t_created,
                "all_planned_s": t_planned,
                "all_ready_s": t_ready,
                "planned": snap["planned"],
                "ready": snap["ready"],
                "deployments": n_deps,
                "pods": snap["pods"],
                "pods_scheduled": snap["pods_scheduled"],
                "pods_refused": len(refused),
                "refusals": Counter(refused.values()).most_common(5),
                "not_ready": snap["not_ready_reasons"].most_common(5),
                "plan_changes": rollouts,
                "plan_changed_events": plan_events,
                "replicasets": replicasets,
                "reconciles": reconciles,
                "reconcile_seconds": rec_s,
                "operator_rss_mib_end": rss / 1024,
                "operator_vmhwm_mib": hwm / 1024,
                "operator_rss_mib_sampled_peak": sampler.rss_peak_kib / 1024,
                "cpu_seconds": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in cpu_after},
                "wall_s": t_end,
                "operator_client_requests": api_verbs,
                "apiserver_requests_total": sum(delta.values()),
                "apiserver_requests_by_resource": dict(by_res.most_common(10)),
                "modeldeployment_requests_by_verb": {
                    v: n for (r, v), n in delta.items() if r == "modeldeployments" and n
                },
                "pods_per_node": {k: v[0] for k, v in sorted(per.items())},
                "timeline": [
                    {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in sampler.timeline
                ],
            }
            b = results["bulk"]
            rows += [
                ("burst nodes", sizing),
                (f"{b['n']} ModelDeployments: created (client)", f"{b['create_s']:.1f} s"),
                (f"{b['n']} ModelDeployments: all Planned", f"{t_planned:.1f} s" if t_planned is not None else f"{b['planned']}/{b['n']} Planned"),
                (f"{b['n']} ModelDeployments: all Ready (pods on kwok)",
                 f"{t_ready:.1f} s" if t_ready is not None else f"{b['ready']}/{b['n']} Ready after {t_end:.0f} s"),
                ("Deployments / pods / scheduled", f"{n_deps} / {b['pods']} / {b['pods_scheduled']}"),
                ("pods the scheduler refused (FailedScheduling)", f"{b['pods_refused']}" + (f": {b['refusals'][0][0][:120]!r}" if b["refusals"] else "")),
                (
                    "plan changes (rollouts) during the burst",
                    f"{rollouts:.0f} (/metrics), {plan_events} PlanChanged events, {replicasets} ReplicaSets, for "
                    f"{b['n']} new ModelDeployments",
                ),
                ("reconciles (operator /metrics)", f"{n_rec:.0f} {json.dumps({k: int(v) for k, v in reconciles.items()})}, {rec_s:.1f} s in reconcile (mean {1000 * rec_s / max(n_rec, 1):.0f} ms)"),
                ("operator RSS", f"end {b['operator_rss_mib_end']:.0f} MiB, peak {b['operator_vmhwm_mib']:.0f} MiB (VmHWM; sampled {b['operator_rss_mib_sampled_peak']:.0f} MiB)"),
                ("CPU seconds during the burst", ", ".join(f"{k} {v:.1f}" for k, v in sorted(b["cpu_seconds"].items(), key=lambda kv: -kv[1])) + f" (wall {t_end:.0f} s)"),
                ("API requests, operator's own client", f"{sum(api_verbs.values())} {api_verbs} ({sum(api_verbs.values()) / b['n']:.1f} per ModelDeployment; kopf's watches/patches not included)"),
                ("API requests on modeldeployments", f"{sum(b['modeldeployment_requests_by_verb'].values())} {b['modeldeployment_requests_by_verb']} (incl. the bench's {b['n']} creates and polling)"),
                ("API requests, whole API server", f"{b['apiserver_requests_total']} (all clients: operator, kopf, kcm, scheduler, kwok, bench)"),
            ]  # fmt: skip
            extra.append(f"by resource: {b['apiserver_requests_by_resource']}")
            # Ready over time: about 16 rows
            tl = sampler.timeline
            step = max(1, len(tl) // 16)
            picks = tl[::step] + ([tl[-1]] if tl and tl[-1] is not tl[::step][-1] else [])
            extra.append("over time (s: planned / pods scheduled / Ready, operator RSS MiB):")
            extra += [
                f"  {r['t']:6.1f}: {r['planned']:4d} / {r['pods_scheduled']:4d} / {r['ready']:4d}   {r['rss_kib'] / 1024:.0f}"
                for r in picks
            ]
            extra.append("where the time goes (seconds; API timestamps, 1 s resolution):")
            extra += stage_lines
            extra.append(
                f"pods per node of {args.node_cpu} CPU / {args.node_memory} (pods, CPU and memory GiB the burst's pods request):"
            )
            if len(per) <= 12:
                extra += [f"  {k}: {v[0]:.0f} pods, {v[1]:.1f} CPU, {v[2]:.1f} GiB" for k, v in sorted(per.items())]
            else:  # nodes alike: grouped
                groups: dict[tuple[float, float, float], list[str]] = defaultdict(list)
                for k, v in per.items():
                    groups[(v[0], round(v[1], 1), round(v[2], 1))].append(k)
                for (pods_n, c, m), members in sorted(
                    groups.items(), key=lambda kv: (kv[1][0] != "(not scheduled)", -kv[0][0])
                ):
                    who = members[0] if len(members) == 1 else f"{len(members)} nodes"
                    extra.append(
                        f"  {who}: {pods_n:.0f} pods, {c:.1f} CPU, {m:.1f} GiB" + (" each" if len(members) > 1 else "")
                    )
            if b["refusals"]:
                extra.append("scheduler refusals (pods: latest message):")
                extra += [f"  {c}: {m}" for m, c in b["refusals"]]
            if b["not_ready"]:
                extra.append("not Ready (ModelDeployments: condition):")
                extra += [f"  {c}: {m}" for m, c in b["not_ready"]]
            if spy is not None and (logdir / "py-spy.txt").exists():
                extra.append("operator profile (py-spy, during the burst):")
                extra += ["  " + line for line in pyspy_top(logdir / "py-spy.txt", spy_s, SPY_RATE)]
            if t_ready is None:
                failures.append(
                    f"{b['ready']}/{b['n']} Ready ({b['pods_scheduled']} pods scheduled, {b['pods_refused']} refused by the "
                    f"scheduler, {n_deps} Deployments)"
                )
            elif b["pods_refused"]:
                extra.append(f"note: all Ready, but the scheduler refused {b['pods_refused']} pods on the way")
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        op.stop()
        # The namespace first, while kwok still runs its nodes and deletes their pods at once (a pod on a deleted
        # kwok node waits for the pod garbage collector); then the nodes.
        t_clean = time.monotonic()
        kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)
        gone = wait_namespaces_gone(core, [ns], 180)
        for n in nodes:
            kubectl(kubeconfig, "delete", "node", n, "--wait=false", check=False)
        log(
            f"cleanup: namespace {ns} {'deleted' if gone else 'still terminating'} after "
            f"{time.monotonic() - t_clean:.0f} s, {len(nodes)} nodes deleted"
        )
        if started_cluster and not args.keep:
            # cluster.sh down also stops a real node (e2e/node.sh) it finds in MODELFIT_NODE_DIR; this bench
            # started none, and one that is there belongs to someone else's cluster.
            env = dict(os.environ, MODELFIT_NODE_DIR=tempfile.mkdtemp(prefix="modelfit-bench-nonode-"))
            subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "down"], check=False, env=env)

    width = max((len(r[0]) for r in rows), default=10)
    print(f"\n{'measure':<{width}}  result\n{'-' * width}  {'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for line in extra:
        print(line)
    print(f"operator log: {op.log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.bulk:
        b = results.get("bulk") or {}
        if failures:
            print(f"\nRESULT: FAIL: {'; '.join(dict.fromkeys(failures))}")
            return 1
        print(
            f"\nRESULT: PASS: {b['n']}/{b['n']} ModelDeployments Ready in {b['all_ready_s']:.1f} s (all planned in "
            f"{b['all_planned_s']:.1f} s) on {results['bulk_sizing']['nodes']} nodes; operator RSS "
            f"{b['operator_rss_mib_end']:.0f} MiB, peak {b['operator_vmhwm_mib']:.0f} MiB"
            + (f"; the scheduler refused {b['pods_refused']} pods on the way" if b["pods_refused"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
