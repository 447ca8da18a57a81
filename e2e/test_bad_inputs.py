"""Bad-input corpus: ModelDeployment specs and CLI invocations a new user might write.

Every spec is either refused by the API server (schema, CEL) with a clear message, or accepted and
reported in a condition within seconds; the operator keeps running, logs no traceback, and does not
loop on any of them. Every CLI invocation is one line naming the option, never a traceback.
Hostile GGUF headers (tests/hostile_gguf.py's corpus, and a server that drips a byte a second) are each a
ModelUnreadable condition, and ModelDeployments applied among them are planned meanwhile (their latency printed).

Run with ``-s`` to see the results table (case -> outcome).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _support import REPO, md

QWEN = {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}
CASE_LABEL = "modelfit.io/e2e-case"
FILES = "http://files.invalid"  # replaced by the local file server's address
GARBAGE = "http://garbage.invalid"  # replaced by a TCP server that does not speak HTTP
CONDITION_TIMEOUT = 45.0  # "within seconds": every condition case is reported well before this
QUIET_SECONDS = 12.0  # after the conditions: more than two resync ticks without new log lines


@dataclass(frozen=True)
class Refused:
    """The API server refuses the object; its message contains ``text``."""

    text: str


@dataclass(frozen=True)
class Condition:
    """Accepted; the operator reports this condition (``text`` in its message)."""

    type: str
    status: str
    reason: str
    text: str
    own_node: bool = False  # planned cases get a node each, so their pods never compete for one
    kubelet: Callable[[Any, str, str, dict[str, Any]], bool] | None = None  # what a kubelet would report


def _download_fails(cluster: Any, ns: str, name: str, obj: dict[str, Any]) -> bool:
    """kwok runs no containers: report what the downloader's failed sha256 check reports on a real node."""
    pods = cluster.get_json("-n", ns, "pods", "-l", f"modelfit.io/modeldeployment={name}")["items"]
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if not running:
        return False
    sha = obj["spec"]["model"]["sha256"]
    url = "https://huggingface.co/unsloth/Qwen3.5-0.8B-GGUF/resolve/main/Qwen3.5-0.8B-Q4_0.gguf"
    message = f"ChecksumMismatch: expected {sha}, got {'e3b0c442' * 8} for {url}"
    for pod in running:
        status = {
            "initContainerStatuses": [
                {
                    "name": "fetch-model",
                    "image": "docker.io/curlimages/curl:8.11.1",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
                }
            ]
        }
        cluster.kubectl(
            "-n", ns, "patch", "pod", pod["metadata"]["name"], "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}),
        )  # fmt: skip
    return True


def case(name: str, expect: Refused | Condition, meta_name: str | None = None, **spec: Any) -> Any:
    obj = md(meta_name or name, **spec)
    if obj["spec"].get("model") is None:
        del obj["spec"]["model"]
    if spec.get("spec") is False:
        del obj["spec"]
    return pytest.param(name, obj, expect, id=name)


def _affinity_terms(terms: Any) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


MUST_MATCH = "in body should match"
CTX = "context must be max or a number between 256 and 16777216"
ONE_SOURCE = "exactly one of catalog, url, huggingFace or pvc must be set"
OWNED = "serverArgs must not contain flags the plan owns"
SECRET_ARG = "serverArgs must not contain flags that carry secrets into the pod's arguments"
UNCOUNTED_ARG = "serverArgs must not contain flags that load or move memory the plan does not count"
NAME_LONG = "metadata.name must be at most 63 characters"
NAME_DNS = "metadata.name must be a DNS-1035 label"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOSTILE: dict[str, tuple[bytes, str]] = _load("_hostile_gguf", REPO / "tests" / "hostile_gguf.py").CORPUS
MEANWHILE = 3  # normal models applied right after the hostile headers, to time their plans


