"""Scenarios 6 and 7: the operator chart installed with helm (CRD, RBAC, operator Deployment),
the operator run with the chart's ServiceAccount credentials (it can do what it needs and
nothing more), and the seed's helmfile deploy flow."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from _support import REPO, Operator, md, serve_inference_pool_crd, wait_condition

SYSTEM_NS = "modelfit-system"
RELEASE = "modelfit"


def _run(cluster, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", "-c", cmd], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc


def _uninstall(cluster, *releases: tuple[str, str]) -> None:
    for name, ns in releases:
        subprocess.run(["helm", "uninstall", name, "-n", ns, "--wait", "--ignore-not-found"],
                       env=cluster.env, capture_output=True, timeout=120)  # fmt: skip
    cluster.kubectl("delete", "namespace", SYSTEM_NS, "--ignore-not-found", "--timeout=90s", check=False, timeout=120)


@pytest.fixture
def operator_paused(operator):
    """Stop the session's operator (admin credentials) so that only the one under test acts."""
    operator.stop()
    yield
    operator.start()


def _sa_kubeconfig(cluster, sa: str, path: Path) -> str:
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    token = cluster.kubectl("-n", SYSTEM_NS, "create", "token", sa, "--duration=1h").stdout.strip()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": admin["clusters"][0]["name"], "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# (verb, resource, namespaced?) the operator must be allowed / must be refused
MUST = [
    ("list", "nodes", False),
    ("watch", "nodes", False),
    ("list", "pods", False),
    ("watch", "pods", False),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", False),
    ("list", "modeldeployments.modelfit.io", True),
    ("watch", "modeldeployments.modelfit.io", True),
    ("patch", "modeldeployments.modelfit.io", True),
    ("patch", "modeldeployments.modelfit.io/status", True),
    ("get", "modeldeployments.modelfit.io/scale", True),
    ("create", "deployments.apps", True),
    ("patch", "deployments.apps", True),
    ("delete", "deployments.apps", True),
    ("create", "services", True),
    ("patch", "configmaps", True),  # the digest the first verified download recorded
    ("patch", "services", True),
    ("create", "persistentvolumeclaims", True),
    ("create", "poddisruptionbudgets.policy", True),
    ("delete", "poddisruptionbudgets.policy", True),
    ("create", "networkpolicies.networking.k8s.io", True),  # --network-policy: one per model
    ("delete", "networkpolicies.networking.k8s.io", True),  # and gone when the admin turns it off
    ("create", "events", True),
    ("create", "inferencepools.inference.networking.k8s.io", True),  # spec.routing: the pool, the picker's RBAC
    ("create", "rolebindings.rbac.authorization.k8s.io", True),
    ("get", "secrets", True),  # where secretAccess allows: a Hugging Face token, the API key (rotation)
]
MUST_NOT = [
    ("delete", "nodes", False), ("patch", "nodes", False), ("list", "secrets", False), ("watch", "secrets", True),
    ("create", "pods", True), ("delete", "pods", True), ("create", "pods/exec", True),
    ("delete", "namespaces", False), ("create", "clusterroles.rbac.authorization.k8s.io", False),
    ("create", "serviceaccounts/token", True),
    # The picker's Role and RoleBinding (spec.routing) are created, but never beyond what the operator holds:
    ("escalate", "roles.rbac.authorization.k8s.io", True), ("bind", "roles.rbac.authorization.k8s.io", True),
    ("bind", "clusterroles.rbac.authorization.k8s.io", False),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", False),
    ("create", "modeldeployments.modelfit.io", True), ("list", "networkpolicies.networking.k8s.io", True),
    ("*", "*", False),
]  # fmt: skip


