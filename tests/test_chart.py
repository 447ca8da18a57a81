"""The Helm charts (charts/modelfit, charts/modeldeployment) and helmfile.yaml.

Needs the helm binary (MODELFIT_HELM, PATH, or $MODELFIT_CACHE/bin from e2e/build.sh).
Without it the helm tests skip locally and fail in CI (env CI set).
Rendered manifests are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate) and, for ModelDeployment, against the CRD's schema.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_CHART = ROOT / "charts" / "modelfit"
MD_CHART = ROOT / "charts" / "modeldeployment"
CRD_NAME = "modelfit.io_modeldeployments.yaml"
TOP_CRD = ROOT / "crds" / CRD_NAME
CHART_CRD = OPERATOR_CHART / "crds" / CRD_NAME
KUBE_VERSION = "1.35.0"

# Kinds without a schema in kubernetes-validate (custom resources).
CUSTOM_KINDS = {"ServiceMonitor", "ModelDeployment"}


def _find_tool(name: str, env: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit and Path(explicit).is_file():
        return explicit
    found = shutil.which(name)
    if found:
        return found
    cache = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
    candidate = cache / "bin" / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _require_tool(name: str, env: str) -> str:
    path = _find_tool(name, env)
    if path is None:
        msg = f"{name} not found (set {env}, put it on PATH, or run e2e/build.sh {name})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def helm() -> str:
    return _require_tool("helm", "MODELFIT_HELM")


@pytest.fixture(scope="session")
def helmfile() -> str:
    return _require_tool("helmfile", "MODELFIT_HELMFILE")


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Helm homes in a temp dir, so the tests never touch the user's helm config."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        env[var] = str(home / sub)
    env.pop("KUBECONFIG", None)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def _template(
    helm: str,
    env: dict[str, str],
    chart: Path,
    values: dict[str, Any] | None = None,
    *,
    tmp_path: Path,
    release: str = "mf",
    namespace: str = "modelfit-system",
    sets: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", release, str(chart), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    if values is not None:
        vf = tmp_path / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        vf.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(vf)]
    for s in sets or []:
        cmd += ["--set", s]
    return _run(cmd, env)


def render(
    helm: str, env: dict[str, str], chart: Path, values: dict[str, Any] | None = None, **kw: Any
) -> list[dict[str, Any]]:
    proc = _template(helm, env, chart, values, **kw)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def crd_schema() -> dict[str, Any] | None:
    if not TOP_CRD.is_file():
        return None
    crd = yaml.safe_load(TOP_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _openapi_to_jsonschema(node: Any) -> Any:
    """x-kubernetes-int-or-string means integer or string; everything else is plain JSON Schema."""
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("nullable"):
            t = out.get("type")
            if isinstance(t, str):
                out["type"] = [t, "null"]
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(x) for x in node]
    return node


def validate_manifests(docs: list[dict[str, Any]]) -> None:
    import jsonschema
    import kubernetes_validate

    md_schema = crd_schema()
    for doc in docs:
        kind = doc["kind"]
        if kind == "ModelDeployment":
            assert doc["apiVersion"] == "modelfit.io/v1alpha1"
            if md_schema is not None:
                jsonschema.validate(doc, _openapi_to_jsonschema(md_schema))
            continue
        if kind in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind}/{doc['metadata']['name']}: {exc}") from exc


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]


def assert_restricted(name: str, spec: dict[str, Any]) -> None:
    """Pod Security Standard "restricted" (plus baseline) for a pod spec."""
    psc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{name}: {key}"
    for vol in spec.get("volumes", []):
        assert "hostPath" not in vol, f"{name}: hostPath volume {vol['name']}"
    containers = spec.get("containers", []) + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])
    assert containers
    for c in containers:
        sc = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        assert not sc.get("privileged"), f"{where}: privileged"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{where}: runAsUser 0"
        caps = sc.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{where}: capabilities must drop ALL"
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where}: adds {caps.get('add')}"
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{where}: seccompProfile"
        for port in c.get("ports", []):
            assert "hostPort" not in port, f"{where}: hostPort"


# ---- the CRD copy ---------------------------------------------------------------------------


def test_crd_copy_identical() -> None:
    assert TOP_CRD.is_file(), f"{TOP_CRD.relative_to(ROOT)} is missing; generate it (modelfit crd)"
    assert CHART_CRD.is_file(), f"{CHART_CRD.relative_to(ROOT)} is missing; run charts/sync-crd.sh"
    assert CHART_CRD.read_bytes() == TOP_CRD.read_bytes(), "chart CRD is stale; run charts/sync-crd.sh"


def test_chart_crd_dir_holds_only_the_crd() -> None:
    extra = [p.name for p in (OPERATOR_CHART / "crds").iterdir() if p.name != CRD_NAME]
    assert not extra, f"unexpected files in charts/modelfit/crds: {extra}"


def test_chart_crd_is_a_valid_crd(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    import kubernetes_validate

    assert CHART_CRD.is_file(), "run charts/sync-crd.sh"
    proc = _run(
        [helm, "template", "mf", str(OPERATOR_CHART), "--include-crds", "--kube-version", KUBE_VERSION], helm_env
    )
    assert proc.returncode == 0, proc.stderr
    crds = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["modeldeployments.modelfit.io"]
    kubernetes_validate.validate(crds[0], KUBE_VERSION, strict=True)
    assert crds[0] == yaml.safe_load(CHART_CRD.read_text())


# ---- schemas are valid JSON Schema ------------------------------------------------------------


@pytest.mark.parametrize("chart", [OPERATOR_CHART, MD_CHART], ids=lambda p: p.name)
def test_values_schema_is_strict_and_accepts_defaults(chart: Path) -> None:
    import jsonschema

    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)


# ---- helm lint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chart", [OPERATOR_CHART, MD_CHART], ids=lambda p: p.name)
def test_helm_lint(helm: str, helm_env: dict[str, str], chart: Path) -> None:
    proc = _run([helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(chart)], helm_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- operator chart -----------------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64
OPERATOR_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["models", "team-a"]},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "no-metrics-service": {"metrics": {"service": {"enabled": False}}},
    "node-shapes": {
        "nodeShapes": [
            {
                "name": "c7-4xlarge",
                "labels": {"node.kubernetes.io/instance-type": "c7.4xlarge"},
                "cpu": "15",
                "memory": "60Gi",
            },
            {
                "name": "g6-xlarge",
                "labels": {"node.kubernetes.io/instance-type": "g6.xlarge"},
                "cpu": 3.5,
                "memory": "14Gi",
                "gpus": 1,
                "gpuMemory": "22Gi",
                "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
            },
        ]
    },
    "custom": {
        "image": {"repository": "registry.example/mf/op", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"name": "mf-op", "annotations": {"a": "b"}},
        "extraArgs": ["--no-standalone"],
        "verbose": True,
        "logFormat": "plain",
        "health": {"port": 8181},
        "metrics": {"port": 9191, "service": {"port": 80}},
        "extraEnv": [{"name": "FOO", "value": "bar"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "hostPathCache": {"roots": ["/var/lib/modelfit/models", "/mnt/fast/models"]},
        "egress": {"allowNetworks": ["10.20.0.0/16"], "denyNetworks": ["10.96.0.0/12", "fd00::/8"]},
    },
    "images-and-network-policy": {
        "images": {
            "downloader": f"registry.example.com:5000/mirror/curl:8.11.1@{DIGEST}",
            "server": {"cpu": f"registry.example.com/mirror/llama.cpp@{DIGEST}", "vulkan": ""},
            "requireDigest": True,
            "allowedRegistries": ["registry.example.com", "ghcr.io/ggml-org"],
        },
        "networkPolicy": {
            "enabled": True,
            "ingressNamespaceLabels": ["kubernetes.io/metadata.name=monitoring", "example.com/gateway="],
        },
    },
}


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_operator_renders_valid_manifests(helm: str, helm_env: dict[str, str], tmp_path: Path, case: str) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES[case], tmp_path=tmp_path)
    validate_manifests(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "mf"
        assert labels["app.kubernetes.io/name"] == "modelfit"
        assert labels["helm.sh/chart"].startswith("modelfit-")


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_operator_pod_is_restricted(helm: str, helm_env: dict[str, str], tmp_path: Path, case: str) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES[case], tmp_path=tmp_path)
    specs = list(pod_specs(docs))
    assert len(specs) == 1
    for name, spec in specs:
        assert_restricted(name, spec)


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d.get("rules", [])]


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_rbac_has_no_wildcards(helm: str, helm_env: dict[str, str], tmp_path: Path, case: str) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES[case], tmp_path=tmp_path)
    rules = _rules(docs)
    assert rules
    for rule in rules:
        for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
        assert not any("*" in r for r in rule.get("resources", [])), rule
        assert "nonResourceURLs" not in rule


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


MANAGE = {"get", "list", "watch", "create", "update", "patch", "delete"}
EXPECTED_CLUSTER = (
    {("", "nodes", v) for v in ("get", "list", "watch")}
    | {("", "pods", v) for v in ("get", "list", "watch")}
    | {("", "namespaces", v) for v in ("list", "watch")}
    | {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
)
EXPECTED_NAMESPACED = (
    {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    | {("apps", "deployments", v) for v in MANAGE}
    | {("", r, v) for r in ("services", "persistentvolumeclaims", "configmaps") for v in MANAGE}
    | {("policy", "poddisruptionbudgets", v) for v in MANAGE}
    | {("monitoring.coreos.com", "podmonitors", v) for v in ("get", "create", "patch", "delete")}
    | {("autoscaling", "horizontalpodautoscalers", v) for v in ("get", "create", "patch", "delete")}
    | {("networking.k8s.io", "networkpolicies", v) for v in ("get", "create", "patch", "delete")}
    | {("", "serviceaccounts", v) for v in ("get", "create", "patch", "delete")}
    | {
        ("rbac.authorization.k8s.io", r, v)
        for r in ("roles", "rolebindings")
        for v in ("get", "create", "patch", "delete")
    }
    | {("inference.networking.k8s.io", "inferencepools", v) for v in MANAGE - {"update"}}
    | {
        ("inference.networking.x-k8s.io", r, v)
        for r in ("inferenceobjectives", "inferencemodelrewrites")
        for v in ("get", "list", "watch")
    }
    | {("modelfit.io", "modeldeployments", v) for v in ("get", "list", "watch", "patch", "update")}
    | {("modelfit.io", f"modeldeployments/{s}", v) for s in ("status", "scale") for v in ("get", "patch", "update")}
)


SECRETS = {("", "secrets", "get")}  # by name: the Secrets a ModelDeployment names (token, API key)


def _cluster_roles(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the operator's ClusterRole, the secret-reader ClusterRole bound only per namespace)."""
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert sorted(roles) == ["mf-modelfit", "mf-modelfit-secret-reader"]
    return roles["mf-modelfit"], roles["mf-modelfit-secret-reader"]