def _hostile_cases() -> list[Any]:
    """The dripping server first (it holds a read for the whole deadline), then each crafted header, then
    normal models whose plans must not wait for any of them."""
    out = [
        case(
            "url-drips",
            Condition("Planned", "False", "ModelUnreadable", "deadline"),
            model={"url": f"{FILES}/drip.gguf"},
        )
    ]
    for name, (_, says) in sorted(HOSTILE.items()):
        text = re.sub(r"\\(.)", r"\1", says)  # the corpus' regexes as plain text
        cond = Condition("Planned", "False", "ModelUnreadable", text)
        out.append(case(f"hostile-{name}", cond, model={"url": f"{FILES}/hostile/{name}.gguf"}))
    planned = Condition("Planned", "True", "Planned", "cpu on", own_node=True)
    return out + [case(f"meanwhile-{i}", planned, context=4096) for i in range(MEANWHILE)]


# (name, manifest, expectation)
CASES = [
    # -- wrong types, ranges and enums: the schema
    case("context-word", Refused(CTX), context="big"),
    case("context-negative", Refused(CTX), context=-5),
    case("context-too-large", Refused(CTX), context=99999999),
    case("parallel-word", Refused("spec.parallel in body must be of type integer"), parallel="two"),
    case("parallel-zero", Refused("spec.parallel in body should be greater than or equal to 1"), parallel=0),
    case("parallel-too-many", Refused("spec.parallel in body should be less than or equal to 256"), parallel=300),
    case("replicas-negative", Refused("spec.replicas in body should be greater than or equal to 0"), replicas=-1),
    case("quant-unknown", Refused(f"spec.model.quant {MUST_MATCH}"), model={"catalog": "qwen3.5-0.8b", "quant": "Q3_XYZ"}),
    case("backend-unknown", Refused('spec.backend: Unsupported value: "tpu"'), backend="tpu"),
    case("kvcache-unknown", Refused('spec.kvCacheType: Unsupported value: "q3_k"'), kvCacheType="q3_k"),
    case("loadmode-unknown", Refused('spec.loadMode: Unsupported value: "swap"'), loadMode="swap"),
    case("flash-attention-bool", Refused("spec.flashAttention in body must be of type string"), flashAttention=True),
    case("gpulayers-word", Refused("gpuLayers must be auto or a number between 0 and 1000"), gpuLayers="all"),
    case("gpulayers-too-many", Refused("gpuLayers must be auto or a number between 0 and 1000"), gpuLayers=5000),
    case("adapt-word", Refused("spec.adapt in body must be of type boolean"), adapt="yes"),
    case("service-type", Refused('spec.service.type: Unsupported value: "Ingress"'), service={"type": "Ingress"}),
    case("service-port", Refused("spec.service.port in body should be less than or equal to 65535"), service={"port": 70000}),
    case("mincontext-too-small", Refused("spec.minContext in body should be greater than or equal to 256"), minContext=100),
    case("hf-repo-short", Refused("spec.model.huggingFace.repo in body should be at least 3 chars long"),
         model={"huggingFace": {"repo": "ab", "file": "m.gguf"}}),
    case("secret-name-empty", Refused("spec.apiKeySecretRef.name in body should be at least 1 chars long"),
         apiKeySecretRef={"name": ""}),
    case("cache-size-word", Refused(f"spec.modelCache.pvc.size {MUST_MATCH}"), modelCache={"pvc": {"size": "lots"}}),
    case("hostpath-relative", Refused(f"spec.modelCache.hostPath.path {MUST_MATCH}"), modelCache={"hostPath": {"path": "models"}}),
    case("resources-word", Refused(f"spec.resources.limits.memory {MUST_MATCH}"), resources={"limits": {"memory": "lots"}}),
    case("resources-negative", Refused(f"spec.resources.requests.cpu {MUST_MATCH}"), resources={"requests": {"cpu": "-1"}}),
    case("resources-gb", Refused(f"spec.resources.limits.memory {MUST_MATCH}"), resources={"limits": {"memory": "2GB"}}),
    case("resources-number", Refused("spec.resources.limits.cpu in body must be of type string"), resources={"limits": {"cpu": 4}}),
    case("tolerations-not-objects", Refused("spec.tolerations[0] in body must be of type object"), tolerations=["gpu"]),
    case("server-args-too-many", Refused("spec.serverArgs: Too many: 65: must have at most 64 items"), serverArgs=["--jinja"] * 65),
    case("unknown-field", Refused('unknown field "spec.contextSize"'), contextSize=4096),
    case("no-spec", Refused("spec: Required value"), spec=False),
    # -- conflicting fields: CEL
    case("two-sources", Refused(ONE_SOURCE), model={**QWEN, "url": "http://127.0.0.1:1/x.gguf"}),
    case("no-source", Refused(ONE_SOURCE), model={}),
    case("catalog-without-quant", Refused("catalog requires quant"), model={"catalog": "qwen3.5-0.8b"}),
    case("quant-without-catalog", Refused("quant applies to catalog models only"), model={"url": "https://x/m.gguf", "quant": "Q4_0"}),
    case("url-ftp", Refused(f"spec.model.url {MUST_MATCH} '^https?://'"), model={"url": "ftp://127.0.0.1/x.gguf"}),
    case("sha256-short", Refused(f"spec.model.sha256 {MUST_MATCH}"), model={**QWEN, "sha256": "abc"}),
    case("sha256-uppercase", Refused(f"spec.model.sha256 {MUST_MATCH}"), model={**QWEN, "sha256": "A" * 64}),
    case("mincontext-above-context", Refused("minContext must not exceed context"), context=4096, minContext=8192),
    case("two-caches", Refused("set at most one of emptyDir, pvc or hostPath"),
         modelCache={"emptyDir": {}, "hostPath": {"path": "/models"}}),
    case("owned-flag", Refused(OWNED), serverArgs=["--jinja", "-c", "4096"]),
    case("owned-flag-equals", Refused(OWNED), serverArgs=["--n-gpu-layers=99"]),
    case("owned-flag-underscore", Refused(OWNED), serverArgs=["--ctx_size", "4096"]),  # llama-server reads --ctx-size
    case("api-key-in-args", Refused(SECRET_ARG), serverArgs=["--jinja", "--api-key", "sk-e2e"]),
    case("api-key-equals-underscore", Refused(SECRET_ARG), serverArgs=["--api_key=sk-e2e"]),
    case("mmproj-in-args", Refused(UNCOUNTED_ARG), serverArgs=["--mmproj", "/models/mmproj.gguf"]),
    case("mmproj-short", Refused(UNCOUNTED_ARG), serverArgs=["-mm", "/models/mmproj.gguf"]),
    # -- names that cannot make valid children: CEL at the root, or the API server itself
    case("name-64-chars", Refused(NAME_LONG), meta_name="m" * 64),
    case("name-253-chars", Refused(NAME_LONG), meta_name="m" * 253),
    case("name-digit-first", Refused(NAME_DNS), meta_name="1qwen"),
    case("name-with-dot", Refused(NAME_DNS), meta_name="qwen.small"),
    case("name-uppercase", Refused("a lowercase RFC 1123 subdomain must consist of"), meta_name="Qwen"),
    # -- accepted, then reported: models the operator cannot read
    case("url-unreachable", Condition("Planned", "False", "ModelUnreadable", "cannot fetch"),
         model={"url": "http://127.0.0.1:1/x.gguf"}),
    case("url-not-gguf", Condition("Planned", "False", "ModelUnreadable", "not a GGUF file"),
         model={"url": f"{FILES}/error-page.gguf"}),
    case("url-404", Condition("Planned", "False", "ModelUnreadable", "HTTP 404"), model={"url": f"{FILES}/missing.gguf"}),
    case("url-500", Condition("Planned", "False", "ModelUnreadable", "HTTP 500"), model={"url": f"{FILES}/broken.gguf"}),
    case("url-truncated", Condition("Planned", "False", "ModelUnreadable", "truncated GGUF header"),
         model={"url": f"{FILES}/truncated.gguf"}),
    case("url-not-http", Condition("Planned", "False", "ModelUnreadable", "not an HTTP answer"),
         model={"url": f"{GARBAGE}/m.gguf"}),
    case("pvc-file-unknown", Condition("Planned", "False", "ModelUnreadable", "name the file like a catalog model"),
         model={"pvc": {"claimName": "models", "path": "/mine.gguf"}}),
    case("affinity-malformed", Condition("Planned", "False", "InvalidSpec", "nodeAffinity must be an object"),
         affinity={"nodeAffinity": "zone-a"}),
    case("affinity-operator", Condition("Planned", "False", "InvalidSpec", "operator must be one of In, NotIn"),
         affinity=_affinity_terms([{"matchExpressions": [{"key": "zone", "operator": "Like", "values": ["a"]}]}])),
    # -- accepted, then reported: nothing to plan on
    case("backend-cuda-no-gpu", Condition("Planned", "False", "NoNodeFits", "backend cuda is not available"),
         backend="cuda", context=4096),
    case("selector-matches-nothing", Condition("Planned", "False", "NoEligibleNodes", "does not match"),
         nodeSelector={CASE_LABEL: "nowhere"}),
    case("too-big-for-any-node", Condition("Planned", "False", "NoNodeFits", "short by"),
         model={"catalog": "llama-3.1-8b", "quant": "F16"}, context=131072, kvCacheType="f16"),
    # -- accepted, then reported: overrides that contradict the plan
    case("requests-above-limits", Condition("Degraded", "True", "ApplyFailed", "must be less than or equal to memory limit", own_node=True),
         context=4096, resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
    case("resource-unknown", Condition("Degraded", "True", "ApplyFailed", "HTTP 422", own_node=True),
         context=4096, resources={"limits": {"bogus": "1"}}),
    case("toleration-operator", Condition("Degraded", "True", "ApplyFailed", 'Unsupported value: "Sometimes"', own_node=True),
         context=4096, tolerations=[{"key": "a", "operator": "Sometimes"}]),
    case("image-whitespace", Condition("Degraded", "True", "InvalidSpec", "is not an image reference"),
         context=4096, image={"cpu": " llama:server "}),
    case("anti-affinity-no-topology", Condition("Degraded", "True", "ApplyFailed", "topologyKey", own_node=True),
         context=4096, affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
             {"labelSelector": {"matchLabels": {"a": "b"}}}]}}),
    case("memory-override-mmap", Condition("Planned", "True", "MemoryOverrideIgnored", "thrashes on page faults", own_node=True),
         context=4096, loadMode="mmap", resources={"limits": {"memory": "64Mi"}}),
    case("context-above-model", Condition("Planned", "True", "Planned", "exceeds the model's trained 262144; capped", own_node=True),
         context=16777216),
    case("kv-quant-without-fa", Condition("Planned", "True", "Planned", "a quantized V cache needs flash attention", own_node=True),
         context=4096, kvCacheType="q4_0", flashAttention="off"),
    # -- accepted, then reported: missing Secrets and PVCs, wrong checksums
    case("secret-missing", Condition("Degraded", "True", "SecretNotFound", "Secret no-such-secret", own_node=True),
         context=4096, apiKeySecretRef={"name": "no-such-secret"}),
    case("secret-key-missing", Condition("Degraded", "True", "SecretKeyNotFound", "has no key api-key", own_node=True),
         context=4096, apiKeySecretRef={"name": "llm-key", "key": "api-key"}),
    case("pvc-missing", Condition("Degraded", "True", "PvcNotFound", "PersistentVolumeClaim no-such-claim", own_node=True),
         context=4096, model={"pvc": {"claimName": "no-such-claim", "path": "/models/Qwen3.5-0.8B-Q4_0.gguf"}}),
    case("cache-class-missing", Condition("Unschedulable", "True", "FailedScheduling", "PersistentVolumeClaim", own_node=True),
         context=4096, modelCache={"pvc": {"storageClass": "no-such-class", "size": "2Gi"}}),
    case("sha256-wrong", Condition("Degraded", "True", "ModelDownloadFailed", "ChecksumMismatch", own_node=True, kubelet=_download_fails),
         context=4096, model={**QWEN, "sha256": "0" * 64}),
    # -- the boundary: 63 characters make a valid label
    case("name-63-chars", Condition("Planned", "True", "Planned", "cpu on", own_node=True), meta_name="m" * 63, context=4096),
    *_hostile_cases(),
]  # fmt: skip

