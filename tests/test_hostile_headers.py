"""Hostile GGUF headers: every one ends as a GGUFError, fast and in little memory, and never holds the event loop.

A header is read from any URL a ModelDeployment names, so the reader is fuzzed (hypothesis) and run on a
corpus of crafted files built here with struct; ``CORPUS`` is also what the e2e suite serves to a real control
plane (e2e/test_bad_inputs.py loads this module by path).
"""

from __future__ import annotations

import asyncio
import http.server
import re
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfit import gguf_header, sources
from modelfit.api import ModelDeploymentSpec
from modelfit.facts import MAX_LAYERS, facts_from_header
from modelfit.gguf_header import ByteSource, GGUFError, header_from
from modelfit.gguf_reader import read_gguf
from modelfit.reconciler import OperatorState, reconcile
from modelfit.sources import Sources, load_facts
from test_handlers import CPU_LARGE, LOG, FakeKube, md

T = GGUFValueType
F32 = int(GGMLQuantizationType.F32)
MEMORY_BUDGET = 64 << 20  # tracemalloc peak of one hostile header's parse (the operator's limit is 384Mi)

# ---- building headers byte by byte ---------------------------------------------------------------------

_FMT = {
    T.UINT8: "B",
    T.INT8: "b",
    T.UINT16: "H",
    T.INT16: "h",
    T.UINT32: "I",
    T.INT32: "i",
    T.FLOAT32: "f",
    T.BOOL: "?",
    T.UINT64: "Q",
    T.INT64: "q",
    T.FLOAT64: "d",
}


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def value(vtype: T, v: Any) -> bytes:
    """A value's bytes: a scalar, a string, or (item type, items) for an array."""
    if vtype == T.STRING:
        return gstr(v)
    if vtype == T.ARRAY:
        item, items = v
        if isinstance(items, bytes) and item == T.UINT8:  # a long array, built fast
            return struct.pack("<IQ", item, len(items)) + items
        return struct.pack("<IQ", item, len(items)) + b"".join(value(item, x) for x in items)
    return struct.pack("<" + _FMT[vtype], v)


def kv(key: str, vtype: T, v: Any) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value(vtype, v)


def tensor(name: str | bytes, shape: tuple[int, ...], ggml_type: int = F32, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)


def gguf(
    kvs: list[bytes],
    tensors: list[bytes],
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    data: int = 0,
    version: int = 3,
) -> bytes:
    """A file: header, padding to 32 and ``data`` zero bytes of tensor data."""
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * ((-len(head)) % 32 + data)


def llama_kvs(**override: tuple[T, Any] | None) -> list[bytes]:
    """A small llama's metadata; ``override`` replaces (or, with None, drops) a ``llama.`` key."""
    keys: dict[str, tuple[T, Any] | None] = {
        "block_count": (T.UINT32, 2),
        "context_length": (T.UINT32, 2048),
        "embedding_length": (T.UINT32, 32),
        "feed_forward_length": (T.UINT32, 64),
        "attention.head_count": (T.UINT32, 4),
        "attention.head_count_kv": (T.ARRAY, (T.UINT32, [2, 2])),
    }
    keys.update(override)
    out = [kv("general.architecture", T.STRING, "llama")]
    out += [kv(f"llama.{k}", *v) for k, v in keys.items() if v is not None]
    return [*out, kv("tokenizer.ggml.tokens", T.ARRAY, (T.STRING, [f"t{i}" for i in range(16)]))]


def llama_tensors() -> tuple[list[bytes], int]:
    """token_embd (32 x 16) and one 32 x 32 tensor per block, all F32, one after another; their bytes."""
    infos = [tensor("token_embd.weight", (32, 16))]
    infos += [tensor(f"blk.{i}.attn_q.weight", (32, 32), offset=2048 + 4096 * i) for i in range(2)]
    return infos, 2048 + 2 * 4096


