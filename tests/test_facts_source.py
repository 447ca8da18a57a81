"""Where the operator's model facts come from: a catalog file's real header (or the catalog's facts when it
cannot be read, remembered so no reconcile waits twice), a Hugging Face token from a Secret for the header
read and the download, and the chart-free plumbing around them (status.plan.factsSource, conditions).

The test server is on loopback and answers http and https on one port: the operator's reads are made with
127.0.0.0/8 allowed (refused by default, tests/test_egress.py), a token goes over https only.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from local_tls import DualProtocol, client_context, make_cert, server_context
from modelfit import catalog, gguf_reader, sources
from modelfit.api import ModelDeploymentSpec
from modelfit.gguf_reader import GGUFError, read_gguf
from modelfit.kube import path_for
from modelfit.reconciler import OperatorState, reconcile
from modelfit.settings import Settings
from modelfit.sources import HeaderReads, Sources, load_facts
from modelfit_dev import synth
from test_handlers import CPU_LARGE, LOG, FakeKube, deploy_path, md

TOKEN = "hf_s3cretTOKEN"
LOCAL = Settings(allow_networks=("127.0.0.0/8",))


def local_state(src: Sources | None = None) -> OperatorState:
    """An operator state whose settings let header reads reach the test server (as the e2e operator's)."""
    st = OperatorState(src)
    st.settings = LOCAL
    return st


class _Handler(http.server.BaseHTTPRequestHandler):
    """Range reads of files under ``root``; with ``token`` set, 401 unless it comes as a Bearer header."""

    root: Path = Path()
    token: str | None = None
    seen: list[tuple[str, str | None]] = []  # (path, Authorization)

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, head: bool) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect/").replace("@", "/", 2))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_error(401)
            return
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        if rng:
            a, b = rng.removeprefix("bytes=").split("-")
            start, end = int(a), min(int(b), size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not head:
            with path.open("rb") as fh:
                fh.seek(start)
                self.wfile.write(fh.read(end - start + 1))

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)


class _Server(DualProtocol, http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tmp_path: Path, pem: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Handler]]]:
    """The http URL of a server on 127.0.0.1 (its https URL: the same with https), the reads trusting its
    certificate."""
    handler = type("H", (_Handler,), {"root": tmp_path, "token": None, "seen": []})
    srv = _Server(("127.0.0.1", 0), handler)
    srv.tls = server_context(pem)
    monkeypatch.setattr(gguf_reader, "TLS_CONTEXT", client_context(pem))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def https(url: str) -> str:
    return url.replace("http://", "https://", 1)