RESULTS: dict[str, str] = {}


# ---- the world the corpus runs in ---------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    """A file server on 127.0.0.1: an error page, a 404, a 500, a truncated GGUF header, the hostile headers
    (whole files: this server ignores Range) and one that drips a byte a second."""

    bodies = {
        "/error-page.gguf": b"<html><body>Sign in to continue</body></html>\n" * 50,
        "/truncated.gguf": b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"\x01",
        **{f"/hostile/{name}.gguf": data for name, (data, _) in HOSTILE.items()},
    }
    stop = threading.Event()

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        for i in range(120):  # each byte within any socket timeout; the reader's deadline ends it
            if self.stop.wait(1.0 if i else 0.0):
                return
            try:
                self.wfile.write(b"GGUF\x03"[i : i + 1] or b"\0")
                self.wfile.flush()
            except OSError:
                return

    def _answer(self, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/broken.gguf":
            self.send_error(500, "backend exploded")
            return
        if path == "/drip.gguf" and with_body:
            self._drip()
            return
        body = self.bodies.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            try:
                self.wfile.write(body)
            except OSError:  # the reader hangs up once it has the header: a whole-file answer is cut short
                pass

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)

    def log_message(self, *args: Any) -> None:
        pass


def _garbage_server() -> tuple[socket.socket, threading.Thread]:
    """Accepts connections and answers like an SSH server: not HTTP at all."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@dataclass
