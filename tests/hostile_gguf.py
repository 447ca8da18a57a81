"""Crafted GGUF files for the hostile-header tests: a small valid llama and a corpus of hostile variants, built
byte by byte with struct. Used by tests/test_hostile_headers.py and, loaded by path, by e2e/test_bad_inputs.py,
which serves the corpus to the operator on a real control plane.
"""

from __future__ import annotations

import struct
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType

from modelfit.facts import MAX_LAYERS

T = GGUFValueType
F32 = int(GGMLQuantizationType.F32)

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
