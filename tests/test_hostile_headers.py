"""Hostile GGUF headers: every one ends as a GGUFError, fast and in little memory, and never holds the event loop.

A header is read from any URL a ModelDeployment names, so the reader is fuzzed (hypothesis) and run on a
corpus of crafted files (hostile_gguf.py, which e2e/test_bad_inputs.py serves to a real control plane).
"""

from __future__ import annotations

import asyncio
import http.server
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_gguf import CORPUS, T, gguf, kv, llama, llama_tensors, tensor
from modelfit import gguf_header, sources
from modelfit.api import ModelDeploymentSpec
from modelfit.facts import facts_from_header
from modelfit.gguf_header import ByteSource, GGUFError, header_from
from modelfit.gguf_reader import read_gguf
from modelfit.reconciler import OperatorState, reconcile
from modelfit.settings import Settings
from modelfit.sources import Sources, load_facts
from test_handlers import CPU_LARGE, LOG, FakeKube, md

LOCAL = Settings(allow_networks=("127.0.0.0/8",))  # the test servers are on loopback, refused by default


def local_state() -> OperatorState:
    """An operator state whose settings let header reads reach the test servers (as the e2e operator's)."""
    st = OperatorState()
    st.settings = LOCAL
    return st


MEMORY_BUDGET = 64 << 20  # tracemalloc peak of one hostile header's parse (the operator's limit is 384Mi)


class MemorySource:
    name = "hostile.gguf"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def total_size(self) -> int | None:
        return len(self.data)


def facts_of(data: bytes) -> object:
    return facts_from_header(header_from("hostile.gguf", [MemorySource(data)]))


# ---- the corpus ----------------------------------------------------------------------------------------


def test_the_base_header_is_valid() -> None:
    f = facts_from_header(header_from("m.gguf", [MemorySource(llama())]))
    assert f.n_layer == 2 and f.n_embd == 32 and f.n_vocab == 16 and f.n_head_kv == 2


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_hostile_header_is_a_gguf_error_in_little_memory(name: str) -> None:
    data, says = CORPUS[name]
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=says):
            facts_of(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BUDGET, f"{name}: {peak >> 20} MiB"


def test_the_block_count_header_is_300_bytes() -> None:
    data, _ = CORPUS["block-count-2m"]
    assert len(data) - 2048 <= 300  # the case: the header alone, before the tensor data


@pytest.mark.timeout(60)
def test_truncated_anywhere_is_a_gguf_error() -> None:
    data = llama()
    for cut in range(len(data)):
        with pytest.raises(GGUFError):
            facts_of(data[:cut])


@pytest.mark.timeout(20)
def test_a_header_larger_than_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_header, "MAX_HEADER_BYTES", 1 << 20)
    data = gguf([kv("k", T.ARRAY, (T.UINT8, b"\0" * (2 << 20)))], [tensor("t", (8,))], data=32)
    with pytest.raises(GGUFError, match="larger than 1 MiB"):
        facts_of(data)


def test_shards_are_bounded() -> None:
    def shards() -> Iterator[ByteSource]:
        for i in range(gguf_header.MAX_SHARDS + 5):
            yield MemorySource(gguf([], [tensor(f"t{i}", (8,))], data=32))

    with pytest.raises(GGUFError, match="more than 256 shards"):
        header_from("m-00001-of-00300.gguf", shards())


# ---- property-based: mutations of valid headers never raise anything but GGUFError ----------------------

_BASES = [
    llama(),
    llama(
        [kv("llama.attention.sliding_window", T.UINT32, 8)],
        **{"attention.sliding_window_pattern": (T.ARRAY, (T.BOOL, [True, False]))},
    ),
]
_INTERESTING = [0, 1, 2, 3, 7, 9, 12, 13, 255, 4096, 4097, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_BASES)))
    head = len(data) - 2048 - 2 * 4096  # the header and its padding: where the mutations matter
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u32", "u64", "cut", "splice"]))
        at = draw(st.integers(0, head - 1))
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind in ("u32", "u64"):
            size = 4 if kind == "u32" else 8
            v = draw(st.sampled_from(_INTERESTING)) % (1 << (8 * size))
            data[at : at + size] = v.to_bytes(size, "little")
        elif kind == "cut":
            del data[at:]
            break
        else:
            n = draw(st.integers(1, 64))
            data[at:at] = data[at : at + n]
    return bytes(data)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_headers_raise_only_gguf_errors(data: bytes) -> None:
    try:
        facts_of(data)
    except GGUFError:
        pass