class Applied:
    obj: dict[str, Any]
    rc: int
    error: str
    at: float  # when the apply returned
    seen: float | None = None  # when the expected condition was first observed
    kubelet_done: bool = False


@pytest.fixture(scope="module")
def corpus(cluster: Any, crd: str, operator: Any) -> Iterator[dict[str, Any]]:
    ns = f"bad-{uuid.uuid4().hex[:6]}"
    pool = f"bad{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("-n", ns, "create", "secret", "generic", "llm-key", "--from-literal=other=x")
    _Files.stop.clear()
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    garbage, _ = _garbage_server()
    urls = {
        FILES: f"http://127.0.0.1:{files.server_address[1]}",
        GARBAGE: f"http://127.0.0.1:{garbage.getsockname()[1]}",
    }
    log_offset = operator.log_path.stat().st_size if operator.log_path.exists() else 0

    # Nodes first, all Ready before any ModelDeployment: a node event re-plans everything.
    nodes = [f"{pool}-shared"]
    cluster.make_node(nodes[0], cpu="4", memory="16Gi", labels={CASE_LABEL: "shared"}, wait_ready=False)
    objs: dict[str, dict[str, Any]] = {}
    for p in CASES:
        name, obj, expect = p.values
        obj = json.loads(json.dumps(obj).replace(FILES, urls[FILES]).replace(GARBAGE, urls[GARBAGE]))
        obj["metadata"]["namespace"] = ns
        if isinstance(expect, Condition) and "nodeSelector" not in obj["spec"]:
            label = name if expect.own_node else "shared"
            obj["spec"]["nodeSelector"] = {CASE_LABEL: label}
            if expect.own_node:
                nodes.append(f"{pool}-{name}"[:63])
                cluster.make_node(nodes[-1], cpu="4", memory="16Gi", labels={CASE_LABEL: label}, wait_ready=False)
        objs[name] = obj

    def all_ready() -> bool:
        items = cluster.get_json("nodes", "-l", CASE_LABEL)["items"]
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or [])
        }
        return set(nodes) <= ready

    cluster.wait_for(all_ready, timeout=90, what="corpus nodes Ready")
    time.sleep(3)  # the operator sees them settle before any ModelDeployment arrives

    applied: dict[str, Applied] = {}
    for name, obj in objs.items():
        proc = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
        applied[name] = Applied(obj, proc.returncode, proc.stderr.strip(), time.monotonic())

    # Watch every accepted object until its condition shows, doing what a kubelet would where one is needed.
    expects = {p.values[0]: p.values[2] for p in CASES}
    waiting = {n for n, a in applied.items() if a.rc == 0 and isinstance(expects[n], Condition)}
    deadline = time.monotonic() + CONDITION_TIMEOUT
    while waiting and time.monotonic() < deadline:
        items = {o["metadata"]["name"]: o for o in cluster.get_json("-n", ns, "modeldeployments")["items"]}
        now = time.monotonic()
        for name in sorted(waiting):
            exp, a = expects[name], applied[name]
            assert isinstance(exp, Condition)
            obj = items.get(a.obj["metadata"]["name"]) or {}
            if exp.kubelet is not None and not a.kubelet_done:
                a.kubelet_done = exp.kubelet(cluster, ns, a.obj["metadata"]["name"], a.obj)
            if _matches(obj, exp):
                a.seen = now
                waiting.discard(name)
        time.sleep(0.5)

    yield {"ns": ns, "applied": applied, "log_offset": log_offset, "operator": operator}

    cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    for n in nodes:
        cluster.delete_node(n, wait=False)
    _Files.stop.set()
    files.shutdown()
    files.server_close()
    garbage.close()


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def _matches(obj: dict[str, Any], exp: Condition) -> bool:
    c = _condition(obj, exp.type)
    return (c.get("status"), c.get("reason")) == (exp.status, exp.reason) and exp.text in (c.get("message") or "")


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- the ModelDeployment corpus -----------------------------------------------------------------


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert sum(isinstance(p.values[2], Refused) for p in CASES) >= 20
    assert sum(isinstance(p.values[2], Condition) for p in CASES) >= 20


