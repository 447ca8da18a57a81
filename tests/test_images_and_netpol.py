"""Issue 17, item 8: the admin's images (a private mirror's, pinned by digest; the downloader never a tenant's), a
registry allow-list for ``spec.image``, and a NetworkPolicy for every model when the admin turns it on."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from typing import Any

import kubernetes_validate
import pytest

from modelfit import catalog
from modelfit.api import ModelDeploymentSpec
from modelfit.cli import build_parser
from modelfit.decide import Decision, decide
from modelfit.kube import path_for
from modelfit.placement import place
from modelfit.reconciler import OperatorState
from modelfit.render import (
    DOWNLOADER_IMAGE,
    IMAGES,
    egress_blocks,
    image_problem,
    model_file,
    render,
    selector_labels,
)
from modelfit.runner import settings as settings_of
from modelfit.settings import BACKENDS, Settings, image_name, pinned, refused_address
from modelfit.status import planning_failure_conditions
from test_decide import SEED, conds, snapshot
from test_handlers import CPU_LARGE, FakeKube, go, md
from test_render import CPU, META, build, pod

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")
MIRROR = "registry.example.com/mirror"
CURL = f"{MIRROR}/curl:8.11.1@{D1}"
LLAMA_CPU = f"{MIRROR}/llama.cpp@{D2}"
ROOT = "/var/lib/modelfit"
NETPOL = ("networking.k8s.io/v1", "NetworkPolicy", "qwen")


def rendered(settings: Settings, **spec: Any) -> Any:
    """``test_render.build`` with the admin's settings."""
    s = ModelDeploymentSpec.model_validate(
        {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192, **spec}
    )
    facts = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0")
    mf = model_file(s, facts.file_bytes)
    placement = place(s, facts, [CPU], mf.path)
    assert placement.fits
    return render(META, s, placement, mf, settings=settings)


def images(r: Any) -> dict[str, str]:
    p = pod(r)
    return {c["name"]: c["image"] for c in [*p.get("initContainers", []), *p["containers"]]}


def kinds(d: Decision) -> list[str]:
    return [o["kind"] for o in d.apply]


# ---- images ---------------------------------------------------------------------------------------


def test_defaults_are_unchanged_and_every_backend_has_one() -> None:
    r = rendered(Settings(host_path_roots=(ROOT,)), modelCache={"hostPath": {"path": ROOT}})
    assert images(r) == {
        "prepare-cache": DOWNLOADER_IMAGE,
        "fetch-model": DOWNLOADER_IMAGE,
        "llama-server": IMAGES["cpu"],
    }
    assert DOWNLOADER_IMAGE == "docker.io/curlimages/curl:8.11.1"
    assert tuple(IMAGES) == BACKENDS  # the settings' backends are render's
    _, _, plain = build()
    assert (
        images(plain)
        == images(rendered(Settings()))
        == {"fetch-model": DOWNLOADER_IMAGE, "llama-server": IMAGES["cpu"]}
    )
    assert plain.hash == rendered(Settings()).hash  # the default settings render what the operator rendered before


def test_admin_images_reach_all_three_containers_and_a_spec_image_wins_for_the_server() -> None:
    admin = Settings(host_path_roots=(ROOT,), downloader_image=CURL, server_images=(("cpu", LLAMA_CPU),))
    r = rendered(admin, modelCache={"hostPath": {"path": ROOT}})
    assert images(r) == {"prepare-cache": CURL, "fetch-model": CURL, "llama-server": LLAMA_CPU}
    assert r.hash != rendered(Settings(host_path_roots=(ROOT,)), modelCache={"hostPath": {"path": ROOT}}).hash
    own = f"ghcr.io/team/llama:cpu@{D3}"
    r = rendered(admin, modelCache={"hostPath": {"path": ROOT}}, image={"cpu": own})
    assert images(r) == {"prepare-cache": CURL, "fetch-model": CURL, "llama-server": own}
    # another backend's image changes nothing on a CPU plan
    other = Settings(server_images=(("cuda", f"{MIRROR}/llama.cpp:cuda"),))
    assert images(rendered(other))["llama-server"] == IMAGES["cpu"]
    # the downloader runs as root in prepare-cache: no spec field names it
    with pytest.raises(ValueError, match="downloader"):
        ModelDeploymentSpec.model_validate({**SEED, "image": {"downloader": "evil/curl:1"}})


