"""Scale (issue 17, item 7): many ModelDeployments on many kwok nodes; time to all Ready, the operator's memory,
then a restart of the operator with all of them in place: how long until it has looked at every one again, and
whether anything changed (it must not: no plan hash, no Deployment generation, no new ReplicaSet).

    python bench/scale.py [--models 1000] [--nodes 100] [--namespaces 20] [--node-cpu 16] [--node-memory 64Gi]
        [--context 4096] [--threads 1] [--parallel 4] [--ready-timeout 1800] [--stall 300] [--settle 20]
        [--kubeconfig FILE] [--keep] [--json FILE] [--py-spy BIN]

Debug small first: ``python bench/scale.py --models 200 --nodes 20``.

Cluster: with ``--kubeconfig`` (or MODELFIT_KUBECONFIG) an already running cluster is used and only this run's
namespaces and nodes are deleted at the end (``-A``: the operator also reconciles whatever else is there, and
the numbers include it). Otherwise the bench starts its own e2e/cluster.sh control plane in
MODELFIT_STATE (default /tmp/modelfit-scale) on ports 1000 above the e2e defaults (each MODELFIT_*_PORT set in
the environment wins), so it never touches the default e2e cluster, and tears it down at the end (--keep leaves
it). The operator is this tree's ``modelfit run -A`` as a subprocess (e2e/_support.Operator).

What it does:
1. ``--nodes`` kwok nodes of --node-cpu/--node-memory, half of one instance type and half of another, labelled
   with this run's pool (every ModelDeployment selects the pool, so a reused cluster's other nodes stay out).
2. Sizing: the planner (``modelfit plan -f``, the operator's placement call) says what each model of the mix
   requests on an empty node of that shape; the bench refuses to run when the largest request times the nodes
   does not hold ``--models``.
3. ``--models`` ModelDeployments (a mix of small catalog models, mostly qwen3.5-0.8b Q4_0; context --context,
   threads --threads) over ``--namespaces`` namespaces, applied as one ``kubectl apply --server-side`` List per
   namespace, ``--parallel`` at once. Measures the time until every one is Ready (Ready=True at the current generation;
   from the Ready conditions' lastTransitionTime, 1 s resolution, and as the polls saw it), reconciles/s
   (operator /metrics), the operator's API requests (its own client; the API server's apiserver_request_total,
   all clients), RSS (VmRSS, VmHWM) and CPU seconds of the operator, of every control-plane process and of the
   rest of the machine (numbers from a shared machine are only as good as what else ran). ``--py-spy BIN``
   samples the operator until all Ready and prints where its time goes. Then --settle seconds with nothing
   changing: reconciles and status writes in them.
4. Records every ModelDeployment's generation, plan hash and status, and every Deployment's generation, pod
   template hash (modelfit.io/plan-hash), applied hash and resourceVersion; counts ReplicaSets.
5. Restarts the operator (SIGTERM, start): time until kopf's resume handler has succeeded for every one (the
   operator log's ``Handler 'modeldeployment_changed' succeeded`` lines and their timestamps; kopf's plain log
   does not name the object, and resume runs once per object per process), then --settle
   seconds of resyncs, then compares. A plan change is a plan hash that moved or a Deployment generation that
   moved; the count must be 0 (also: new ReplicaSets, PlanChanged events, modelfit_plan_changes_total).

Prints a table of numbers and ``RESULT: PASS`` or ``RESULT: FAIL: why`` (exit code 0 or 1). Not part of the CI
(.ci/run does not run bench/); one command runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
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
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Our own control plane unless the caller says otherwise: never the default e2e cluster's state dir or ports.
PORTS = {
    "MODELFIT_ETCD_PORT": 32379,
    "MODELFIT_ETCD_PEER_PORT": 32380,
    "MODELFIT_APISERVER_PORT": 36443,
    "MODELFIT_KCM_PORT": 40257,
    "MODELFIT_SCHEDULER_PORT": 40259,
    "MODELFIT_KWOK_PORT": 40247,
}
PORT_OFFSET = 1000
os.environ.setdefault("MODELFIT_STATE", "/tmp/modelfit-scale")
for _var, _port in PORTS.items():
    os.environ.setdefault(_var, str(_port + PORT_OFFSET))
sys.path.insert(0, str(ROOT / "bench"))

import operator_latency as ol  # noqa: E402  (puts e2e/ and operator/ on sys.path)
from _support import CRD_FILE, POOL_LABEL, Operator, md  # noqa: E402

STATE = Path(os.environ["MODELFIT_STATE"])
GROUP, VERSION, PLURAL = "modelfit.io", "v1alpha1", "modeldeployments"
CLASS_LABEL = "node.kubernetes.io/instance-type"
RUN_LABEL = "modelfit.io/bench-scale"
MACHINE = "(machine)"
BENCH = "this bench (and its kubectl)"
PLAN_HASH = "modelfit.io/plan-hash"  # the pod template's
APPLIED_HASH = "modelfit.io/applied-hash"  # the Deployment's: every child as applied
MANAGED = "app.kubernetes.io/managed-by=modelfit"
# (catalog model, share of the ModelDeployments): small models, so that ~10 fit a 16 CPU / 64Gi node
MIX = [("qwen3.5-0.8b", 5), ("qwen3-0.6b", 2), ("lfm2-350m", 1), ("llama-3.2-1b", 1), ("gemma-3-1b", 1)]
# kopf's plain log does not name the object; its resume handler runs once per object per process, so the
# count of these lines after a start is the count of ModelDeployments it has looked at.
HANDLED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*Handler 'modeldeployment_changed' succeeded")
HANDLER_FAILED = re.compile(r"Handler 'modeldeployment_changed' failed")


class Abort(Exception):
    """Stop measuring (not all Ready, the operator gone): report what there is."""


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def is_ready(obj: dict[str, Any]) -> bool:
    current = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"].get("generation")
    return current and condition(obj, "Ready").get("status") == "True"


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (not idle, not waiting on I/O), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / ol.CLK_TCK


def bench_cpu_s() -> float:
    """This process's CPU seconds and its reaped children's (kubectl; the operator only once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


class Cluster:
    """The lists the bench reads (raw JSON: the typed client's model classes are slow on a thousand objects)."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 8
        api = client.ApiClient(cfg)
        self.kubeconfig = kubeconfig
        self.core, self.apps, self.custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)

    def mds(self, run: str) -> list[dict[str, Any]]:
        r = self.custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, label_selector=f"{RUN_LABEL}={run}", _preload_content=False, _request_timeout=120
        )
        return list(json.loads(r.data)["items"])

    def deployments(self) -> list[dict[str, Any]]:
        r = self.apps.list_deployment_for_all_namespaces(
            label_selector=MANAGED, _preload_content=False, _request_timeout=120
        )
        return list(json.loads(r.data)["items"])

    def replicasets(self) -> list[dict[str, Any]]:
        r = self.apps.list_replica_set_for_all_namespaces(
            label_selector=MANAGED, _preload_content=False, _request_timeout=120
        )
        return list(json.loads(r.data)["items"])

    def pods(self) -> list[dict[str, Any]]:
        r = self.core.list_pod_for_all_namespaces(label_selector=MANAGED, _preload_content=False, _request_timeout=120)
        return list(json.loads(r.data)["items"])

    def events(self, reason: str) -> list[dict[str, Any]]:
        r = self.core.list_event_for_all_namespaces(
            field_selector=f"reason={reason}", _preload_content=False, _request_timeout=120
        )
        return list(json.loads(r.data)["items"])


class Sampler(threading.Thread):
    """Every 0.5 s the operator's RSS; every ``poll`` s the ModelDeployments (Ready count) and reconciles."""

    def __init__(self, cluster: Cluster, run: str, op: Operator, n: int, poll: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.run_id, self.op, self.n, self.poll = cluster, run, op, n, poll
        self.halt = threading.Event()
        self.t0 = time.monotonic()
        self.rss_peak_kib = 0
        self.timeline: list[dict[str, Any]] = []  # t, ready, planned, reconciles, rss_kib
        self.ready = 0
        self.items: list[dict[str, Any]] = []
        self.errors = 0

    def run(self) -> None:
        last = 0.0
        while not self.halt.is_set():
            try:
                rss, _ = self.op.rss_kib()
            except OSError:
                rss = 0
            self.rss_peak_kib = max(self.rss_peak_kib, rss)
            now = time.monotonic()
            if now - last >= self.poll:
                last = now
                try:
                    items = self.cluster.mds(self.run_id)
                    rec = ol.metric_sum(ol.op_metrics(self.op), "modelfit_reconcile_duration_seconds_count")
                except Exception:  # noqa: BLE001 - a slow list must not end the sampling
                    self.errors += 1
                else:
                    self.items = items
                    self.ready = sum(1 for o in items if is_ready(o))
                    planned = sum(1 for o in items if condition(o, "Planned").get("status") == "True")
                    self.timeline.append(
                        {"t": now - self.t0, "ready": self.ready, "planned": planned, "reconciles": rec, "rss_kib": rss}
                    )
            self.halt.wait(0.5)


def models_for(args: argparse.Namespace, run: str, pool: str, namespaces: list[str]) -> list[dict[str, Any]]:
    """The ModelDeployments: the mix spread in proportion, round-robin over the namespaces."""
    names = [m for m, share in MIX for _ in range(share)]
    out = []
    for i in range(args.models):
        m = md(
            f"m{i:04d}",
            namespaces[i % len(namespaces)],
            model={"catalog": names[i % len(names)], "quant": "Q4_0"},
            context=args.context,
            threads=args.threads,
            nodeSelector={POOL_LABEL: pool},
        )
        m["metadata"]["labels"] = {RUN_LABEL: run}
        out.append(m)
    return out


def sizing(args: argparse.Namespace) -> tuple[list[str], int, bool]:
    """What each model of the mix requests on an empty node (the planner), and whether all fit."""
    lines, cpu_max, mem_max = [], 0.0, 0.0
    for model, _ in MIX:
        probe = md("probe", model={"catalog": model, "quant": "Q4_0"}, context=args.context, threads=args.threads)
        cpu, mem, summary = ol.planner_requests(probe, args.node_cpu, args.node_memory)
        cpu_max, mem_max = max(cpu_max, cpu), max(mem_max, mem)
        lines.append(f"  {model}: {summary}")
    node_cpu, node_mem = ol.quantity(args.node_cpu), ol.quantity(args.node_memory)
    per_node = min(math.floor(node_cpu / cpu_max), math.floor(node_mem / mem_max), 250)
    room = per_node * args.nodes
    lines.insert(
        0,
        f"{args.nodes} nodes of {args.node_cpu} CPU / {args.node_memory}: the largest request fits {per_node} per "
        f"node, room for {room} (>= {args.models} needed; {args.models / args.nodes:.1f} per node on average)",
    )
    return lines, room, room >= args.models


def snapshot(cluster: Cluster, run: str) -> dict[str, Any]:
    """What a restart must not change, per object."""
    mds = {key(o): o for o in cluster.mds(run)}
    deps = {key(d): d for d in cluster.deployments() if key(d) in mds}
    rss = [
        r for r in cluster.replicasets() if (r["metadata"]["namespace"], r["metadata"]["name"].rsplit("-", 1)[0]) in mds
    ]
    return {
        "md": {
            k: {
                "generation": o["metadata"].get("generation"),
                "observed": (o.get("status") or {}).get("observedGeneration"),
                "plan_hash": ((o.get("status") or {}).get("plan") or {}).get("hash"),
                "status": o.get("status") or {},
                "ready": is_ready(o),
                "resource_version": o["metadata"].get("resourceVersion"),
            }
            for k, o in mds.items()
        },
        "deploy": {
            k: {
                "generation": d["metadata"].get("generation"),
                "template_hash": ((d["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(
                    PLAN_HASH
                ),
                "applied": (d["metadata"].get("annotations") or {}).get(APPLIED_HASH),
                "resource_version": d["metadata"].get("resourceVersion"),
            }
            for k, d in deps.items()
        },
        "replicasets": len(rss),
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    def moved(kind: str, field: str) -> list[str]:
        return sorted(
            f"{k[0]}/{k[1]}"
            for k, v in before[kind].items()
            if k not in after[kind] or after[kind][k][field] != v[field]
        )

    plan_hash = moved("md", "plan_hash")
    generation = moved("deploy", "generation")
    return {
        "plan_hash_moved": plan_hash,
        "md_generation_moved": moved("md", "generation"),
        "deploy_generation_moved": generation,
        "template_hash_moved": moved("deploy", "template_hash"),
        "applied_hash_moved": moved("deploy", "applied"),
        "deploy_resource_version_moved": moved("deploy", "resource_version"),
        "status_changed": moved("md", "status"),
        "md_resource_version_moved": moved("md", "resource_version"),
        "deploy_missing": sorted(f"{k[0]}/{k[1]}" for k in before["md"] if k not in after["deploy"]),
        "not_ready_after": sorted(f"{k[0]}/{k[1]}" for k, v in after["md"].items() if not v["ready"]),
        "replicasets": (before["replicasets"], after["replicasets"]),
        "plan_changes": sorted(set(plan_hash) | set(generation)),
    }


def status_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Paths where two statuses differ, with both values (for the report: what was rewritten)."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(status_diff(va, vb, f"{prefix}{k}."))
        elif k == "conditions" and isinstance(va, list) and isinstance(vb, list):
            ca, cb = {c.get("type"): c for c in va}, {c.get("type"): c for c in vb}
            for t in sorted(set(ca) | set(cb), key=str):
                out.update(status_diff(ca.get(t) or {}, cb.get(t) or {}, f"{prefix}conditions[{t}]."))
        else:
            out[f"{prefix}{k}"] = (va, vb)
    return out


def status_changes(before: dict[str, Any], after: dict[str, Any], names: list[str]) -> tuple[Counter[str], list[str]]:
    """How many ModelDeployments each status field changed on, and one example (before -> after) per field."""
    paths: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for name in names:
        k = tuple(name.split("/", 1))
        for path, (va, vb) in status_diff(before["md"][k]["status"], after["md"][k]["status"]).items():
            paths[path] += 1
            examples.setdefault(path, f"  {path} of {name}: {str(va)[:300]!r} -> {str(vb)[:300]!r}")
    return paths, [examples[p] for p, _ in paths.most_common(6)]


def handled_since(log_path: Path, offset: int) -> tuple[list[float], int]:
    """Epochs of the ``Handler 'modeldeployment_changed' succeeded`` lines after offset, and the failed ones."""
    out: list[float] = []
    failed = 0
    with open(log_path, "rb") as f:
        f.seek(offset)
        for raw in f:
            line = raw.decode(errors="replace")
            m = HANDLED.match(line)
            if m:
                out.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
            elif HANDLER_FAILED.search(line):
                failed += 1
    return out, failed


def metrics_delta(after: dict[str, float], before: dict[str, float], prefix: str, label: str) -> dict[str, int]:
    out = {}
    for k, v in after.items():
        if k.startswith(prefix + "{") and v - before.get(k, 0.0):
            m = re.search(label + r'="([^"]*)"', k)
            out[m.group(1) if m else k] = int(v - before.get(k, 0.0))
    return out


def wait_metrics(op: Operator, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not op.running():
            raise RuntimeError(f"the operator exited:\n{op.log_tail(40)}")
        try:
            op.metrics()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the operator's /metrics did not answer in {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=1000, help="ModelDeployments")
    ap.add_argument("--nodes", type=int, default=100, help="kwok nodes")
    ap.add_argument("--namespaces", type=int, default=20, help="namespaces the ModelDeployments are spread over")
    ap.add_argument("--node-cpu", default="16", help="allocatable CPU of each node")
    ap.add_argument("--node-memory", default="64Gi", help="allocatable memory of each node")
    ap.add_argument("--context", type=int, default=4096, help="spec.context of every ModelDeployment")
    ap.add_argument("--threads", type=int, default=1, help="spec.threads (the CPU request in cores)")
    ap.add_argument("--parallel", type=int, default=4, help="kubectl applies at once (one List per namespace)")
    ap.add_argument("--poll", type=float, default=0, help="seconds between lists of the ModelDeployments (0: auto)")
    ap.add_argument("--ready-timeout", type=float, default=1800, help="seconds to wait for all Ready")
    ap.add_argument("--stall", type=float, default=300, help="stop waiting when Ready has not moved for this long")
    ap.add_argument("--converge-timeout", type=float, default=1200, help="seconds to wait after the restart")
    ap.add_argument("--settle", type=float, default=20, help="seconds of resyncs before each snapshot")
    ap.add_argument("--kubeconfig", default=os.environ.get("MODELFIT_KUBECONFIG"), help="use this running cluster")
    ap.add_argument("--keep", action="store_true", help="leave a cluster this bench started running")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--py-spy", metavar="BIN", help="profile the operator with this py-spy until all Ready")
    args = ap.parse_args()
    if args.models < 1 or args.nodes < 2 or args.namespaces < 1:
        ap.error("--models >= 1, --nodes >= 2 and --namespaces >= 1")
    poll = args.poll or max(2.0, args.models / 200)  # a list of a thousand objects costs the API server
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "operator"), os.environ.get("PYTHONPATH")]))

    t_bench = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: the finally below cleans up
    size_lines, _room, fits = sizing(args)
    for line in size_lines:
        log(line)
    if not fits:
        print(f"RESULT: FAIL: they do not fit: {size_lines[0]}")
        return 1
    started_cluster = False
    if args.kubeconfig:
        kubeconfig = args.kubeconfig
    else:
        kubeconfig = str(STATE / "kubeconfig")
        if subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "status"], capture_output=True).returncode != 0:
            log(f"starting a control plane in {STATE} (apiserver port {os.environ['MODELFIT_APISERVER_PORT']})")
            started_cluster = True  # torn down below even when it fails half-way
            subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "up"], check=True)
    cp_pids = ol.control_plane_pids() if not args.kubeconfig else {}  # ol.STATE is ours: set above
    cluster: Cluster | None = None
    run = uuid.uuid4().hex[:6]
    pool = f"scale-{run}"
    namespaces = [f"scale-{run}-{i:02d}" for i in range(args.namespaces)]
    node_names = [f"{pool}-{i:03d}" for i in range(args.nodes)]
    logdir = Path(tempfile.mkdtemp(prefix="modelfit-scale-run-"))
    op = Operator(kubeconfig, logdir / "operator.log")
    rows: list[tuple[str, str]] = []
    extra: list[str] = []
    failures: list[str] = []
    results: dict[str, Any] = {"models": args.models, "nodes": args.nodes, "namespaces": args.namespaces}

    def cpu_now() -> dict[str, float]:
        return {
            MACHINE: machine_busy_s(),
            BENCH: bench_cpu_s(),
            **{k: ol.proc_cpu_s(p) for k, p in {**cp_pids, "operator": op.pid}.items()},
        }

    def cpu_line(before: dict[str, float], after: dict[str, float], wall: float) -> str:
        """CPU seconds per process, and what the rest of the machine used (other work on a shared machine)."""
        d = {k: after.get(k, 0.0) - v for k, v in before.items()}
        busy = d.pop(MACHINE, 0.0)
        out = ", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        cores = os.cpu_count() or 1
        return (
            f"{out}; everything else on the machine {busy - sum(d.values()):.0f} "
            f"(machine busy {busy:.0f} of {wall * cores:.0f} CPU seconds, {cores} cores)"
        )

    spy: subprocess.Popen[bytes] | None = None
    try:
        ol.kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        ol.kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
        cluster = Cluster(kubeconfig)
        # 1. nodes, two instance types
        t = time.monotonic()
        items = [
            ol.node(n, args.node_cpu, args.node_memory, {POOL_LABEL: pool, CLASS_LABEL: f"{pool}-{'ab'[i % 2]}"})
            for i, n in enumerate(node_names)
        ]
        ol.kubectl(
            kubeconfig, "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        )
        while True:
            nodes = json.loads(ol.kubectl(kubeconfig, "get", "nodes", "-l", f"{POOL_LABEL}={pool}", "-o", "json"))
            ready = sum(1 for n in nodes["items"] if condition(n, "Ready").get("status") == "True")
            if ready == args.nodes:
                break
            if time.monotonic() - t > 120:
                raise TimeoutError(f"{ready}/{args.nodes} kwok nodes Ready after 120 s")
            time.sleep(1)
        log(f"{args.nodes} kwok nodes Ready in {time.monotonic() - t:.1f} s")
        ns_list = {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {RUN_LABEL: run}}} for n in namespaces
        ]}  # fmt: skip
        ol.kubectl(kubeconfig, "create", "-f", "-", input=json.dumps(ns_list))

        # 2. the operator, idle with the nodes
        op.start()
        wait_metrics(op)
        time.sleep(3)
        rss_idle, _ = op.rss_kib()
        log(f"operator pid {op.pid}, log {op.log_path}, idle RSS {mib(rss_idle)}")

        # 3. all the ModelDeployments at once
        manifests = models_for(args, run, pool, namespaces)
        lists = [
            {"apiVersion": "v1", "kind": "List", "items": [m for m in manifests if m["metadata"]["namespace"] == ns]}
            for ns in namespaces
        ]
        api_before, m_before, cpu_before = ol.apiserver_requests(kubeconfig), ol.op_metrics(op), cpu_now()
        sampler = Sampler(cluster, run, op, args.models, poll)
        t0_wall = time.time()
        sampler.t0 = t0 = time.monotonic()
        sampler.start()
        if args.py_spy:
            spy = subprocess.Popen(
                [args.py_spy, "record", "--pid", str(op.pid), "--format", "raw", "--rate", str(ol.SPY_RATE),
                 "--output", str(logdir / "py-spy.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool_ex:
            list(
                pool_ex.map(
                    lambda lst: ol.kubectl(kubeconfig, "apply", "--server-side", "-f", "-", input=json.dumps(lst)),
                    lists,
                )
            )
        t_applied = time.monotonic() - t0
        log(
            f"{args.models} ModelDeployments applied in {t_applied:.1f} s ({len(lists)} Lists, {args.parallel} at once)"
        )
        last, moved = -1, time.monotonic()
        t_seen: float | None = None
        while time.monotonic() - t0 < args.ready_timeout:
            cur = sampler.ready
            if cur >= args.models:
                t_seen = sampler.timeline[-1]["t"]
                break
            if cur != last:
                last, moved = cur, time.monotonic()
                log(f"Ready {cur}/{args.models} at {time.monotonic() - t0:.0f} s, operator RSS {mib(op.rss_kib()[0])}")
            elif time.monotonic() - moved > args.stall:
                log(f"Ready stuck at {cur}/{args.models} for {args.stall:.0f} s")
                break
            time.sleep(1)
        t_wait = time.monotonic() - t0
        sampler.halt.set()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)
            extra.append(f"operator profile until all Ready (py-spy, {logdir / 'py-spy.txt'}):")
            extra += ["  " + line for line in ol.pyspy_top(logdir / "py-spy.txt", t_wait, ol.SPY_RATE)]
        sampler.join(30)
        rss_ready, hwm_ready = op.rss_kib()
        m_ready, cpu_ready, api_ready = ol.op_metrics(op), cpu_now(), ol.apiserver_requests(kubeconfig)
        t_cpu_ready = time.monotonic() - t0
        items = cluster.mds(run)
        ready_at = [ts(condition(o, "Ready").get("lastTransitionTime")) for o in items if is_ready(o)]
        n_ready = len(ready_at)
        t_ready = max(t for t in ready_at if t is not None) - t0_wall if n_ready == args.models else None
        recs = ol.metric_sum(m_ready, "modelfit_reconcile_duration_seconds_count") - ol.metric_sum(
            m_before, "modelfit_reconcile_duration_seconds_count"
        )
        rec_s = ol.metric_sum(m_ready, "modelfit_reconcile_duration_seconds_sum") - ol.metric_sum(
            m_before, "modelfit_reconcile_duration_seconds_sum"
        )
        by_result = metrics_delta(m_ready, m_before, "modelfit_reconciles_total", "result")
        verbs = metrics_delta(m_ready, m_before, "modelfit_api_requests_total", "verb")
        api_d = api_ready - api_before
        md_verbs = {v: n for (r, v), n in api_d.items() if r == "modeldeployments" and n}
        tl = sampler.timeline
        rates = [
            (b["reconciles"] - a["reconciles"]) / (b["t"] - a["t"])
            for a, b in itertools.pairwise(tl)
            if b["t"] > a["t"]
        ]
        span = t_seen if t_seen is not None else t_wait
        results["ready"] = {
            "applied_s": t_applied, "all_ready_s": t_ready, "all_ready_polled_s": t_seen, "ready": n_ready,
            "reconciles": recs, "reconciles_by_result": by_result, "reconcile_seconds": rec_s,
            "reconciles_per_s": recs / span if span else 0.0, "reconciles_per_s_peak": max(rates, default=0.0),
            "operator_requests": verbs, "apiserver_requests": sum(api_d.values()), "modeldeployment_requests": md_verbs,
            "rss_idle_kib": rss_idle, "rss_kib": rss_ready, "vmhwm_kib": hwm_ready, "rss_sampled_peak_kib": sampler.rss_peak_kib,
            "cpu_s": {k: cpu_ready.get(k, 0.0) - v for k, v in cpu_before.items()},
            "timeline": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in tl],
        }  # fmt: skip
        r = results["ready"]
        ready_txt = (
            f"{t_ready:.0f} s (Ready conditions' lastTransitionTime; polls saw it at {t_seen:.0f} s)"
            if t_ready is not None and t_seen is not None
            else f"{n_ready}/{args.models} Ready after {t_wait:.0f} s"
        )
        rows += [
            ("cluster", f"{args.nodes} kwok nodes of {args.node_cpu} CPU / {args.node_memory} (2 instance types), {args.namespaces} namespaces"),
            ("ModelDeployments applied (kubectl apply --server-side, Lists)", f"{args.models} in {t_applied:.1f} s"),
            (f"all {args.models} Ready", ready_txt),
            ("reconciles until all Ready", f"{recs:.0f} {by_result}, {recs / args.models:.1f} per ModelDeployment; {r['reconciles_per_s']:.1f}/s mean, {r['reconciles_per_s_peak']:.1f}/s peak ({poll:.0f} s windows); {rec_s:.0f} s inside reconcile (mean {1000 * rec_s / max(recs, 1):.0f} ms)"),
            ("operator API requests (own client)", f"{sum(verbs.values())} {verbs} ({sum(verbs.values()) / args.models:.1f} per ModelDeployment; kopf's watches and patches not counted)"),
            ("API server requests, all clients", f"{sum(api_d.values())}; on modeldeployments {md_verbs} (incl. the bench's applies and lists)"),
            ("operator RSS", f"idle {mib(rss_idle)} (nodes only); all Ready: {mib(rss_ready)}, peak {mib(hwm_ready)} (VmHWM), +{(rss_ready - rss_idle) / args.models:.0f} KiB per ModelDeployment"),
            ("CPU seconds until all Ready", cpu_line(cpu_before, cpu_ready, t_cpu_ready) + f" (wall {t_cpu_ready:.0f} s)"),
        ]  # fmt: skip
        step = max(1, len(tl) // 16)
        picks = tl[::step] + ([tl[-1]] if tl and tl[-1] is not tl[::step][-1] else [])
        extra.append(
            "over time (s: Planned / Ready, reconciles so far, operator RSS MiB)"
            + (f"; {sampler.errors} polls failed" if sampler.errors else "")
            + ":"
        )
        extra += [
            f"  {p['t']:6.0f}: {p['planned']:5d} / {p['ready']:5d}   {p['reconciles']:7.0f}   {p['rss_kib'] / 1024:5.0f}"
            for p in picks
        ]
        if n_ready < args.models:
            why = Counter(
                f"{c.get('type')}={c.get('status')} {c.get('reason')}"
                for o in items
                if not is_ready(o)
                for c in [condition(o, "Ready") or {"type": "no Ready condition"}]
            )
            extra.append(f"not Ready: {dict(why.most_common(5))}")
            failures.append(f"{n_ready}/{args.models} Ready after {t_wait:.0f} s")
            raise Abort

        # 4. before the restart: a settle with nothing changing, then the record
        at_ready = snapshot(cluster, run)
        api_at_ready = ol.apiserver_requests(kubeconfig)
        time.sleep(args.settle)
        m_pre = ol.op_metrics(op)
        pre_recs = ol.metric_sum(m_pre, "modelfit_reconcile_duration_seconds_count") - ol.metric_sum(
            m_ready, "modelfit_reconcile_duration_seconds_count"
        )
        before = snapshot(cluster, run)
        api_settle = ol.apiserver_requests(kubeconfig) - api_at_ready
        settle_diff = compare(at_ready, before)
        settle_paths, settle_examples = status_changes(at_ready, before, settle_diff["status_changed"])
        plan_changes_first = ol.metric_sum(m_pre, "modelfit_plan_changes_total")
        rss_pre, hwm_pre = op.rss_kib()
        pre_by = metrics_delta(m_pre, m_ready, "modelfit_reconciles_total", "result")
        pre_verbs = metrics_delta(m_pre, m_ready, "modelfit_api_requests_total", "verb")
        settle_res = Counter({f"{r or '-'} {v}": n for (r, v), n in api_settle.items() if n})
        rows += [
            (f"{args.settle:.0f} s after all Ready (nothing changing)", f"{pre_recs:.0f} reconciles {pre_by}, operator requests {pre_verbs}, RSS {mib(rss_pre)}"),
            ("  status writes / API server requests in it", f"{len(settle_diff['status_changed'])} statuses changed, {len(settle_diff['plan_changes'])} plan changes; API server: {dict(settle_res.most_common(6))}"),
        ]  # fmt: skip
        if settle_paths:
            extra.append(f"status fields rewritten with nothing changing: {dict(settle_paths.most_common(8))}")
            extra += settle_examples
        results["settle"] = {
            "reconciles": pre_recs, "by_result": pre_by, "operator_requests": pre_verbs,
            "status_changed": len(settle_diff["status_changed"]), "plan_changes": len(settle_diff["plan_changes"]),
            "paths": dict(settle_paths), "apiserver": dict(settle_res),
        }  # fmt: skip
        log(f"before restart: {len(before['deploy'])} Deployments, {before['replicasets']} ReplicaSets, "
            f"{pre_recs:.0f} reconciles in the {args.settle:.0f} s settle, RSS {mib(rss_pre)}")  # fmt: skip

        # 5. restart
        t_stop = time.monotonic()
        op.stop()
        stop_s = time.monotonic() - t_stop
        offset = op.log_path.stat().st_size
        api_before, cpu_before_ops = (
            ol.apiserver_requests(kubeconfig),
            {MACHINE: machine_busy_s(), BENCH: bench_cpu_s(), **{k: ol.proc_cpu_s(p) for k, p in cp_pids.items()}},
        )
        restart_wall = time.time()
        t1 = time.monotonic()
        op.start()
        cpu_before = {**cpu_before_ops, "operator": 0.0}  # a new process
        wait_metrics(op)
        t_up = time.monotonic() - t1
        want = len(before["md"])
        seen: list[float] = []
        failed = 0
        while time.monotonic() - t1 < args.converge_timeout:
            seen, failed = handled_since(op.log_path, offset)
            if len(seen) >= want:
                break
            if not op.running():
                failures.append(f"the operator exited after the restart:\n{op.log_tail(20)}")
                break
            time.sleep(1)
        t_looked = time.monotonic() - t1
        looked = len(seen)
        t_all = sorted(seen)[want - 1] - restart_wall if looked >= want else None
        t_first = min(seen) - restart_wall if seen else None
        if not op.running():
            raise Abort
        m_conv, rss_conv = ol.op_metrics(op), op.rss_kib()
        conv_recs = ol.metric_sum(m_conv, "modelfit_reconcile_duration_seconds_count")
        cpu_conv = cpu_now()
        time.sleep(args.settle)  # resyncs after: anything the resume did not write, they would
        m_after = ol.op_metrics(op)
        after = snapshot(cluster, run)
        rss_after, hwm_after = op.rss_kib()
        api_d = ol.apiserver_requests(kubeconfig) - api_before
        diff = compare(before, after)
        verbs = metrics_delta(m_after, {}, "modelfit_api_requests_total", "verb")
        verbs_conv = metrics_delta(m_conv, {}, "modelfit_api_requests_total", "verb")
        after_recs = ol.metric_sum(m_after, "modelfit_reconcile_duration_seconds_count")
        plan_metric = ol.metric_sum(m_after, "modelfit_plan_changes_total")
        plan_events = [
            e for e in cluster.events("PlanChanged")
            if e["metadata"]["namespace"] in namespaces
            and (ts(e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp")) or 0) >= restart_wall - 1
        ]  # fmt: skip
        changed_paths, changed_examples = status_changes(before, after, diff["status_changed"])
        results["restart"] = {
            "stop_s": stop_s, "metrics_up_s": t_up, "first_handled_s": t_first, "all_handled_s": t_all,
            "handled": looked, "handler_failed": failed, "reconciles_to_converge": conv_recs, "reconciles_incl_settle": after_recs,
            "operator_requests_to_converge": verbs_conv, "operator_requests_incl_settle": verbs,
            "apiserver_requests_incl_settle": sum(api_d.values()),
            "rss_kib_before": rss_pre, "vmhwm_kib_before": hwm_pre, "rss_kib_converged": rss_conv[0],
            "rss_kib_after": rss_after, "vmhwm_kib_after": hwm_after,
            "cpu_s_to_converge": {k: cpu_conv.get(k, 0.0) - v for k, v in cpu_before.items()},
            "plan_changes_total_metric": plan_metric, "plan_changed_events": len(plan_events),
            "plan_changes_total_metric_first_run": plan_changes_first,
            "changed_status_paths": dict(changed_paths),
            **{k: (v if isinstance(v, tuple) else len(v)) for k, v in diff.items()},
            "examples": {k: v[:5] for k, v in diff.items() if isinstance(v, list) and v},
        }  # fmt: skip
        rr = results["restart"]
        all_txt = (
            f"{t_all:.1f} s after the start (first at {t_first:.1f} s; /metrics up at {t_up:.1f} s)"
            if t_all is not None
            else f"{looked}/{want} after {t_looked:.0f} s"
        ) + (f"; {failed} handler failures" if failed else "")
        n_changes = len(diff["plan_changes"])
        rows += [
            ("restart: stop (SIGTERM -> exit)", f"{stop_s:.1f} s"),
            ("restart: every ModelDeployment looked at again", all_txt),
            ("restart: reconciles", f"{conv_recs:.0f} until all looked at ({conv_recs / args.models:.2f} per ModelDeployment), {after_recs:.0f} incl. {args.settle:.0f} s of resyncs"),
            ("restart: operator API requests (own client)", f"{sum(verbs_conv.values())} {verbs_conv} until all looked at; {sum(verbs.values())} incl. resyncs"),
            ("restart: API server requests, all clients", f"{sum(api_d.values())} (restart + {args.settle:.0f} s)"),
            ("restart: PLAN CHANGES (plan hash or Deployment generation moved)", f"{n_changes}" + (f" e.g. {diff['plan_changes'][:3]}" if n_changes else "")),
            ("restart: other changes", f"pod template hash moved {len(diff['template_hash_moved'])}, applied hash moved {len(diff['applied_hash_moved'])}, Deployment resourceVersion moved {len(diff['deploy_resource_version_moved'])}, ReplicaSets {diff['replicasets'][0]} -> {diff['replicasets'][1]}, PlanChanged events {len(plan_events)}, modelfit_plan_changes_total {plan_metric:.0f}"),
            ("restart: status writes", f"{len(diff['status_changed'])} statuses differ, {len(diff['md_resource_version_moved'])} ModelDeployments' resourceVersion moved; not Ready after: {len(diff['not_ready_after'])}"),
            ("restart: operator RSS", f"before {mib(rss_pre)} (peak {mib(hwm_pre)}); after the restart: {mib(rss_conv[0])} when all looked at, {mib(rss_after)} after the settle, peak {mib(hwm_after)}"),
            ("restart: CPU seconds until all looked at", cpu_line(cpu_before, cpu_conv, t_looked)),
        ]  # fmt: skip
        if changed_paths:
            extra.append(f"status fields the restart rewrote (ModelDeployments): {dict(changed_paths.most_common(8))}")
            extra += changed_examples
        if t_all is None:
            failures.append(f"after the restart only {looked}/{want} looked at in {t_looked:.0f} s")
        if n_changes:
            failures.append(f"{n_changes} plan changes on restart (e.g. {diff['plan_changes'][:3]})")
        if diff["deploy_missing"] or diff["not_ready_after"]:
            failures.append(
                f"after the restart: {len(diff['deploy_missing'])} Deployments missing, {len(diff['not_ready_after'])} not Ready"
            )
        if diff["replicasets"][1] != diff["replicasets"][0]:
            failures.append(f"ReplicaSets {diff['replicasets'][0]} -> {diff['replicasets'][1]} on restart")
    except Abort:
        pass
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        op.stop()
        t_clean = time.monotonic()
        if started_cluster and not args.keep:
            # cluster.sh down also stops a real node it finds in MODELFIT_NODE_DIR: this bench started none
            with tempfile.TemporaryDirectory(prefix="modelfit-scale-nonode-") as nonode:
                env = dict(os.environ, MODELFIT_NODE_DIR=nonode)
                subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "down"], check=False, env=env, capture_output=True)
            log(f"control plane in {STATE} stopped and removed")
        elif cluster is not None:
            for ns in namespaces:
                ol.kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)
            ol.wait_namespaces_gone(cluster.core, namespaces, 600)
            for n in node_names:
                ol.kubectl(kubeconfig, "delete", "node", n, "--wait=false", check=False)
            log(
                f"cleanup: {len(namespaces)} namespaces and {len(node_names)} nodes deleted in {time.monotonic() - t_clean:.0f} s"
            )

    results["wall_s"] = time.monotonic() - t_bench
    rows.append(("bench wall time", f"{results['wall_s']:.0f} s"))
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\n{'measure':<{width}}  result\n{'-' * width}  {'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("sizing (the planner, empty node):")
    for line in size_lines:
        print("  " + line.strip())
    for line in extra:
        print(line)
    print(f"operator log: {op.log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if failures:
        print(f"\nRESULT: FAIL: {'; '.join(failures)}")
        return 1
    r, rr = results["ready"], results["restart"]
    print(
        f"\nRESULT: PASS: {args.models} ModelDeployments on {args.nodes} nodes all Ready in {r['all_ready_s']:.0f} s, "
        f"operator RSS {mib(r['rss_kib'])} (peak {mib(r['vmhwm_kib'])}); restart: all looked at in "
        f"{rr['all_handled_s']:.0f} s, 0 plan changes, RSS {mib(rr['rss_kib_after'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