@pytest.mark.parametrize(("name", "manifest", "expect"), CASES)
def test_bad_spec(
    cluster: Any, corpus: dict[str, Any], name: str, manifest: dict[str, Any], expect: Refused | Condition
) -> None:
    a: Applied = corpus["applied"][name]
    ns, obj_name = corpus["ns"], a.obj["metadata"]["name"]
    if isinstance(expect, Refused):
        RESULTS[name] = f"refused: {_short(a.error.replace(obj_name, '<name>') if len(obj_name) > 20 else a.error)}"
        assert a.rc != 0, f"{name} was accepted"
        assert expect.text in a.error, a.error
        assert "Traceback" not in a.error
        assert cluster.kubectl("-n", ns, "get", "md", obj_name, check=False).returncode != 0
        return
    obj = cluster.get_json("-n", ns, "md", obj_name, check=False) or {}
    c = _condition(obj, expect.type)
    took = f"<={a.seen - a.at:.1f}s" if a.seen is not None else "never"
    RESULTS[name] = (
        f"{expect.type}={c.get('status')} {c.get('reason')} after {took}: {_short(c.get('message') or '', 80)}"
    )
    assert a.rc == 0, a.error
    assert a.seen is not None, f"{name}: no {expect.type}={expect.status} {expect.reason} ({expect.text!r}); got {c}"
    assert _matches(obj, expect), c
    if expect.reason in ("ApplyFailed", "ModelUnreadable", "InvalidSpec"):
        assert _condition(obj, "Ready").get("status") == "False"