@pytest.mark.parametrize(
    ("ref", "name", "is_pinned"),
    [
        ("ubuntu", "docker.io/library/ubuntu", False),
        ("curlimages/curl:8.11.1", "docker.io/curlimages/curl", False),
        ("ghcr.io/ggml-org/llama.cpp:server-b1", "ghcr.io/ggml-org/llama.cpp", False),
        ("localhost:5000/a/b:1", "localhost:5000/a/b", False),
        (f"registry.example.com:5000/x@{D1}", "registry.example.com:5000/x", True),
        (f"r.example/x:tag@{D1}", "r.example/x", True),
        ("Upper/case:1", None, False),
        ("x:", None, False),
        ("x@sha256:abc", None, False),
        (f"x@{D1.upper()}", None, False),
        ("a b:1", None, False),
    ],
)
def test_image_references_parse_as_the_runtime_parses_them(ref: str, name: str | None, is_pinned: bool) -> None:
    assert (image_name(ref), pinned(ref)) == (name, is_pinned)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"downloader_image": "curlimages/curl"}, "downloader image 'curlimages/curl' is not an image reference"),
        ({"downloader_image": "Mirror/curl:1"}, "not an image reference of the form REPO:TAG"),
        ({"server_images": (("tpu", "x:1"),)}, "backend is one of cpu, cuda, rocm, vulkan"),
        ({"server_images": (("cpu", "x:1"), ("cpu", "y:1"))}, "given twice"),
        ({"server_images": (("cuda", "x@sha256:12"),)}, "server image cuda 'x@sha256:12'"),
        ({"require_image_digest": True}, "the downloader image must be pinned"),
        ({"require_image_digest": True, "downloader_image": "mirror.io/curl:1"}, "--downloader-image"),
        ({"allowed_image_registries": ("bitnami",)}, "not a registry host"),
        ({"allowed_image_registries": ("https://r.io",)}, "not a registry host"),
        ({"network_policy_ingress_namespaces": ("monitoring",)}, "is not key=value"),
        ({"network_policy_ingress_namespaces": ("a=b c",)}, "is not a label value"),
    ],
)
def test_bad_admin_settings_are_refused_at_start(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as err:
        Settings(**kw)
    assert needle in str(err.value)


def test_a_digest_is_required_of_every_image_when_the_admin_says_so() -> None:
    strict = Settings(require_image_digest=True, downloader_image=CURL)
    tagged = ModelDeploymentSpec.model_validate({**SEED, "image": {"cpu": "ghcr.io/team/llama:cpu"}})
    reason, message = image_problem(tagged, strict) or ("", "")
    assert reason == "ImageNotAllowed"
    assert "spec.image.cpu ghcr.io/team/llama:cpu is not pinned by digest" in message
    assert "ghcr.io/team/llama@sha256:<64 hex>" in message
    assert image_problem(tagged, Settings()) is None  # no requirement: a tag is fine
    # an unused backend's image is checked too: a re-plan may move to it
    cuda = ModelDeploymentSpec.model_validate({**SEED, "image": {"cuda": "ghcr.io/team/llama:cuda"}})
    assert image_problem(cuda, strict) is not None
    digest = ModelDeploymentSpec.model_validate({**SEED, "image": {"cpu": f"ghcr.io/team/llama:cpu@{D3}"}})
    assert image_problem(digest, strict, "cpu") is None
    # the plan's backend: the built-in tag is refused, naming the admin's flag; an admin's digest is not
    plain = ModelDeploymentSpec.model_validate(SEED)
    assert image_problem(plain, strict) is None
    reason, message = image_problem(plain, strict, "cpu") or ("", "")
    assert reason == "ImageNotAllowed" and IMAGES["cpu"] in message and "--server-image cpu=" in message
    pinned_cpu = strict.model_copy(update={"server_images": (("cpu", LLAMA_CPU),)})
    assert image_problem(plain, pinned_cpu, "cpu") is None
    assert image_problem(plain, pinned_cpu, "cuda") is not None


def test_a_malformed_spec_image_is_refused_whatever_the_settings() -> None:
    spec = ModelDeploymentSpec.model_validate({**SEED, "image": {"cpu": "Not A/Ref"}})
    reason, message = image_problem(spec, Settings()) or ("", "")
    assert reason == "InvalidSpec" and "spec.image.cpu 'Not A/Ref' is not an image reference" in message


def test_the_registry_allow_list_holds_tenant_images_on_whole_path_components() -> None:
    s = Settings(allowed_image_registries=("registry.example.com", "docker.io/library/", "ghcr.io/ggml-org"))
    assert s.allowed_image_registries == ("registry.example.com", "docker.io/library", "ghcr.io/ggml-org")

    def verdict(ref: str) -> tuple[str, str] | None:
        return image_problem(ModelDeploymentSpec.model_validate({**SEED, "image": {"cpu": ref}}), s, "cpu")

    for ok in ("registry.example.com/x:1", "registry.example.com/a/b/c:1", "ubuntu:24.04", IMAGES["cpu"]):
        assert verdict(ok) is None, ok
    for bad in ("registry.example.com.evil.io/x:1", "curlimages/curl:1", "ghcr.io/ggml-orgx/llama:1", "evil.io/x:1"):
        reason, message = verdict(bad) or ("", "")
        assert reason == "ImageNotAllowed", bad
        assert f"spec.image.cpu {bad} is not from an allowed registry; allowed: registry.example.com" in message
    # the admin's own images are not the tenant's: the list does not apply to them
    admin = s.model_copy(update={"server_images": (("cpu", "other.io/llama:1"),)})
    assert image_problem(ModelDeploymentSpec.model_validate(SEED), admin, "cpu") is None


def test_decide_refuses_an_image_with_a_bad_input_condition_and_applies_nothing(make_node: Any) -> None:
    strict = Settings(require_image_digest=True, downloader_image=CURL, allowed_image_registries=("ghcr.io",))
    base = snapshot(SEED, [make_node("cpu-large")])
    tenant = snapshot({**SEED, "image": {"cpu": "docker.io/evil/llama:1"}}, [make_node("cpu-large")])
    d = decide(dataclasses.replace(tenant, settings=strict))
    c = conds(d)
    assert c["Planned"][:2] == ("False", "ImageNotAllowed") and "docker.io/evil/llama:1" in c["Planned"][2]
    assert c["Degraded"][:2] == ("True", "ImageNotAllowed") and "Unschedulable" not in c  # bad input, not room
    assert d.apply == [] and d.delete == [] and d.result == "invalid" and d.requeue_after is None
    # the default server image is a tag: refused on the plan's backend, naming the flag that pins it
    d = decide(dataclasses.replace(base, settings=strict))
    assert conds(d)["Planned"][1] == "ImageNotAllowed" and "--server-image cpu=" in conds(d)["Planned"][2]
    assert d.apply == []
    pinned_cpu = strict.model_copy(update={"server_images": (("cpu", LLAMA_CPU),)})
    d = decide(dataclasses.replace(base, settings=pinned_cpu))
    assert conds(d)["Planned"][0] == "True"
    (deploy,) = [o for o in d.apply if o["kind"] == "Deployment"]
    spec = deploy["spec"]["template"]["spec"]
    assert {c["name"]: c["image"] for c in [*spec["initContainers"], *spec["containers"]]} == {
        "fetch-model": CURL,
        "llama-server": LLAMA_CPU,
    }
    assert planning_failure_conditions("ImageNotAllowed", "x")[-1].type == "Degraded"


# ---- the operator's flags and chart-free environment -------------------------------------------------


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DOWNLOADER_IMAGE", "SERVER_IMAGES", "REQUIRE_IMAGE_DIGEST", "ALLOWED_IMAGE_REGISTRIES"):
        monkeypatch.delenv(f"MODELFIT_{var}", raising=False)
    monkeypatch.delenv("MODELFIT_NETWORK_POLICY", raising=False)
    monkeypatch.delenv("MODELFIT_NETWORK_POLICY_INGRESS_NAMESPACE_LABELS", raising=False)
    assert settings_of(run_args()) == Settings()
    got = settings_of(
        run_args(
            f"--downloader-image={CURL}",
            f"--server-image=cpu={LLAMA_CPU}",
            f"--server-image=cuda={MIRROR}/llama.cpp:cuda@{D3}",
            "--require-image-digest",
            "--allowed-image-registry=registry.example.com",
            "--allowed-image-registry=ghcr.io/ggml-org",
            "--network-policy",
            "--network-policy-ingress-namespace-label=kubernetes.io/metadata.name=monitoring",
            "--gateway-namespace=gw",
        )
    )
    assert got == Settings(
        downloader_image=CURL,
        server_images=(("cpu", LLAMA_CPU), ("cuda", f"{MIRROR}/llama.cpp:cuda@{D3}")),
        require_image_digest=True,
        allowed_image_registries=("registry.example.com", "ghcr.io/ggml-org"),
        network_policy=True,
        network_policy_ingress_namespaces=("kubernetes.io/metadata.name=monitoring",),
        gateway_namespace="gw",
    )
    with pytest.raises(ValueError, match=r"operator settings: .*--server-image 'cpu' is not BACKEND=IMAGE"):
        settings_of(run_args("--server-image=cpu"))
    with pytest.raises(ValueError, match="the downloader image must be pinned"):
        settings_of(run_args("--require-image-digest"))


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFIT_DOWNLOADER_IMAGE", CURL)
    monkeypatch.setenv("MODELFIT_SERVER_IMAGES", f"cpu={LLAMA_CPU}, vulkan={MIRROR}/llama.cpp:vulkan")
    monkeypatch.setenv("MODELFIT_REQUIRE_IMAGE_DIGEST", "true")
    monkeypatch.setenv("MODELFIT_ALLOWED_IMAGE_REGISTRIES", "registry.example.com,quay.io")
    monkeypatch.setenv("MODELFIT_NETWORK_POLICY", "1")
    monkeypatch.setenv("MODELFIT_NETWORK_POLICY_INGRESS_NAMESPACE_LABELS", "team=gateway,name=prom")
    got = settings_of(run_args())
    assert got.downloader_image == CURL and got.require_image_digest and got.network_policy
    assert got.server_images == (("cpu", LLAMA_CPU), ("vulkan", f"{MIRROR}/llama.cpp:vulkan"))
    assert got.allowed_image_registries == ("registry.example.com", "quay.io")
    assert got.network_policy_ingress_namespaces == ("team=gateway", "name=prom")
    # a flag wins over its variable, --no-... included
    off = settings_of(run_args("--no-network-policy", f"--downloader-image={MIRROR}/curl@{D2}"))
    assert not off.network_policy and off.downloader_image == f"{MIRROR}/curl@{D2}"
    monkeypatch.setenv("MODELFIT_NETWORK_POLICY", "perhaps")
    with pytest.raises(ValueError, match="MODELFIT_NETWORK_POLICY='perhaps' is not true or false"):
        settings_of(run_args())


# ---- the NetworkPolicy ------------------------------------------------------------------------------

FENCE = Settings(
    network_policy=True,
    network_policy_ingress_namespaces=("kubernetes.io/metadata.name=monitoring", "example.com/gateway="),
    deny_networks=("10.96.0.0/12", "10.244.0.0/16", "fd00::/8"),
    allow_networks=("10.244.7.0/24", "169.254.169.254/32", "10.96.0.0/12"),
)


def netpol(r: Any) -> dict[str, Any]:
    obj = r.by_kind("NetworkPolicy")
    assert obj is not None
    return dict(obj)


def test_no_network_policy_unless_the_admin_turns_it_on() -> None:
    r = rendered(Settings())
    assert r.by_kind("NetworkPolicy") is None and NETPOL in r.absent
    on = rendered(Settings(network_policy=True))
    assert on.by_kind("NetworkPolicy") is not None and NETPOL not in on.absent
    assert on.hash == r.hash and on.applied != r.applied  # applied (and removed) without a re-plan


@pytest.mark.parametrize("settings", [Settings(network_policy=True), FENCE], ids=["plain", "peers-and-networks"])
@pytest.mark.parametrize("source", ["catalog", "pvc"])
def test_the_network_policy_validates_against_the_kubernetes_schemas(settings: Settings, source: str) -> None:
    kw: dict[str, Any] = {}
    if source == "pvc":
        kw = {"model": {"pvc": {"claimName": "models", "path": "/q/qwen.gguf"}}}
    r = rendered(settings, **kw)
    for obj in r.objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    policy = netpol(r)
    meta = policy["metadata"]
    assert (meta["name"], meta["namespace"], meta["ownerReferences"][0]["kind"]) == ("qwen", "ml", "ModelDeployment")
    assert policy["spec"]["podSelector"] == {"matchLabels": selector_labels("qwen")}
    # the pods it selects are the Deployment's
    labels = r.by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_labels("qwen").items() <= labels.items()


def test_ingress_is_the_model_port_from_its_namespace_and_the_admins_namespaces() -> None:
    spec = netpol(rendered(FENCE))["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"namespaceSelector": {"matchLabels": {"example.com/gateway": ""}}},
    ]
    only_own = netpol(rendered(Settings(network_policy=True)))["spec"]["ingress"]
    assert only_own == [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}]