def test_rbac_is_exactly_least_privilege_cluster_wide(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path)
    assert [r["metadata"]["name"] for r in by_kind(docs, "Role")] == ["mf-modelfit-leader"]
    assert [r["metadata"]["name"] for r in by_kind(docs, "RoleBinding")] == ["mf-modelfit-leader"]
    cr, reader = _cluster_roles(docs)
    assert _grants(cr["rules"]) == EXPECTED_CLUSTER | EXPECTED_NAMESPACED  # no Secret anywhere
    assert _grants(reader["rules"]) == SECRETS
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    (sa,) = by_kind(docs, "ServiceAccount")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cr["metadata"]["name"],
    }
    assert crb["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "modelfit-system"}
    ]
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


DEFAULT_TAIL = [
    "--liveness=http://0.0.0.0:8081/healthz",
    "--metrics-port=9090",
    "--log-format=json",
    "--hpa-metric=llamacpp_requests_inflight",
    "--leader-elect",
    "--leader-elect-id=mf-modelfit",
]


def test_watch_namespaces_args_and_namespaced_rbac(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, {"watchNamespaces": ["models", "team-a"]}, tmp_path=tmp_path)
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["modelfit", "run"]
    assert c["args"] == ["--standalone", "--namespace=models", "--namespace=team-a", *DEFAULT_TAIL]
    cr, _ = _cluster_roles(docs)
    assert _grants(cr["rules"]) == EXPECTED_CLUSTER  # nothing namespaced cluster-wide
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "mf-modelfit"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["models", "team-a"]
    for role in roles:
        assert _grants(role["rules"]) == EXPECTED_NAMESPACED | SECRETS  # Secrets where it watches
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "mf-modelfit"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["models", "team-a"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == "modelfit-system"


def test_secret_access_only_in_the_namespaces_named(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    values = {"secretAccess": {"namespaces": ["team-a", "team-b"]}}
    docs = render(helm, helm_env, OPERATOR_CHART, values, tmp_path=tmp_path)
    cr, _ = _cluster_roles(docs)
    assert not _grants(cr["rules"]) & SECRETS
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("secret-reader")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "mf-modelfit-secret-reader",
        }
        assert b["subjects"][0]["namespace"] == "modelfit-system"
    assert [b["metadata"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["mf-modelfit"]
    notes = render_notes(helm, helm_env, OPERATOR_CHART, tmp_path, values)
    assert "team-a, team-b" in notes and "--clusterrole=mf-modelfit-secret-reader" in notes


def test_leader_election_lease_rbac_budget_and_spread(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path)
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "Role")}
    lease = roles["mf-modelfit-leader"]
    assert lease["metadata"]["namespace"] == "modelfit-system"
    named = [r for r in lease["rules"] if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["mf-modelfit"],
            "verbs": ["get", "update"],
        }
    ]
    (budget,) = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    (dep,) = by_kind(docs, "Deployment")
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert (
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"]
        == "kubernetes.io/hostname"
    )
    # Without election: one replica, Recreate, no Lease permissions; more than one is refused.
    docs = render(
        helm, helm_env, OPERATOR_CHART, {"leaderElection": {"enabled": False}, "replicaCount": 1}, tmp_path=tmp_path
    )
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not by_kind(docs, "PodDisruptionBudget") and not by_kind(docs, "Role")
    proc = _template(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path, sets=["leaderElection.enabled=false"])
    assert proc.returncode != 0 and "needs leaderElection.enabled" in proc.stderr