def test_models_are_planned_while_hostile_headers_are_read(corpus: dict[str, Any]) -> None:
    """Normal models applied right after the hostile headers, while the drip still holds a read, are planned
    within seconds. Printed: apply to the first poll that saw each condition (upper bounds; the polls start
    after the last apply, so only the last-applied cases are tight), and the operator's peak memory."""
    applied: dict[str, Applied] = corpus["applied"]

    def took(name: str) -> float | None:
        a = applied[name]
        return round(a.seen - a.at, 1) if a.seen is not None else None

    meanwhile = [f"meanwhile-{i}" for i in range(MEANWHILE)]
    drip = applied["url-drips"]
    ended = drip.seen if drip.seen is not None else float("inf")
    during = [n for n in meanwhile if (applied[n].seen or ended) < ended]
    hwm = ""
    status = Path(f"/proc/{corpus['operator'].pid}/status")
    if status.exists():
        lines = status.read_text().splitlines()
        hwm = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("VmHWM")), "")
    print(
        f"\nhostile headers: {len(HOSTILE)} crafted files and a drip, each Planned=False ModelUnreadable "
        f"(the drip after <= {took('url-drips')} s); normal models applied after them Planned=True after "
        f"<= {[took(n) for n in meanwhile]} s, {len(during)} of {MEANWHILE} before the drip's read ended; "
        f"operator peak RSS {hwm or 'unknown'}"
    )
    assert all(t is not None and t <= 30.0 for t in map(took, meanwhile)), [took(n) for n in meanwhile]