def test_the_shared_gateways_pods_and_only_they_reach_every_model_from_their_namespace() -> None:
    """``--gateway-namespace`` (the chart sets it with gateway.enabled): the gateway's pods there, not the whole
    namespace (the operator's own, say); a name that is not a namespace's is refused at start."""
    (rule,) = netpol(rendered(Settings(network_policy=True, gateway_namespace="modelfit-system")))["spec"]["ingress"]
    assert rule["from"][-1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "modelfit-system"}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/part-of": "modelfit"}
        },
    }
    for bad in ("", "Bad_NS", "a" * 64, "x,y"):
        with pytest.raises(ValueError):
            Settings(gateway_namespace=bad)


def test_egress_is_dns_and_the_download_to_what_the_operator_may_reach() -> None:
    spec = netpol(rendered(Settings(network_policy=True)))["spec"]
    dns, download = spec["egress"]
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    assert download["ports"] == [{"protocol": "TCP"}]  # any port: a mirror (the e2e node's 10.88.0.1:18080) may use any
    assert download["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["::/128", "::1/128", "fe80::/10"]}},
    ]
    # a model on a PVC downloads nothing: no egress at all
    pvc = netpol(rendered(Settings(network_policy=True), model={"pvc": {"claimName": "m", "path": "/m.gguf"}}))
    assert pvc["spec"]["egress"] == [] and pvc["spec"]["policyTypes"] == ["Ingress", "Egress"]