_SCALARS = [T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.FLOAT32, T.BOOL, T.UINT64, T.INT64, T.FLOAT64]
_FACT_KEYS = [
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "attention.recurrent_layers",
    "full_attention_interval",
    "nextn_predict_layers",
    "vocab_size",
    "expert_count",
    "ssm.conv_kernel",
    "ssm.state_size",
    "ssm.inner_size",
    "ssm.group_count",
    "shortconv.l_cache",
]
_RANGES = {
    T.UINT8: (0, 255),
    T.INT8: (-128, 127),
    T.UINT16: (0, 2**16 - 1),
    T.INT16: (-(2**15), 2**15 - 1),
    T.UINT32: (0, 2**32 - 1),
    T.INT32: (-(2**31), 2**31 - 1),
    T.UINT64: (0, 2**64 - 1),
    T.INT64: (-(2**63), 2**63 - 1),
}


def _typed(vtype: T) -> st.SearchStrategy[Any]:
    if vtype in _RANGES:
        lo, hi = _RANGES[vtype]
        return st.one_of(st.integers(max(lo, -3), min(hi, 4100)), st.integers(lo, hi))
    if vtype == T.BOOL:
        return st.booleans()
    if vtype == T.STRING:
        return st.binary(max_size=8)
    return st.floats(width=32 if vtype == T.FLOAT32 else 64)