def test_all_namespaces_by_default(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path)
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2  # one leads, one waits to take over
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["--standalone", "--all-namespaces", *DEFAULT_TAIL]
    assert c["image"] == "ghcr.io/modelfit/modelfit-operator:0.1.0"  # appVersion
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 9090}
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("case", ["defaults", "namespaced", "custom", "node-shapes", "images-and-network-policy"])
def test_operator_args_parse_with_modelfit_run(helm: str, helm_env: dict[str, str], tmp_path: Path, case: str) -> None:
    """The container's command line is accepted by the real `modelfit run` parser."""
    pytest.importorskip("modelfit.runner")
    from modelfit.cli import build_parser

    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES[case], tmp_path=tmp_path)
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"][0] == "modelfit"
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert args.cmd == "run"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness.endswith(f":{ports['health']}/healthz")
    assert args.namespace == (OPERATOR_CASES[case].get("watchNamespaces") or None)
    # The admin's bounds reach the operator's settings exactly (hostPath roots, egress networks).
    from modelfit.runner import settings

    values = OPERATOR_CASES[case]
    got = settings(args)
    assert list(got.host_path_roots) == values.get("hostPathCache", {}).get("roots", [])
    assert list(got.allow_networks) == values.get("egress", {}).get("allowNetworks", [])
    assert list(got.deny_networks) == values.get("egress", {}).get("denyNetworks", [])
    # ... and so do its images and the NetworkPolicy switch.
    images, fence = values.get("images", {}), values.get("networkPolicy", {})
    assert got.downloader_image == (images.get("downloader") or None)
    assert dict(got.server_images) == {b: ref for b, ref in images.get("server", {}).items() if ref}
    assert got.require_image_digest == images.get("requireDigest", False)
    assert list(got.allowed_image_registries) == images.get("allowedRegistries", [])
    assert got.network_policy == fence.get("enabled", False)
    assert list(got.network_policy_ingress_namespaces) == fence.get("ingressNamespaceLabels", [])


