"""A GGUF file's header and tensor infos, parsed from a byte source that grows its reads on demand. Pure.

GGUF's header is a simple length-prefixed format; every constant (value types, block sizes) comes from the
`gguf` package. Where the bytes come from (a local file, HTTP Range requests) is ``gguf_reader``'s: this
module does no I/O, so the pure planning layers (``facts`` and above) can use its types.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_FIRST_CHUNK = 1 << 20  # 1 MiB: most headers fit; a 248k-token vocabulary needs ~11 MB
_MAX_HEADER = 1 << 30  # refuse to read more than 1 GiB of "header"
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ValueError):
    """The input is not a readable GGUF file; the message names the problem."""


class ByteSource(Protocol):
    """Random-access bytes, read in ranges."""

    name: str

    def read(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (fewer only at end of data)."""
        ...

    def total_size(self) -> int | None:
        """Whole size in bytes, when known."""
        ...


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; ``nbytes`` is its exact size in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"TYPE_{self.ggml_type}"

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    """Metadata and tensor infos of a (possibly split) GGUF model."""

    source: str
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    header_bytes: int
    file_bytes: int
    shards: int = 1
    data_offsets: list[int] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Exact byte size of a tensor: (elements / block size) * block bytes."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError as exc:
        raise GGUFError(f"unknown tensor type {ggml_type}") from exc
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise GGUFError(f"tensor row of {shape[0]} elements is not a multiple of {qtype.name}'s block {block}")
    return n // block * block_bytes


class _Cursor:
    """Sequential reads over a byte source, fetching growing chunks as needed."""

    def __init__(self, src: ByteSource, first_chunk: int = _FIRST_CHUNK) -> None:
        self.src = src
        self.buf = b""
        self.pos = 0
        self.chunk = first_chunk
        self.eof = False

    def _ensure(self, n: int) -> None:
        while len(self.buf) < self.pos + n:
            if self.eof:
                raise GGUFError(f"{self.src.name}: truncated GGUF header (ended at byte {len(self.buf)})")
            if len(self.buf) >= _MAX_HEADER:
                raise GGUFError(f"{self.src.name}: GGUF header larger than {_MAX_HEADER} bytes; corrupt?")
            want = max(self.chunk, self.pos + n - len(self.buf))
            data = self.src.read(len(self.buf), want)
            if len(data) < want:
                self.eof = True
            self.buf += data
            self.chunk = min(self.chunk * 2, 64 << 20)

    def take(self, n: int) -> bytes:
        self._ensure(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]


_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

# Arrays this long are tokenizer tables; we keep their length, not their items.
_KEEP_ARRAY_ITEMS = 4096


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array (tokens, merges, scores) kept as its length only."""

    item_type: str
    length: int

    def __len__(self) -> int:
        return self.length


def _read_string(cur: _Cursor) -> str:
    n = cur.unpack("Q")
    if n > _MAX_HEADER:
        raise GGUFError(f"{cur.src.name}: string length {n} at byte {cur.pos - 8} is impossible; corrupt header")
    return cur.take(n).decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, vtype: int) -> Any:
    try:
        t = GGUFValueType(vtype)
    except ValueError as exc:
        raise GGUFError(f"{cur.src.name}: unknown metadata value type {vtype} at byte {cur.pos - 4}") from exc
    if t == GGUFValueType.STRING:
        return _read_string(cur)
    if t == GGUFValueType.ARRAY:
        item_type = cur.unpack("I")
        count = cur.unpack("Q")
        if count > _MAX_HEADER:
            raise GGUFError(f"{cur.src.name}: array of {count} items is impossible; corrupt header")
        try:
            it = GGUFValueType(item_type)
        except ValueError as exc:
            raise GGUFError(f"{cur.src.name}: unknown array item type {item_type}") from exc
        if it in _SCALAR_FMT:
            raw = cur.take(struct.calcsize(_SCALAR_FMT[it]) * count)
            if count > _KEEP_ARRAY_ITEMS:
                return ArraySummary(it.name, count)
            return list(struct.unpack(f"<{count}{_SCALAR_FMT[it]}", raw))
        items = [_read_value(cur, item_type) for _ in range(count)]
        if count > _KEEP_ARRAY_ITEMS:
            return ArraySummary(it.name, count)
        return items
    return cur.unpack(_SCALAR_FMT[t])


def _read_one(src: ByteSource) -> tuple[int, dict[str, Any], list[tuple[str, int, tuple[int, ...], int]], int]:
    cur = _Cursor(src)
    try:
        magic = cur.take(4)
    except GGUFError as exc:
        if "truncated" not in str(exc):
            raise
        raise GGUFError(f"{src.name}: empty file, not GGUF") from exc
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{src.name}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = cur.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"{src.name}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.unpack("Q")
    n_kv = cur.unpack("Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError(f"{src.name}: implausible counts ({n_tensors} tensors, {n_kv} keys); corrupt header")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_string(cur)
        vtype = cur.unpack("I")
        meta[key] = _read_value(cur, vtype)
    raw_tensors = []
    for _ in range(n_tensors):
        name = _read_string(cur)
        n_dims = cur.unpack("I")
        if n_dims > 8:
            raise GGUFError(f"{src.name}: tensor {name!r} has {n_dims} dimensions; corrupt header")
        shape = tuple(int(cur.unpack("Q")) for _ in range(n_dims))
        ggml_type = cur.unpack("I")
        offset = cur.unpack("Q")
        raw_tensors.append((name, int(ggml_type), shape, int(offset)))
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return int(version), meta, raw_tensors, data_offset


def split_paths(location: str) -> list[str]:
    """All shard locations of a split model (``-00001-of-0000N.gguf``), or just ``location``."""
    m = _SPLIT_RE.match(location)
    if not m:
        return [location]
    count = int(m.group("count"))
    return [f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def header_from(location: str, sources: Iterable[ByteSource]) -> GGUFHeader:
    """The header of a model from its shards' byte sources, merged (one source for an unsplit file).

    Tensors' sizes are checked against each shard's size when it is known, so a truncated file is reported.
    """
    meta: dict[str, Any] = {}
    tensors: list[TensorInfo] = []
    header_bytes = 0
    file_bytes = 0
    version = 3
    offsets: list[int] = []
    shards = 0
    for src in sources:
        shards += 1
        version, shard_meta, raw, data_offset = _read_one(src)
        if not meta:
            meta = shard_meta
        header_bytes += data_offset
        offsets.append(data_offset)
        shard_end = data_offset
        for name, ggml_type, shape, offset in raw:
            nbytes = tensor_nbytes(ggml_type, shape)
            tensors.append(TensorInfo(name, ggml_type, shape, offset, nbytes))
            shard_end = max(shard_end, data_offset + offset + nbytes)
        size = src.total_size()
        if size is not None and size < shard_end:
            raise GGUFError(
                f"{src.name}: truncated: tensor data ends at byte {shard_end} but the file has {size} bytes"
            )
        file_bytes += size if size is not None else shard_end
    if not tensors:
        raise GGUFError(f"{location}: GGUF file holds no tensors")
    return GGUFHeader(
        source=str(location),
        version=version,
        metadata=meta,
        tensors=tensors,
        header_bytes=header_bytes,
        file_bytes=file_bytes,
        shards=shards,
        data_offsets=offsets,
    )