def llama(extra: list[bytes] | None = None, **override: tuple[T, Any] | None) -> bytes:
    infos, data = llama_tensors()
    return gguf([*llama_kvs(**override), *(extra or [])], infos, data=data)


def _nested(depth: int) -> bytes:
    inner = struct.pack("<IQ", T.UINT8, 0)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", T.ARRAY, 1) + inner
    return gstr("general.nested") + struct.pack("<I", T.ARRAY) + inner


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (file, what the GGUFError says)."""
    infos, data = llama_tensors()
    embd = [tensor("token_embd.weight", (32, 16))]
    big = 1 << 62
    return {
        "block-count-2m": (
            gguf(
                [
                    kv("general.architecture", T.STRING, "llama"),
                    kv("llama.block_count", T.UINT32, 2_000_000),
                    kv("llama.embedding_length", T.UINT32, 32),
                    kv("llama.attention.head_count", T.UINT32, 4),
                ],
                embd,
                data=2048,
            ),
            "block_count = 2000000: more than 4096 layers",
        ),
        "block-count-past-tensors": (llama(block_count=(T.UINT32, 4000)), "tensors stop at block 1"),
        "tensor-past-block-count": (llama(block_count=(T.UINT32, 1)), r"blk\.1\.\* is past"),
        "alignment-0": (llama([kv("general.alignment", T.UINT32, 0)]), "general.alignment"),
        "alignment-3": (llama([kv("general.alignment", T.UINT32, 3)]), "not a power of two"),
        "alignment-list": (llama([kv("general.alignment", T.ARRAY, (T.UINT32, [32]))]), "general.alignment"),
        "list-for-block-count": (llama(block_count=(T.ARRAY, (T.UINT32, [1, 2]))), "block_count is of type list"),
        "string-for-embedding": (llama(embedding_length=(T.STRING, "32")), "embedding_length is of type str"),
        "float-for-context": (llama(context_length=(T.FLOAT32, 1.5)), "context_length is of type float"),
        "bool-for-heads": (llama(**{"attention.head_count": (T.BOOL, True)}), "head_count is of type bool"),
        "negative-ffn": (llama(feed_forward_length=(T.INT32, -1)), "feed_forward_length = -1 is out of range"),
        "list-in-per-layer": (
            llama(**{"attention.head_count_kv": (T.ARRAY, (T.STRING, ["2", "2"]))}),
            "head_count_kv item is of type str",
        ),
        "long-per-layer": (
            llama(**{"attention.head_count_kv": (T.ARRAY, (T.UINT8, [2] * (MAX_LAYERS + 1)))}),
            "too long for per-layer",
        ),
        "tokens-a-number": (llama([kv("tokenizer.ggml.merges", T.UINT32, 5)]), "merges is of type int, not an array"),
        "architecture-a-list": (
            gguf([kv("general.architecture", T.ARRAY, (T.UINT8, [1]))], embd, data=2048),
            "general.architecture is of type list",
        ),
        "nested-arrays": (llama([_nested(2)]), "nests arrays"),
        "nested-10000": (llama([_nested(10_000)]), "nests arrays"),
        "array-count-huge": (
            gguf([gstr("k") + struct.pack("<IIQ", T.ARRAY, T.UINT8, big)], embd, data=2048),
            "array of 4611686018427387904 items",
        ),
        "array-count-truncated": (
            gguf([gstr("k") + struct.pack("<IIQ", T.ARRAY, T.UINT64, 1 << 22)], embd),
            "truncated",
        ),
        "array-items-in-all": (
            gguf(
                [
                    kv("k0", T.ARRAY, (T.UINT8, b"\0" * (1 << 22))),
                    kv("k1", T.ARRAY, (T.UINT8, b"\0" * (1 << 22))),
                    gstr("k2") + struct.pack("<IIQ", T.ARRAY, T.UINT8, 1 << 22),
                ],
                embd,
            ),
            "arrays of more than",
        ),
        "strings-walked": (
            gguf([kv("k", T.ARRAY, (T.STRING, [b""] * 100_000)), kv("general.alignment", T.UINT32, 0)], embd),
            "general.alignment",
        ),
        "string-length-huge": (gguf([gstr("k") + struct.pack("<IQ", T.STRING, big)], embd), "string of key 'k'"),
        "string-over-1mib": (gguf([kv("k", T.STRING, b"x" * ((1 << 20) + 1))], embd), "string of key 'k'"),
        "kept-text": (gguf([kv(f"k{i}", T.STRING, b"x" * (1 << 20)) for i in range(5)], embd), "MiB of keys"),
        "key-length-huge": (gguf([struct.pack("<Q", big)], embd), "key of"),
        "keys-count-huge": (gguf(llama_kvs(), infos, n_kv=big, data=data), "keys"),
        "tensors-count-huge": (gguf(llama_kvs(), infos, n_tensors=big, data=data), "tensors"),
        "duplicate-key": (llama([kv("llama.block_count", T.UINT32, 2)]), "duplicate key"),
        "unknown-value-type": (gguf([gstr("k") + struct.pack("<I", 99)], embd), "unknown value type 99"),
        "tensor-dims-5": (gguf(llama_kvs(), [tensor("t", (1, 1, 1, 1, 1))]), "5 dimensions"),
        "tensor-dims-overflow": (gguf(llama_kvs(), [tensor("t", (1 << 32, 1 << 32))]), "int64"),
        "tensor-dim-2p63": (gguf(llama_kvs(), [tensor("t", (1 << 63,))]), "int64"),
        "tensor-name-long": (gguf(llama_kvs(), [tensor("t" * 100, (32,))]), "tensor name of 100 bytes"),
        "tensor-type-unknown": (gguf(llama_kvs(), [tensor("t", (32,), ggml_type=999)]), "unknown tensor type"),
        "tensor-offset-far": (gguf(llama_kvs(), [tensor("t", (32,), offset=big)]), "expected 0"),
        "tensor-duplicate": (gguf(llama_kvs(), [tensor("t", (8,)), tensor("t", (8,), offset=32)]), "duplicate"),
        "tensor-data-missing": (gguf(llama_kvs(), infos), "truncated"),
        "version-1": (gguf(llama_kvs(), infos, data=data, version=1), "unsupported GGUF version 1"),
        "no-tensors": (gguf(llama_kvs(), []), "no tensors"),
    }


CORPUS = corpus()


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
    out, ticks = _ticking(lambda: load_facts(spec, Sources()))
    assert getattr(out, "source", None) == f"header: {url}/m.gguf"
    assert ticks >= 10  # the loop went on during the second of parsing


@pytest.mark.timeout(20)
def test_a_dripping_model_url_fails_at_the_deadline_without_holding_the_loop(drip: str, monkeypatch) -> None:
    monkeypatch.setattr(sources, "READ_DEADLINE", 1.5)
    spec = ModelDeploymentSpec.model_validate({"model": {"url": drip}})
    out, ticks = _ticking(lambda: load_facts(spec, Sources()))
    assert isinstance(out, GGUFError) and "deadline" in str(out)
    assert ticks >= 10


@pytest.mark.timeout(60)
def test_every_hostile_header_is_a_planned_false_condition(files: tuple[str, dict[str, bytes]]) -> None:
    url, served = files
    served.update({f"{name}.gguf": data for name, (data, _) in CORPUS.items()})
    k, state = FakeKube([CPU_LARGE]), OperatorState()
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
    patch = asyncio.run(reconcile(md({"model": {"url": f"{url}/m.gguf"}}), LOG, FakeKube([CPU_LARGE]), OperatorState()))
    planned = {c["type"]: c for c in patch["conditions"]}["Planned"]
    assert planned["reason"] == "ModelUnreadable" and "RecursionError" in planned["message"]


def test_corpus_files_stay_small() -> None:
    assert max(len(data) for data, _ in CORPUS.values()) < 16 << 20  # e2e serves them all