def test_image_override(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES["custom"], tmp_path=tmp_path)
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "registry.example/mf/op:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["serviceAccountName"] == "mf-op"
    assert c["args"][-12:] == [
        "--metrics-port=9191", "--log-format=plain", "--verbose", "--hpa-metric=llamacpp_requests_inflight",
        "--host-path-root=/var/lib/modelfit/models", "--host-path-root=/mnt/fast/models",
        "--allow-network=10.20.0.0/16", "--deny-network=10.96.0.0/12", "--deny-network=fd00::/8",
        "--leader-elect", "--leader-elect-id=mf-modelfit", "--no-standalone",
    ]  # fmt: skip
    assert "--liveness=http://0.0.0.0:8181/healthz" in c["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8181, "metrics": 9191}
    assert {"name": "FOO", "value": "bar"} in c["env"]
    assert dep["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ([f"images.downloader=mirror.io/curl@{DIGEST}"], ["images.downloader=mirror.io/curl"]),  # no tag
        (["images.server.cuda=mirror.io/llama:cuda"], ["images.server.cuda=Mirror/llama:cuda"]),
        (["images.server.rocm=localhost:5000/llama:rocm"], ["images.server.tpu=mirror.io/llama:1"]),
        (["images.allowedRegistries[0]=registry.example.com:5000/team"], ["images.allowedRegistries[0]=team"]),
        (["networkPolicy.ingressNamespaceLabels[0]=team=a"], ["networkPolicy.ingressNamespaceLabels[0]=team"]),
        (
            ["images.requireDigest=true", f"images.downloader=mirror.io/curl@{DIGEST}"],
            ["images.requireDigest=true"],  # the downloader must be given, pinned
        ),
        (
            ["images.requireDigest=true", f"images.downloader=m.io/c@{DIGEST}", f"images.server.cpu=m.io/l@{DIGEST}"],
            ["images.requireDigest=true", f"images.downloader=m.io/c@{DIGEST}", "images.server.cpu=m.io/l:cpu"],
        ),
    ],
    ids=[
        "downloader-without-tag",
        "server-uppercase",
        "server-unknown-backend",
        "registry-not-a-host",
        "label-without-value",
        "digest-needs-the-downloader",
        "digest-refuses-a-server-tag",
    ],
)
def test_image_and_network_policy_values(
    helm: str, helm_env: dict[str, str], tmp_path: Path, good: list[str], bad: list[str]
) -> None:
    """The schema takes image references with a tag or a digest (both: the default is a tag), and refuses
    others before the operator would."""
    docs = render(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path, sets=good)
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    given = [s.split("=", 1)[1] for s in good if not s.startswith("images.requireDigest")]
    assert all(any(a.endswith(f"={v}") for a in args) for v in given), args
    proc = _template(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path, sets=bad)
    assert proc.returncode != 0, f"accepted {bad}"
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower(), proc.stderr


def test_images_and_network_policy_args(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES["images-and-network-policy"], tmp_path=tmp_path)
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--hpa-metric=llamacpp_requests_inflight") + 1 : args.index("--leader-elect")] == [
        f"--downloader-image=registry.example.com:5000/mirror/curl:8.11.1@{DIGEST}",
        f"--server-image=cpu=registry.example.com/mirror/llama.cpp@{DIGEST}",  # the empty vulkan one: no flag
        "--require-image-digest",
        "--allowed-image-registry=registry.example.com",
        "--allowed-image-registry=ghcr.io/ggml-org",
        "--network-policy",
        "--network-policy-ingress-namespace-label=kubernetes.io/metadata.name=monitoring",
        "--network-policy-ingress-namespace-label=example.com/gateway=",
    ]