def _admits(blocks: list[dict[str, Any]], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    for b in blocks:
        block = b["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        if ip.version == net.version and ip in net:
            if not any(ip in ipaddress.ip_network(x) for x in block.get("except", [])):
                return True
    return False


ADDRESSES = "10.96.0.1 10.100.3.4 10.244.1.2 10.244.7.9 169.254.169.254 169.254.1.1 127.0.0.1 0.0.0.0 10.88.0.1"


@pytest.mark.parametrize("address", [*ADDRESSES.split(), "8.8.8.8", "fd00::1", "fe80::1", "::1", "2001:db8::1"])
def test_the_egress_blocks_admit_exactly_what_header_reads_may_reach(address: str) -> None:
    """The pod's download reaches what the operator's own header read of the same URL may reach."""
    blocks = egress_blocks(FENCE)
    assert _admits(blocks, address) == (refused_address(ipaddress.ip_address(address), FENCE) is None)


def test_a_denied_network_equal_to_an_allowed_one_drops_it_and_a_denied_everything_drops_its_family() -> None:
    tie = Settings(deny_networks=("10.0.0.0/8",), allow_networks=("10.0.0.0/8",))
    assert not any(b["ipBlock"]["cidr"] == "10.0.0.0/8" for b in egress_blocks(tie))
    assert not _admits(egress_blocks(tie), "10.1.2.3")
    assert [b["ipBlock"]["cidr"] for b in egress_blocks(Settings(deny_networks=("0.0.0.0/0",)))] == ["::/0"]


def test_turning_the_policy_off_deletes_it_and_on_applies_it(make_node: Any) -> None:
    on = Settings(network_policy=True)
    first = snapshot(SEED, [make_node("cpu-large")])
    d = decide(dataclasses.replace(first, settings=on))
    assert "NetworkPolicy" in kinds(d) and NETPOL not in d.delete
    assert kinds(d)[-1] == "Deployment"  # the Deployment still goes last (it carries the applied hash)
    deploy = next(o for o in d.apply if o["kind"] == "Deployment")
    live = {**deploy, "metadata": {**deploy["metadata"], "generation": 1}}
    again = dataclasses.replace(first, settings=on, old=d.status, deploy=live, seen_generation=1)
    assert decide(again).apply == []  # nothing changed
    off = decide(dataclasses.replace(again, settings=Settings()))
    assert NETPOL in off.delete and "NetworkPolicy" not in kinds(off)
    assert not [e for e in off.events if e[0] == "PlanChanged"]  # the fence is not the plan


def test_the_operator_applies_the_policy_with_its_settings() -> None:
    """The reconciler hands ``STATE.settings`` to the decision: the NetworkPolicy reaches the API."""
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    st.settings = Settings(network_policy=True, downloader_image=CURL)
    go(md(SEED), k, st)
    policy = k.objects[path_for("networking.k8s.io/v1", "NetworkPolicy", "default", "qwen")]
    assert policy["spec"]["podSelector"] == {"matchLabels": selector_labels("qwen")}
    deploy = k.objects[path_for("apps/v1", "Deployment", "default", "qwen")]
    assert deploy["spec"]["template"]["spec"]["initContainers"][0]["image"] == CURL
    assert path_for("networking.k8s.io/v1", "NetworkPolicy", "ns", "x") == (
        "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/x"
    )