@st.composite
def typed_value(draw: st.DrawFn) -> tuple[T, Any]:
    vtype = draw(st.sampled_from([*_SCALARS, T.STRING, T.ARRAY]))
    if vtype != T.ARRAY:
        return vtype, draw(_typed(vtype))
    item = draw(st.sampled_from([*_SCALARS, T.STRING]))
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 4097]))
    items = [draw(_typed(item)) for _ in range(min(n, 8))]
    return T.ARRAY, (item, (items * (n // max(len(items), 1) + 1))[:n])


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["llama", "qwen35", "lfm2", "gemma3", "mamba2", "nemotron_h", "llama4", "deepseek2"]),
    st.dictionaries(st.sampled_from(_FACT_KEYS), typed_value(), max_size=6),
)
def test_fuzz_any_type_in_any_key_raises_only_gguf_errors(arch: str, keys: dict[str, tuple[T, Any]]) -> None:
    kvs = [kv("general.architecture", T.STRING, arch)] + [kv(f"{arch}.{k}", *v) for k, v in keys.items()]
    infos, data = llama_tensors()
    try:
        facts_of(gguf(kvs, infos, data=data))
    except GGUFError:
        pass


# ---- over HTTP: one deadline for the whole read -----------------------------------------------------------


class _Drip(http.server.BaseHTTPRequestHandler):
    """Promises a megabyte, then sends one byte a second: each socket read is within any timeout."""

    stop = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(206)
        self.send_header("Content-Range", "bytes 0-1048575/1048576")
        self.send_header("Content-Length", "1048576")
        self.end_headers()
        payload = b"GGUF" + b"\0" * 100
        for i in range(len(payload)):
            if self.stop.wait(1.0 if i else 0.0):
                return
            try:
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
            except OSError:
                return


@pytest.fixture
def drip() -> Iterator[str]:
    _Drip.stop.clear()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/m.gguf"
    _Drip.stop.set()
    srv.shutdown()
    srv.server_close()


@pytest.mark.timeout(15)
def test_a_dripping_server_fails_at_the_deadline(drip: str) -> None:
    with pytest.raises(GGUFError, match="deadline"):
        read_gguf(drip, timeout=30.0, deadline=2.0)


@pytest.mark.timeout(15)
def test_a_silent_server_fails_at_the_deadline_not_the_socket_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connects, never answers
    try:
        with pytest.raises(GGUFError, match="deadline"):
            read_gguf(f"http://127.0.0.1:{listener.getsockname()[1]}/m.gguf", timeout=60.0, deadline=2.0)
    finally:
        listener.close()


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start, end = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        if start >= len(data):
            self.send_error(416)
            return
        body = data[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def files() -> Iterator[tuple[str, dict[str, bytes]]]:
    _Files.files = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Files.files
    srv.shutdown()
    srv.server_close()


# ---- in the operator: off the event loop, and a condition for each ------------------------------------------


def _ticking(coro_factory: Callable[[], Any]) -> tuple[BaseException | object, int]:
    """Run a coroutine while a ticker counts 50 ms sleeps: a held event loop stops the count."""

    async def main() -> tuple[BaseException | object, int]:
        ticks = 0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            out: BaseException | object = await coro_factory()
        except GGUFError as exc:
            out = exc
        done.set()
        await ticker
        return out, ticks

    return asyncio.run(main())


@pytest.mark.timeout(20)
def test_load_facts_parses_off_the_event_loop(files: tuple[str, dict[str, bytes]], monkeypatch) -> None:
    url, served = files
    served["m.gguf"] = llama()
    real = sources.facts_from_header

    def slow(header: Any, name: str | None = None) -> Any:
        time.sleep(1.0)  # a large header's parse
        return real(header, name)

    monkeypatch.setattr(sources, "facts_from_header", slow)
    spec = ModelDeploymentSpec.model_validate({"model": {"url": f"{url}/m.gguf"}})
    out, ticks = _ticking(lambda: load_facts(spec, Sources(), settings=LOCAL))
    assert getattr(out, "source", None) == f"header: {url}/m.gguf"
    assert ticks >= 10  # the loop went on during the second of parsing


@pytest.mark.timeout(20)
def test_a_dripping_model_url_fails_at_the_deadline_without_holding_the_loop(drip: str, monkeypatch) -> None:
    monkeypatch.setattr(sources, "READ_DEADLINE", 1.5)
    spec = ModelDeploymentSpec.model_validate({"model": {"url": drip}})
    out, ticks = _ticking(lambda: load_facts(spec, Sources(), settings=LOCAL))
    assert isinstance(out, GGUFError) and "deadline" in str(out)
    assert ticks >= 10


@pytest.mark.timeout(60)
def test_every_hostile_header_is_a_planned_false_condition(files: tuple[str, dict[str, bytes]]) -> None:
    url, served = files
    served.update({f"{name}.gguf": data for name, (data, _) in CORPUS.items()})
    k, state = FakeKube([CPU_LARGE]), local_state()
    for name, (_, says) in CORPUS.items():
        patch = asyncio.run(reconcile(md({"model": {"url": f"{url}/{name}.gguf"}}, name=name), LOG, k, state))
        planned = {c["type"]: c for c in patch["conditions"]}["Planned"]
        assert (planned["status"], planned["reason"]) == ("False", "ModelUnreadable"), name
        assert "cannot read the model" in planned["message"] and re.search(says, planned["message"]), name


def test_an_unexpected_parser_failure_is_still_a_condition(files: tuple[str, dict[str, bytes]], monkeypatch) -> None:
    url, served = files
    served["m.gguf"] = llama()

    def broken(header: Any, name: str | None = None) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(sources, "facts_from_header", broken)
    patch = asyncio.run(reconcile(md({"model": {"url": f"{url}/m.gguf"}}), LOG, FakeKube([CPU_LARGE]), local_state()))
    planned = {c["type"]: c for c in patch["conditions"]}["Planned"]
    assert planned["reason"] == "ModelUnreadable" and "RecursionError" in planned["message"]


def test_corpus_files_stay_small() -> None:
    assert max(len(data) for data, _ in CORPUS.values()) < 16 << 20  # e2e serves them all