# ---- the CLI corpus: a subset of tests/test_cli_inputs.py, as real processes --------------------


def _cli_table() -> list[tuple[tuple[str, ...], str, str]]:
    module = _load("_cli_inputs_table", REPO / "tests" / "test_cli_inputs.py")
    return list(module.BAD[::2])  # every other one: plan, serve and values, each option at least once


CLI = _cli_table()


@pytest.mark.parametrize(("argv", "option", "text"), CLI, ids=[" ".join(a) for a, _, _ in CLI])
def test_bad_cli_invocation(argv: tuple[str, ...], option: str, text: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "modelfit.cli", *argv], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    RESULTS["modelfit " + " ".join(argv)] = f"rc {p.returncode}: {_short(p.stderr, 100)}"
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("modelfit: error: "), p.stderr
    assert option in p.stderr and text in p.stderr, p.stderr


def test_cli_corpus_is_large_enough() -> None:
    assert len(CLI) >= 20


# ---- the operator survived, quietly -------------------------------------------------------------


def _log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _metrics(op: Any) -> dict[str, float]:
    """The operator's own counters: API requests by verb, reconciles by result."""
    out: dict[str, float] = {}
    for line in op.metrics().splitlines():
        m = re.match(r'^modelfit_(api_requests|reconciles)_total\{\w+="(\w+)"\} ([0-9.e+]+)$', line)
        if m:
            out[f"{m.group(1)}:{m.group(2)}"] = float(m.group(3))
    return out


def test_operator_kept_running_without_tracebacks_or_loops(corpus: dict[str, Any]) -> None:
    """Once reported, nothing is retried, rewritten or logged again while nothing changes."""
    op, ns = corpus["operator"], corpus["ns"]
    accepted = [a.obj["metadata"]["name"] for a in corpus["applied"].values() if a.rc == 0]

    def snapshot() -> tuple[dict[str, int], int, dict[str, float]]:
        log = _log_since(op.log_path, corpus["log_offset"])
        per_object = {n: log.count(f"[{ns}/{n}]") for n in accepted}  # the resync loop names its object
        # kopf logs every event handler's success at INFO; the shared session operator sees other tests'
        # pods and namespaces come and go, so those lines say nothing about a loop over this corpus.
        lines = [ln for ln in log.splitlines() if not re.search(r"Handler '[^']+' succeeded", ln)]
        return per_object, len(lines), _metrics(op)

    objs0, lines0, m0 = snapshot()
    time.sleep(QUIET_SECONDS)
    objs1, lines1, m1 = snapshot()
    log = _log_since(op.log_path, corpus["log_offset"])
    grew = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1 if m1.get(k, 0) != m0.get(k, 0)}
    writes = sum(v for k, v in grew.items() if k.split(":")[1] in ("PATCH", "POST", "PUT", "DELETE"))
    failures = sum(v for k, v in grew.items() if k.split(":")[1] in ("api_error", "api_retry", "error"))
    summary = (
        f"in {QUIET_SECONDS:.0f}s after the last condition: {lines1 - lines0} log lines, {writes:.0f} API writes, "
        f"{failures:.0f} failed reconciles; counters that moved: {grew}"
    )
    try:
        assert op.running(), op.log_tail()
        assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]
        assert "failed temporarily" not in log and "has exceeded" not in log, log[-4000:]
        noisy = {n: (objs0[n], objs1[n]) for n in accepted if objs1[n] - objs0[n] > 2}
        assert not noisy, f"log lines about these objects still growing: {noisy}"
        assert lines1 - lines0 <= 10, summary + "\n" + log[-3000:]
        assert writes <= 2 and failures == 0, summary
    finally:
        width = max(len(k) for k in RESULTS) if RESULTS else 10
        print(f"\n\nBad-input corpus: {len(RESULTS)} results (times are upper bounds: apply to first poll that saw it)")
        for k, v in RESULTS.items():
            print(f"  {k:<{width}}  {v}")
        print(f"operator: {'running' if op.running() else 'DEAD'}, no Traceback: {'Traceback' not in log}; {summary}")
        sys.stdout.flush()