def test_helm_install_and_least_privilege(cluster, crd, operator_paused, pool, namespace, tmp_path):
    pool.add("sys", cpu="4", memory="8Gi")
    # `kubectl auth can-i` finds a resource by discovery: the InferencePool rows need its CRD served
    # (the RBAC rules themselves do not), as on a cluster with the inference extension.
    serve_inference_pool_crd(cluster)
    try:
        # Secrets only where the values say (issue 17: it could get every Secret in the cluster).
        access = f"--set 'secretAccess.namespaces[0]={namespace}'"
        _run(
            cluster,
            f"helm install {RELEASE} charts/modelfit -n {SYSTEM_NS} {access} --create-namespace --wait --timeout 120s",
        )
        ns = ["-n", SYSTEM_NS]
        assert cluster.get_json("crd", "modeldeployments.modelfit.io")
        deploy = cluster.get_json(*ns, "deployment", RELEASE)
        assert deploy["status"].get("availableReplicas") == 2  # one leads, one waits (leader election)
        assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
        sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
        assert cluster.get_json(*ns, "serviceaccount", sa)
        role = cluster.get_json("clusterrole", RELEASE)
        verbs = {v for r in role["rules"] for v in r["verbs"]}
        resources = {x for r in role["rules"] for x in r["resources"]}
        assert "*" not in verbs and "*" not in resources
        binding = cluster.get_json("clusterrolebinding", RELEASE)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NS}]
        pods = cluster.get_json(*ns, "pods", "-l", "app.kubernetes.io/instance=modelfit")["items"]
        assert [p["status"]["phase"] for p in pods] == ["Running", "Running"]
        assert cluster.get_json(*ns, "pdb", RELEASE)["spec"]["maxUnavailable"] == 1

        who = f"--as=system:serviceaccount:{SYSTEM_NS}:{sa}"
        for allowed, table in (("yes", MUST), ("no", MUST_NOT)):
            for verb, res, namespaced in table:
                scope = ["-n", namespace] if namespaced else ["--all-namespaces"]
                # kubectl reads TYPE/NAME: a subresource is asked with --subresource (else "serviceaccounts/token"
                # would ask about a ServiceAccount named token)
                kind, _, sub = res.partition("/")
                scope += [f"--subresource={sub}"] if sub else []
                got = cluster.kubectl("auth", "can-i", verb, kind, who, *scope, check=False).stdout.strip()
                assert got == allowed, f"can-i {verb} {res}: {got}, want {allowed}"
        for scope in (["-n", "kube-system"], ["-n", SYSTEM_NS], ["--all-namespaces"]):
            got = cluster.kubectl("auth", "can-i", "get", "secrets", who, *scope, check=False).stdout.strip()
            assert got == "no", f"can-i get secrets {scope}: {got}"

        # the operator, run with nothing but the chart's ServiceAccount token
        kubeconfig = _sa_kubeconfig(cluster, sa, tmp_path / "sa.kubeconfig")
        # The leader Lease: only its own, by name, in the operator's namespace.
        for verb, res, where, want in (
            ("update", f"leases/{RELEASE}", SYSTEM_NS, "yes"),
            ("update", "leases/other", SYSTEM_NS, "no"),
            ("get", f"leases/{RELEASE}", namespace, "no"),
        ):
            got = cluster.kubectl("auth", "can-i", verb, res, who, "-n", where, check=False).stdout.strip()
            assert got == want, f"can-i {verb} {res} -n {where}: {got}"
        elect = ["-A", "--leader-elect", "--leader-elect-namespace", SYSTEM_NS, "--leader-elect-id", RELEASE]
        op = Operator(kubeconfig, tmp_path / "sa-operator.log", elect).start()
        try:
            cluster.apply(md("as-sa", namespace, context=4096, nodeSelector=pool.selector))
            wait_condition(cluster, namespace, "as-sa", "Ready", timeout=60, operator=op)
            cluster.kubectl("-n", namespace, "scale", "md/as-sa", "--replicas=2")  # PDB create
            cluster.wait_for(lambda: cluster.get_json("-n", namespace, "pdb", "as-sa", check=False), timeout=60)
            events = cluster.kubectl("-n", namespace, "get", "events", "--field-selector", "reason=PlanChanged")
            assert "new plan" in events.stdout
            assert op.running()
            log = op.log_path.read_text()
            assert "HTTP 403" not in log and "forbidden" not in log.lower(), op.log_tail()
        finally:
            op.stop()
    finally:
        _uninstall(cluster, (RELEASE, SYSTEM_NS))


SEED_CMD = "helmfile --state-values-file <(modelfit values qwen3.5-0.8b --quant q4_0 --node cpu) {verb}"


def test_helmfile_seed_flow(cluster, crd, operator, pool):
    pool.add("big", cpu="8", memory="32Gi")
    try:
        out = _run(cluster, SEED_CMD.format(verb="apply"), timeout=400)
        assert "modelfit" in out.stdout + out.stderr
        releases = cluster.env and _run(cluster, "helm list -A -o yaml").stdout
        names = {(r["name"], r["namespace"]) for r in yaml.safe_load(releases)}
        assert {(RELEASE, SYSTEM_NS), ("qwen3-5-0-8b", "default")} <= names, names
        assert cluster.get_json("-n", SYSTEM_NS, "deployment", RELEASE)["status"].get("availableReplicas") == 2
        obj = wait_condition(cluster, "default", "qwen3-5-0-8b", "Ready", timeout=90, operator=operator)
        expected = yaml.safe_load(obj["metadata"]["annotations"]["modelfit.io/expected-plan"])
        plan = obj["status"]["plan"]
        assert plan["backend"] == expected["backend"] == "cpu"
        assert plan["context"] == expected["context"]
        assert cluster.get_json("-n", "default", "deployment", "qwen3-5-0-8b")
        # a second apply is a no-op (helm-diff finds nothing to change)
        again = _run(cluster, SEED_CMD.format(verb="apply"), timeout=300)
        assert "UPGRADED RELEASES" not in again.stdout, again.stdout
    finally:
        subprocess.run(["bash", "-c", SEED_CMD.format(verb="destroy")], cwd=REPO, env=cluster.env,
                       capture_output=True, timeout=300)  # fmt: skip
        _uninstall(cluster, ("qwen3-5-0-8b", "default"), (RELEASE, SYSTEM_NS))
    cluster.wait_for(
        lambda: cluster.get_json("-n", "default", "deployment", "qwen3-5-0-8b", check=False) is None,
        timeout=60,
        what="model children garbage-collected after destroy",
    )
