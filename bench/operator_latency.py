"""Operator latency on the real local control plane (e2e/cluster.sh: etcd, kube-apiserver,
controller-manager, scheduler, kwok nodes), with ``modelfit run`` as a subprocess.

    python bench/operator_latency.py [--applies 20] [--bulk 200] [--node-events 3] [--keep]

Measures: apply -> Deployment created (p50/p95 over --applies sequential applies); node added
(or removed) -> plan updated; --bulk ModelDeployments created at once -> all planned with their
Deployment, and all Ready (total time, operator RSS, API requests: the operator's own client
from its /metrics, and the API server's apiserver_request_total by resource). Uses an already
running e2e cluster (MODELFIT_KUBECONFIG or the default state dir) or starts one (and stops it
unless --keep). Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from _support import CRD_FILE, GPU_TAINT, POOL_LABEL, Operator, md  # noqa: E402

CACHE = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
STATE = Path(os.environ.get("MODELFIT_STATE", "/tmp/modelfit-cluster"))
KUBECTL = str(CACHE / "bin" / "kubectl")


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
            "annotations": {"kwok.x-k8s.io/node": "fake"},
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


def apiserver_requests(kubeconfig: str) -> Counter[tuple[str, str]]:
    """apiserver_request_total summed by (resource, verb)."""
    out: Counter[tuple[str, str]] = Counter()
    for line in kubectl(kubeconfig, "get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        out[(labels.get("resource", ""), labels.get("verb", ""))] += int(float(line.rsplit(" ", 1)[1]))
    return out


def operator_requests(op: Operator) -> int:
    total = 0.0
    for line in op.metrics().splitlines():
        if line.startswith("modelfit_api_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def plan_changes(op: Operator) -> int:
    for line in op.metrics().splitlines():
        if line.startswith("modelfit_plan_changes_total "):
            return int(float(line.split()[1]))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--applies", type=int, default=20)
    ap.add_argument("--bulk", type=int, default=200)
    ap.add_argument("--node-events", type=int, default=3, help="GPU node add/remove cycles")
    ap.add_argument("--keep", action="store_true", help="leave a cluster this bench started running")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

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

    api = client.ApiClient(config.load_kube_config(config_file=kubeconfig) or None)
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    run = uuid.uuid4().hex[:6]
    ns = f"bench-{run}"
    pool = f"bench-{run}"
    nodes: list[str] = []
    logdir = Path(tempfile.mkdtemp(prefix="modelfit-bench-"))
    op = Operator(kubeconfig, logdir / "operator.log")
    results: dict[str, Any] = {}

    def add_node(name: str, **kw: Any) -> None:
        core.create_node(node(name, **kw))
        nodes.append(name)

    def get_md(name: str) -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments", name))

    def create_md(obj: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments", obj)

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

    try:
        core.create_namespace({"metadata": {"name": ns}})
        group = {POOL_LABEL: pool, "node.kubernetes.io/instance-type": f"{pool}-big"}
        for i in range(10):
            add_node(f"{pool}-big-{i}", cpu="64", memory="256Gi", labels=group)
        op.start()
        time.sleep(2)
        # requests overridden to 100m CPU: the planner asks for every free core, and we want all pods to schedule
        light = {"resources": {"requests": {"cpu": "100m"}}, "nodeSelector": {POOL_LABEL: pool}, "context": 4096}

        # 1. apply -> Deployment created
        lat = []
        for i in range(args.applies):
            name = f"seq-{i}"
            t0 = time.monotonic()
            create_md(md(name, **light))
            t1 = wait(lambda n=name: apps.read_namespaced_deployment(n, ns), 30, f"Deployment {name}")
            lat.append(t1 - t0)
        results["apply_to_deployment_s"] = {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "max": max(lat), "n": len(lat)}

        # 2. node added/removed -> plan updated (backend auto: a GPU node means a cuda plan)
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
        results["node_added_to_plan_s"] = {"p50": pct([a for a, _ in added], 0.5), "max": max(a for a, _ in added)}
        results["node_added_to_rollout_s"] = {"p50": pct([b for _, b in added], 0.5), "max": max(b for _, b in added)}
        results["node_removed_to_plan_s"] = {"p50": pct(removed, 0.5), "max": max(removed)}

        # 3. a burst of --bulk ModelDeployments
        api_before, op_before = apiserver_requests(kubeconfig), operator_requests(op)
        changes_before = plan_changes(op)
        names = [f"bulk-{i}" for i in range(args.bulk)]
        t0 = time.monotonic()
        for n in names:
            create_md(md(n, **light))
        t_created = time.monotonic() - t0

        def count(predicate: Any) -> int:
            items = custom.list_namespaced_custom_object("modelfit.io", "v1alpha1", ns, "modeldeployments")["items"]
            return sum(1 for o in items if o["metadata"]["name"].startswith("bulk-") and predicate(o))

        def cond(o: dict[str, Any], t: str) -> bool:
            st = o.get("status") or {}
            return (
                any(c["type"] == t and c["status"] == "True" for c in st.get("conditions") or [])
                and st.get("observedGeneration") == o["metadata"]["generation"]
            )

        t_planned = wait(lambda: count(lambda o: cond(o, "Planned")) == args.bulk, 180, "all planned", 0.25) - t0
        n_deps = sum(1 for d in apps.list_namespaced_deployment(ns).items if d.metadata.name.startswith("bulk-"))
        try:
            t_ready: float | None = wait(lambda: count(lambda o: cond(o, "Ready")) == args.bulk, 120, "ready", 0.5) - t0
        except TimeoutError:
            t_ready = None
        n_ready = count(lambda o: cond(o, "Ready"))
        rss, hwm = op.rss_kib()
        api_after, op_after = apiserver_requests(kubeconfig), operator_requests(op)
        delta = api_after - api_before
        by_res: Counter[str] = Counter()
        for (res, _verb), v in delta.items():
            by_res[res or "(non-resource)"] += v
        results["bulk"] = {
            "n": args.bulk,
            "create_s": t_created,
            "all_planned_s": t_planned,
            "deployments": n_deps,
            "all_ready_s": t_ready,
            "ready": n_ready,
            "plan_changes": plan_changes(op) - changes_before,
            "operator_rss_mib": rss / 1024,
            "operator_peak_rss_mib": hwm / 1024,
            "operator_client_requests": op_after - op_before,
            "apiserver_requests_total": sum(delta.values()),
            "apiserver_requests_by_resource": dict(by_res.most_common(8)),
            "modeldeployment_requests_by_verb": {v: n for (r, v), n in delta.items() if r == "modeldeployments" and n},
        }
    finally:
        op.stop()
        for n in nodes:
            kubectl(kubeconfig, "delete", "node", n, "--wait=false", check=False)
        kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)
        if started_cluster and not args.keep:
            subprocess.run([str(ROOT / "e2e" / "cluster.sh"), "down"], check=False)

    a, b = results["apply_to_deployment_s"], results["bulk"]
    rows = [
        ("apply -> Deployment created", f"p50 {a['p50'] * 1000:.0f} ms, p95 {a['p95'] * 1000:.0f} ms, max {a['max'] * 1000:.0f} ms (n={a['n']})"),
        ("GPU node added -> plan cuda", f"p50 {results['node_added_to_plan_s']['p50']:.2f} s, max {results['node_added_to_plan_s']['max']:.2f} s (n={args.node_events})"),
        ("GPU node added -> Deployment rolled", f"p50 {results['node_added_to_rollout_s']['p50']:.2f} s, max {results['node_added_to_rollout_s']['max']:.2f} s"),
        ("GPU node removed -> plan cpu", f"p50 {results['node_removed_to_plan_s']['p50']:.2f} s, max {results['node_removed_to_plan_s']['max']:.2f} s"),
        (f"{b['n']} ModelDeployments: created (client)", f"{b['create_s']:.1f} s"),
        (f"{b['n']} ModelDeployments: all Planned + Deployment", f"{b['all_planned_s']:.1f} s ({b['deployments']} Deployments)"),
        (f"{b['n']} ModelDeployments: all Ready (pods on kwok)",
         f"{b['all_ready_s']:.1f} s" if b["all_ready_s"] else f"{b['ready']}/{b['n']} Ready after 120 s"),
        ("plan changes (rollouts) during the burst", f"{b['plan_changes']} for {b['n']} new ModelDeployments"),
        ("operator RSS after the burst", f"{b['operator_rss_mib']:.0f} MiB (peak {b['operator_peak_rss_mib']:.0f} MiB)"),
        ("API requests, operator's own client", f"{b['operator_client_requests']} ({b['operator_client_requests'] / b['n']:.1f} per ModelDeployment; kopf's watches/patches not included)"),
        ("API requests on modeldeployments", f"{sum(b['modeldeployment_requests_by_verb'].values())} {b['modeldeployment_requests_by_verb']} (incl. the bench's {b['n']} creates and polling)"),
        ("API requests, whole API server", f"{b['apiserver_requests_total']} (all clients: kcm, scheduler, kwok, bench)"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  result\n{'-' * width}  {'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\nby resource: {b['apiserver_requests_by_resource']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