def write_catalog_like(path: Path, name: str, quant: str) -> None:
    """A sparse GGUF whose header lists every tensor a catalog model's recipe gives (no vocabulary)."""
    spec, facts = catalog.MODELS[name], catalog.catalog_facts(name, quant)
    meta: list[tuple[str, GGUFValueType, object]] = [
        ("general.architecture", GGUFValueType.STRING, spec.arch),
        (f"{spec.arch}.block_count", GGUFValueType.UINT32, spec.n_layer),
        (f"{spec.arch}.context_length", GGUFValueType.UINT32, spec.context_length),
        (f"{spec.arch}.embedding_length", GGUFValueType.UINT32, spec.n_embd),
        (f"{spec.arch}.feed_forward_length", GGUFValueType.UINT32, spec.n_ff),
        (f"{spec.arch}.attention.head_count", GGUFValueType.UINT32, spec.n_head),
        (f"{spec.arch}.attention.head_count_kv", GGUFValueType.UINT32, spec.n_head_kv),
        (f"{spec.arch}.vocab_size", GGUFValueType.UINT32, spec.n_vocab),
    ]

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(facts.tensors), len(meta))
    for key, vtype, value in meta:
        out += string(key) + struct.pack("<I", vtype)
        out += string(str(value)) if vtype == GGUFValueType.STRING else struct.pack("<I", value)
    offset = 0
    for t in facts.tensors:
        qtype = GGMLQuantizationType[t.ggml_type]
        out += string(t.name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
        out += struct.pack("<IQ", qtype, offset)
        block, size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in t.shape:
            n *= d
        offset += (n // block * size + 31) // 32 * 32
    data_start = (len(out) + 31) // 32 * 32
    with path.open("wb") as fh:
        fh.write(out)
        fh.truncate(data_start + offset)  # sparse: the weights are never read


def conds(patch: dict) -> dict:
    return {c["type"]: c for c in patch["conditions"]}


def plan(spec: dict, k: FakeKube, st: OperatorState, name: str = "qwen") -> dict:
    return asyncio.run(reconcile(md(spec, name=name), LOG, k, st))


# ---- A: catalog models from their real header -----------------------------------------------------------


def test_catalog_model_is_planned_from_its_header_when_the_url_answers(server, tmp_path, monkeypatch):
    url, _ = server
    write_catalog_like(tmp_path / "l.gguf", "llama-3.2-1b", "Q4_0")
    monkeypatch.setattr(catalog, "catalog_url", lambda name, quant: f"{url}/l.gguf")
    st = local_state(Sources(HeaderReads()))
    p = plan({"model": {"catalog": "llama-3.2-1b", "quant": "Q4_0"}, "context": 8192}, FakeKube([CPU_LARGE]), st)
    assert p["plan"]["factsSource"] == f"header: {url}/l.gguf"
    assert p["plan"]["modelBytes"] == (tmp_path / "l.gguf").stat().st_size  # the file's, not the estimate
    assert p["plan"]["model"] == "Llama-3.2-1B-Instruct-Q4_0"
    c = conds(p)["Planned"]
    assert c["status"] == "True" and "differs from the catalog" not in c["message"]
    assert not any("differs" in w for w in p["plan"]["warnings"])


def test_a_header_that_differs_from_the_catalog_is_a_warning_and_wins(server, monkeypatch):
    url, h = server
    tiny = synth.ensure_model("llama-tiny", "F16")
    (h.root / "tiny.gguf").symlink_to(tiny)
    monkeypatch.setattr(catalog, "catalog_url", lambda name, quant: f"{url}/tiny.gguf")
    st = local_state(Sources(HeaderReads()))
    p = plan({"model": {"catalog": "llama-3.2-1b", "quant": "F16"}, "context": 4096}, FakeKube([CPU_LARGE]), st)
    assert p["plan"]["factsSource"] == f"header: {url}/tiny.gguf"
    assert p["plan"]["totalLayers"] == 3  # llama-tiny's 2 blocks plus output, not the catalog's 16
    c = conds(p)["Planned"]
    assert c["status"] == "True"
    for part in ("differs from the catalog", "layers 2 (catalog 16)", "trained context 4096 (catalog 131072)"):
        assert part in c["message"]
    assert any("file size" in w for w in p["plan"]["warnings"])


def test_unreachable_catalog_url_falls_back_fast_and_is_not_tried_twice(monkeypatch):
    monkeypatch.setattr(catalog, "catalog_url", lambda name, quant: "http://127.0.0.1:9/none.gguf")
    st = local_state(Sources(HeaderReads()))
    k = FakeKube([CPU_LARGE])
    started = time.monotonic()
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 4096}
    p = plan(spec, k, st)
    src = p["plan"]["factsSource"]
    assert src.startswith("catalog (header unreachable: http://127.0.0.1:9/none.gguf: cannot fetch")
    assert p["plan"]["modelBytes"] == catalog.catalog_facts("qwen3.5-0.8b", "Q4_0").file_bytes
    assert conds(p)["Planned"]["status"] == "True"
    for _ in range(3):
        plan(spec, k, st, name="other")
    assert st.sources.headers.reads == 1 and time.monotonic() - started < 3


def test_a_hub_that_never_answers_costs_one_bounded_wait(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        reads = HeaderReads(timeout=5.0, wait=0.3)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/m.gguf"

        async def twice() -> list[tuple[object, str]]:
            return list(await asyncio.gather(*(reads.read(url, None, LOCAL) for _ in range(3))))

        started = time.monotonic()
        out = asyncio.run(twice())
        assert time.monotonic() - started < 2 and reads.reads == 1  # concurrent reconciles share the one read
        assert all(h is None and "no answer within 0.3 s" in e for h, e in out)
        started = time.monotonic()
        assert asyncio.run(reads.read(url, None, LOCAL))[0] is None and time.monotonic() - started < 0.1  # remembered
        reads.retry = 0.0  # after HEADER_RETRY: tried again (the first read is still waiting: it is joined)
        asyncio.run(reads.read(url, None, LOCAL))
        assert reads.reads == 1
    finally:
        listener.close()


def test_a_failure_is_retried_after_a_while_and_at_once_with_a_new_token():
    calls: list[dict | None] = []

    def reader(url, headers, timeout, settings):
        calls.append(headers)
        raise GGUFError(f"{url}: HTTP 401 Unauthorized")

    reads = HeaderReads(reader=reader, retry=600.0)
    for _ in range(3):
        assert asyncio.run(reads.read("http://h/m.gguf"))[1] == "http://h/m.gguf: HTTP 401 Unauthorized"
    assert calls == [None]
    asyncio.run(reads.read("http://h/m.gguf", TOKEN))
    assert calls == [None, {"Authorization": f"Bearer {TOKEN}"}]
    reads.retry = 0.0
    asyncio.run(reads.read("http://h/m.gguf"))
    assert len(calls) == 3


def test_model_on_a_pvc_says_it_is_known_by_its_file_name():
    spec = {"model": {"pvc": {"claimName": "models", "path": "/Qwen3.5-0.8B-Q4_0.gguf"}}, "context": 4096}
    loaded = asyncio.run(load_facts(ModelDeploymentSpec.model_validate(spec), Sources()))
    assert loaded.source == (
        "catalog (recognised by the file name Qwen3.5-0.8B-Q4_0.gguf; the operator does not read PVC models)"
    )


def test_facts_mismatch_names_the_key_numbers():
    a = catalog.catalog_facts("qwen3-0.6b", "Q4_0")
    assert catalog.facts_mismatch(a, a) == []
    assert catalog.facts_mismatch(a.model_copy(update={"file_bytes": int(a.file_bytes * 1.04)}), a) == []
    b = a.model_copy(update={"architecture": "llama", "n_layer": 3, "file_bytes": a.file_bytes * 2})
    assert catalog.facts_mismatch(b, a) == [
        "architecture llama (catalog qwen3)",
        "layers 3 (catalog 28)",
        f"file size {a.file_bytes * 2} bytes (catalog {a.file_bytes})",
    ]


# ---- B: a Hugging Face token from a Secret --------------------------------------------------------------


def test_header_read_sends_the_token_and_401_without(server, tmp_path):
    url, h = server
    h.token = TOKEN
    write_catalog_like(tmp_path / "q.gguf", "qwen3-0.6b", "Q4_0")
    with pytest.raises(GGUFError, match="HTTP 401") as exc:
        read_gguf(f"{https(url)}/q.gguf")
    assert TOKEN not in str(exc.value)
    header = read_gguf(f"{https(url)}/q.gguf", headers={"Authorization": f"Bearer {TOKEN}"})
    assert header.architecture == "qwen3" and header.file_bytes == (tmp_path / "q.gguf").stat().st_size
    assert all(auth == f"Bearer {TOKEN}" for _, auth in h.seen[1:])


def test_the_token_follows_a_redirect_on_the_same_host_only(server, tmp_path):
    url, h = server
    write_catalog_like(tmp_path / "q.gguf", "qwen3-0.6b", "Q4_0")
    port = url.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    read_gguf(f"{https(url)}/redirect/https:@@localhost:{port}/q.gguf", headers=auth)  # another host: no token
    assert h.seen[0][1] == f"Bearer {TOKEN}" and h.seen[1] == ("/q.gguf", None)
    h.seen.clear()
    read_gguf(f"{https(url)}/redirect/@q.gguf", headers=auth)
    assert h.seen[1] == ("/q.gguf", f"Bearer {TOKEN}")


def test_render_puts_the_token_on_the_downloader_from_the_secret():
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0", "tokenSecretRef": {"name": "hf"}}, "context": 4096}
    plan(spec, k, st)
    pod = k.objects[deploy_path()]["spec"]["template"]["spec"]
    (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in fetch["env"]
    assert not any(e["name"] == "HF_TOKEN" for e in pod["containers"][0]["env"])
    assert "HF_TOKEN" not in " ".join(fetch["command"][:2])


def test_handler_reads_the_secret_and_sends_its_token(server, tmp_path):
    url, h = server
    h.token = TOKEN
    write_catalog_like(tmp_path / "q.gguf", "qwen3-0.6b", "Q4_0")
    secret = path_for("v1", "Secret", "default", "hf")
    k, st = FakeKube([CPU_LARGE]), local_state()
    url = https(url)
    spec = {"model": {"url": f"{url}/q.gguf", "tokenSecretRef": {"name": "hf", "key": "HF_TOKEN"}}, "context": 4096}

    # no Secret: read without a token (401), and both conditions say why
    c = conds(plan(spec, k, st))
    assert c["Planned"]["reason"] == "ModelUnreadable"
    assert (
        "HTTP 401" in c["Planned"]["message"]
        and "Secret hf (spec.model.tokenSecretRef) does not exist" in (c["Planned"]["message"])
    )
    k.objects[secret] = {"data": {"other": base64.b64encode(b"x").decode()}}
    assert "has no key HF_TOKEN" in conds(plan(spec, k, st))["Planned"]["message"]

    k.objects[secret] = {"data": {"HF_TOKEN": base64.b64encode(f"{TOKEN}\n".encode()).decode()}}
    p = plan(spec, k, st)
    assert p["plan"]["factsSource"] == f"header: {url}/q.gguf"
    assert conds(p)["Planned"]["status"] == "True" and conds(p)["Degraded"]["reason"] == "AsExpected"
    assert (("/q.gguf", f"Bearer {TOKEN}")) in h.seen
    assert all(TOKEN not in str(v) for v in p.values())
    fetch = k.objects[deploy_path()]["spec"]["template"]["spec"]["initContainers"][-1]
    assert fetch["env"][-1] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}


def test_a_missing_token_secret_on_a_catalog_model_is_degraded_not_unplanned(monkeypatch):
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0", "tokenSecretRef": {"name": "hf"}}, "context": 4096}
    p = plan(spec, k, st)
    c = conds(p)
    assert c["Planned"]["status"] == "True"
    assert c["Degraded"]["reason"] == "SecretNotFound" and "spec.model.tokenSecretRef" in c["Degraded"]["message"]
    assert "Secret hf (spec.model.tokenSecretRef) does not exist" in p["plan"]["factsSource"]


def test_a_401_without_a_token_hints_at_token_secret_ref(server, tmp_path):
    url, h = server
    h.token = TOKEN
    write_catalog_like(tmp_path / "q.gguf", "qwen3-0.6b", "Q4_0")
    c = conds(plan({"model": {"url": f"{url}/q.gguf"}, "context": 4096}, FakeKube([CPU_LARGE]), local_state()))
    assert c["Planned"]["reason"] == "ModelUnreadable" and "needs spec.model.tokenSecretRef" in c["Planned"]["message"]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"token": "!!!"}, "is not base64 of UTF-8 text"),
        ({"token": base64.b64encode(b"a b").decode()}, "has spaces or control characters"),
        ({"token": ""}, "is empty"),
    ],
)
def test_a_token_that_cannot_be_a_header_is_refused_clearly(data, why):
    k = FakeKube([])
    k.objects[path_for("v1", "Secret", "ns", "hf")] = {"data": data}
    spec = ModelDeploymentSpec.model_validate({"model": {"url": "http://h/m.gguf", "tokenSecretRef": {"name": "hf"}}})
    token, note = asyncio.run(sources.model_token(k, "ns", spec))
    assert token is None and why in note


def test_token_secret_ref_is_refused_for_a_pvc_model():
    with pytest.raises(ValueError, match="tokenSecretRef applies to downloaded models"):
        ModelDeploymentSpec.model_validate(
            {"model": {"pvc": {"claimName": "m", "path": "/m.gguf"}, "tokenSecretRef": {"name": "hf"}}}
        )