def test_service_monitor_toggle(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    off = render(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path)
    assert not by_kind(off, "ServiceMonitor")
    (svc,) = by_kind(off, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    on = render(helm, helm_env, OPERATOR_CHART, OPERATOR_CASES["servicemonitor"], tmp_path=tmp_path)
    (sm,) = by_kind(on, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    (svc,) = by_kind(on, "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    # the ServiceMonitor needs the metrics Service
    proc = _template(
        helm,
        helm_env,
        OPERATOR_CHART,
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
        tmp_path=tmp_path,
    )
    assert proc.returncode != 0 and "metrics.service.enabled" in proc.stderr


@pytest.mark.parametrize(
    "sets",
    [
        ["image.pullPolicy=Sometimes"],
        ["noSuchValue=1"],
        ["image.noSuchKey=x"],
        ["metrics.port=70000"],
        ["watchNamespaces[0]=Not_A_Namespace"],
        ["metrics.serviceMonitor.interval=often"],
        ["resources.limits.memory=lots"],
        ["nodeShapes[0].name=a"],
        ["hostPathCache.roots[0]=relative/dir"],
        ["egress.allowNetworks[0]=everywhere"],
        ["nodeShapes[0].name=a,nodeShapes[0].labels.a=b,nodeShapes[0].cpu=1,nodeShapes[0].memory=lots"],
    ],
    ids=lambda s: s[0],
)
def test_operator_schema_rejects_bad_values(
    helm: str, helm_env: dict[str, str], tmp_path: Path, sets: list[str]
) -> None:
    proc = _template(helm, helm_env, OPERATOR_CHART, tmp_path=tmp_path, sets=sets)
    assert proc.returncode != 0, f"accepted {sets}"
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower(), proc.stderr
    lint = _run([helm, "lint", str(OPERATOR_CHART), *(x for s in sets for x in ("--set", s))], helm_env)
    assert lint.returncode != 0


def render_notes(
    helm: str, env: dict[str, str], chart: Path, tmp_path: Path, values: dict[str, Any] | None = None
) -> str:
    """NOTES.txt as `helm install` would print it, offline: a copy of the chart renders it into a ConfigMap."""
    copy = tmp_path / chart.name
    shutil.copytree(chart, copy)
    (copy / "notes-under-test.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (copy / "templates" / "zz-notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}\n'
    )
    docs = render(helm, env, copy, values, tmp_path=tmp_path, sets=None)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "notes"]
    notes: str = cm["data"]["notes"]
    return notes


def test_notes_render(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    notes = render_notes(helm, helm_env, OPERATOR_CHART, tmp_path)
    assert "helmfile --state-values-file" in notes
    assert "kubectl get crd modeldeployments.modelfit.io" in notes
    assert "deployment/mf-modelfit" in notes
    assert "all namespaces" in notes
    notes = render_notes(helm, helm_env, OPERATOR_CHART, tmp_path / "ns", {"watchNamespaces": ["a", "b"]})
    assert "It watches ModelDeployments in: a, b." in notes
    assert "OpenAI endpoint" not in notes
    gw = {"gateway": {"enabled": True, "namespaces": ["a"], "apiKeySecretRef": {"name": "gk"}}}
    notes = render_notes(helm, helm_env, OPERATOR_CHART, tmp_path / "gw", gw)
    assert "One OpenAI endpoint for the models of a:" in notes
    assert "http://mf-modelfit-gateway.modelfit-system.svc:8080/v1" in notes and "Secret gk" in notes


def test_modeldeployment_notes_say_how_it_scales(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    notes = render_notes(helm, helm_env, MD_CHART, tmp_path)
    assert "get modeldeployment" in notes and "scales on load" not in notes
    notes = render_notes(
        helm, helm_env, MD_CHART, tmp_path / "hpa", {"name": "chat", "autoscaling": {"maxReplicas": 3}}
    )
    assert "between 1 and 3 replicas" in notes and "get hpa chat" in notes


# ---- modeldeployment chart ----------------------------------------------------------------------

MD_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "catalog-full": {
        "name": "qwen",
        "model": {"catalog": "qwen3.5-0.8b", "quant": "q4_k_m", "sha256": "A" * 64},
        "nodeProfile": "cpu",
        "context": 8192,
        "minContext": 4096,
        "parallel": 2,
        "kvCacheType": "q8_0",
        "promptCache": 512,
        "loadMode": "mmap",
        "flashAttention": "on",
        "backend": "cpu",
        "gpuLayers": 0,
        "replicas": 2,
        "adapt": True,
        "serverArgs": ["--jinja"],
        "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "image": {"cpu": "ghcr.io/ggml-org/llama.cpp:server"},
        "apiKeySecretRef": {"name": "llm", "key": "token"},
        "modelCache": {"pvc": {"size": "2Gi", "storageClass": "standard"}},
        "service": {"type": "NodePort", "port": 8000},
        "expectedPlan": {"backend": "cpu", "gpuLayers": 0, "context": 8192, "memoryRequest": "866Mi"},
    },
    "url": {
        "model": {"url": "https://example.com/m.gguf"},
        "context": "max",
        "gpuLayers": "auto",
        "promptCache": "auto",
    },
    "prompt-cache-off": {"promptCache": 0},
    "sharing": {
        "threads": 2,
        "replicas": 3,  # left out: the HPA owns it
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetUtilization": 100},
        "rebalance": {"policy": "Never"},
    },
    "threads-auto": {"threads": "auto", "rebalance": {"policy": "WhenBetter", "minImprovement": 50}},
    "huggingFace": {"model": {"huggingFace": {"repo": "unsloth/Qwen3.5-0.8B-GGUF", "file": "Qwen3.5-0.8B-Q4_0.gguf"}}},
    "pvc": {"model": {"pvc": {"claimName": "models", "path": "/m/qwen.gguf"}}, "modelCache": {"emptyDir": {}}},
}


@pytest.mark.parametrize("case", list(MD_CASES))
def test_modeldeployment_renders_valid(helm: str, helm_env: dict[str, str], tmp_path: Path, case: str) -> None:
    docs = render(
        helm, helm_env, MD_CHART, MD_CASES[case], tmp_path=tmp_path, release="qwen3-5-0-8b", namespace="models"
    )
    (md,) = docs
    assert md["kind"] == "ModelDeployment"
    assert md["metadata"]["namespace"] == "models"
    validate_manifests(docs)
    try:
        from modelfit.api import ModelDeploymentSpec
    except ImportError:
        return
    ModelDeploymentSpec.model_validate(md["spec"])


def test_modeldeployment_defaults(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    (md,) = render(helm, helm_env, MD_CHART, tmp_path=tmp_path, release="qwen3-5-0-8b", namespace="default")
    assert md["metadata"]["name"] == "qwen3-5-0-8b"
    assert md["spec"] == {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "replicas": 1}


def test_modeldeployment_full(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    (md,) = render(helm, helm_env, MD_CHART, MD_CASES["catalog-full"], tmp_path=tmp_path)
    spec = md["spec"]
    assert md["metadata"]["name"] == "qwen"
    assert spec["model"] == {"catalog": "qwen3.5-0.8b", "quant": "Q4_K_M", "sha256": "a" * 64}
    assert spec["context"] == 8192 and isinstance(spec["context"], int)
    assert spec["gpuLayers"] == 0
    assert spec["promptCache"] == 512 and isinstance(spec["promptCache"], int)
    assert spec["adapt"] is True
    assert spec["modelCache"] == {"pvc": {"size": "2Gi", "storageClass": "standard"}}
    assert spec["service"] == {"type": "NodePort", "port": 8000}
    assert md["metadata"]["labels"]["modelfit.io/node-profile"] == "cpu"
    plan = json.loads(md["metadata"]["annotations"]["modelfit.io/expected-plan"])
    assert plan["memoryRequest"] == "866Mi"
    assert "nodeProfile" not in spec and "expectedPlan" not in spec


def test_modeldeployment_chart_sets_every_spec_field() -> None:
    """Every field of the CRD's spec has a value in the chart: a helmfile user can set what kubectl can."""
    schema = crd_schema()
    assert schema is not None
    spec_fields = set(schema["properties"]["spec"]["properties"])
    chart_values = set(json.loads((MD_CHART / "values.schema.json").read_text())["properties"])
    assert spec_fields - chart_values == set()


def test_modeldeployment_threads_autoscaling_rebalance(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    (md,) = render(helm, helm_env, MD_CHART, MD_CASES["sharing"], tmp_path=tmp_path)
    spec = md["spec"]
    assert spec["threads"] == 2 and isinstance(spec["threads"], int)
    assert spec["autoscaling"] == {"minReplicas": 1, "maxReplicas": 4, "targetUtilization": 100}
    assert spec["rebalance"] == {"policy": "Never"}
    assert "replicas" not in spec  # a re-apply must not reset what the HPA chose
    (md,) = render(helm, helm_env, MD_CHART, MD_CASES["threads-auto"], tmp_path=tmp_path)
    assert md["spec"]["threads"] == "auto" and md["spec"]["replicas"] == 1


def test_modeldeployment_other_source_wins_over_catalog(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    (md,) = render(helm, helm_env, MD_CHART, MD_CASES["url"], tmp_path=tmp_path)
    assert md["spec"]["model"] == {"url": "https://example.com/m.gguf"}
    assert md["spec"]["context"] == "max" and md["spec"]["gpuLayers"] == "auto"
    assert md["spec"]["promptCache"] == "auto"


def test_modeldeployment_prompt_cache_zero_is_kept(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    (md,) = render(helm, helm_env, MD_CHART, MD_CASES["prompt-cache-off"], tmp_path=tmp_path)
    assert md["spec"]["promptCache"] == 0  # 0 turns the cache off: it must not be dropped as empty


@pytest.mark.parametrize(
    "values",
    [
        {"context": 100},
        {"context": "huge"},
        {"backend": "tpu"},
        {"kvCacheType": "q2"},
        {"promptCache": -1},
        {"promptCache": "lots"},
        {"model": {"quant": "Q3_X"}},
        {"model": {"url": "ftp://x/y.gguf"}},
        {"model": {"sha256": "xyz"}},
        {"model": {"huggingFace": {"repo": "nofile"}}},
        {"modelCache": {"emptyDir": {}, "pvc": {}}},
        {"service": {"type": "ExternalName"}},
        {"bogus": True},
        {"resources": {"requests": {"cpu": 2}}},
        {"threads": 0},
        {"threads": "many"},
        {"autoscaling": {"minReplicas": 2}},  # maxReplicas is required
        {"autoscaling": {"maxReplicas": 2, "targetUtilization": 150}},
        {"rebalance": {"policy": "Sometimes"}},
    ],
    ids=lambda v: json.dumps(v, sort_keys=True),
)
def test_modeldeployment_schema_rejects(
    helm: str, helm_env: dict[str, str], tmp_path: Path, values: dict[str, Any]
) -> None:
    proc = _template(helm, helm_env, MD_CHART, values, tmp_path=tmp_path)
    assert proc.returncode != 0, f"accepted {values}"


def test_modeldeployment_two_sources_fail(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    values = {"model": {"url": "https://e.com/m.gguf", "pvc": {"claimName": "c", "path": "/m.gguf"}}}
    proc = _template(helm, helm_env, MD_CHART, values, tmp_path=tmp_path)
    assert proc.returncode != 0 and "only one of url, huggingFace and pvc" in proc.stderr


# ---- helmfile -----------------------------------------------------------------------------------


def _state_values(tmp_path: Path, *args: str) -> Path:
    from modelfit.cli import main

    out = tmp_path / "state.yaml"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["values", *args]) == 0
    out.write_text(buf.getvalue())
    return out


def test_modelfit_values_render_through_chart(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    """What helmfile passes to charts/modeldeployment: state values' modelDeployment + name + expectedPlan."""
    state = yaml.safe_load(_state_values(tmp_path, "qwen3.5-0.8b", "--quant", "q4_0", "--node", "cpu").read_text())
    values = dict(state["modelDeployment"], name=state["name"], expectedPlan=state["expectedPlan"])
    docs = render(helm, helm_env, MD_CHART, values, tmp_path=tmp_path, namespace=state["namespace"])
    validate_manifests(docs)
    (md,) = docs
    assert md["metadata"]["name"] == "qwen3-5-0-8b"
    assert md["spec"]["model"] == {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}
    plan = json.loads(md["metadata"]["annotations"]["modelfit.io/expected-plan"])
    assert plan["memoryRequest"] == state["expectedPlan"]["memoryRequest"]
    assert plan["backend"] == "cpu" and plan["gpuLayers"] == 0 and plan["nodeProfile"] == "cpu"
    assert "args" not in plan and "reasons" not in plan


def _helmfile(helmfile: str, helm: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [helmfile, "--helm-binary", helm, "--file", str(ROOT / "helmfile.yaml"), *args]
    return _run(cmd, env)


def test_helmfile_build_and_template(helmfile: str, helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    state = _state_values(
        tmp_path, "qwen3.5-0.8b", "--quant", "q4_0", "--node", "cpu", "--context", "8192", "-n", "models"
    )
    proc = _helmfile(helmfile, helm, helm_env, "--state-values-file", str(state), "build")
    assert proc.returncode == 0, proc.stderr
    proc = _helmfile(helmfile, helm, helm_env, "--state-values-file", str(state), "lint", "--skip-deps")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _helmfile(
        helmfile, helm, helm_env, "--state-values-file", str(state), "template", "--skip-deps",
        "--args", f"--kube-version={KUBE_VERSION}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    validate_manifests(docs)
    (md,) = by_kind(docs, "ModelDeployment")
    assert md["metadata"] == {**md["metadata"], "name": "qwen3-5-0-8b", "namespace": "models"}
    assert md["spec"]["context"] == 8192
    (dep,) = by_kind(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "modelfit-system"


def test_helmfile_defaults_and_no_operator(helmfile: str, helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    proc = _helmfile(helmfile, helm, helm_env, "template", "--skip-deps", "--args", f"--kube-version={KUBE_VERSION}")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert by_kind(docs, "Deployment") and by_kind(docs, "ModelDeployment")
    state = _state_values(tmp_path, "qwen3.5-0.8b", "--quant", "q4_0", "--no-operator")
    proc = _helmfile(
        helmfile, helm, helm_env, "--state-values-file", str(state), "template", "--skip-deps",
        "--args", f"--kube-version={KUBE_VERSION}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert not by_kind(docs, "Deployment")
    assert by_kind(docs, "ModelDeployment")


def test_node_shapes_config_map_reaches_the_operator(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    """nodeShapes become a ConfigMap, mounted where `--node-shapes` reads it, and parse as the operator does."""
    from modelfit.nodes import parse_node_shapes

    values = OPERATOR_CASES["node-shapes"]
    docs = render(helm, helm_env, OPERATOR_CHART, values, tmp_path=tmp_path)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    shapes = parse_node_shapes(yaml.safe_load(cm["data"]["node-shapes.yaml"]))
    assert [s.name for s in shapes] == ["c7-4xlarge", "g6-xlarge"]
    assert shapes[1].facts().gpus == 1 and shapes[0].facts().cpu_millis == 15000
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (arg,) = [a for a in c["args"] if a.startswith("--node-shapes=")]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "node-shapes"]
    assert arg == f"--node-shapes={mount['mountPath']}/node-shapes.yaml"
    (vol,) = [v for v in pod["volumes"] if v["name"] == "node-shapes"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["checksum/node-shapes"]
    none = render(helm, helm_env, OPERATOR_CHART, {}, tmp_path=tmp_path)
    assert not [d for d in none if d["kind"] == "ConfigMap"]
    (plain,) = by_kind(none, "Deployment")
    assert not [a for a in plain["spec"]["template"]["spec"]["containers"][0]["args"] if "node-shapes" in a]


# ---- the shared gateway ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespaces", [[], ["team-a", "team-b"]])
def test_the_gateway_is_the_gateway_modules_and_reads_no_secret(
    helm: str, helm_env: dict[str, str], tmp_path: Path, namespaces: list[str]
) -> None:
    """The ports, BBR's flags and the pod labels the models' NetworkPolicies admit are modelfit.gateway's and
    modelfit.routing's; the gateway may read ModelDeployments and EndpointSlices, nothing else, and its pod is
    restricted."""
    from modelfit import gateway
    from modelfit.routing import GATEWAY_LABELS

    values = {"gateway": {"enabled": True, "namespaces": namespaces, "apiKeySecretRef": {"name": "gw-key"}}}
    docs = render(helm, helm_env, OPERATOR_CHART, values, tmp_path=tmp_path)
    validate_manifests(docs)
    gw = [d for d in docs if d["metadata"]["name"] == "mf-modelfit-gateway"]
    (deploy,) = by_kind(gw, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    assert_restricted("gateway", spec)
    assert GATEWAY_LABELS.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["bbr"]["args"] == gateway.bbr_args()
    assert containers["envoy"]["ports"][0]["containerPort"] == gateway.GATEWAY_PORT
    assert containers["envoy"]["readinessProbe"]["httpGet"]["path"] == "/health"
    env = containers["envoy"]["env"][0]
    assert (env["name"], env["valueFrom"]["secretKeyRef"]) == (gateway.KEY_ENV, {"name": "gw-key", "key": "api-key"})
    scope = [f"--namespace={ns}" for ns in namespaces]
    assert containers["routes"]["command"] == ["modelfit", "gateway", "--dir=/xds", *scope]
    assert spec["initContainers"][0]["command"] == [
        "modelfit",
        "gateway",
        "--dir=/xds",
        "--bootstrap",
        "--once",
        *scope,
    ]
    rules = _rules(gw)
    assert {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("modelfit.io", "modeldeployments"),
        ("discovery.k8s.io", "endpointslices"),
    }
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in rules)
    roles = by_kind(gw, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert bool(by_kind(gw, "ClusterRole")) == (not namespaces)
    operator = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "mf-modelfit")
    assert "--gateway-namespace=modelfit-system" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_gateways_network_policy_admits_envoys_port_only(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    from modelfit import gateway

    values = {"gateway": {"enabled": True}, "networkPolicy": {"enabled": True}}
    docs = render(helm, helm_env, OPERATOR_CHART, values, tmp_path=tmp_path)
    validate_manifests(docs)
    (policy,) = [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"] == "mf-modelfit-gateway"]
    (deploy,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "mf-modelfit-gateway"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": gateway.GATEWAY_PORT}]}]
    off = render(helm, helm_env, OPERATOR_CHART, {"gateway": {"enabled": True}}, tmp_path=tmp_path)
    assert not by_kind(off, "NetworkPolicy")


def test_no_gateway_by_default(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    docs = render(helm, helm_env, OPERATOR_CHART, {}, tmp_path=tmp_path)
    assert not [d for d in docs if "gateway" in d["metadata"]["name"]]
    operator = by_kind(docs, "Deployment")[0]
    assert not any(a.startswith("--gateway") for a in operator["spec"]["template"]["spec"]["containers"][0]["args"])
