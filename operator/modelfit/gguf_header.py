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
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Bounds. A header is read from a URL anyone can write, so every number it declares is checked before it
# is used: a hostile file costs at most MAX_HEADER_BYTES of reads and a few MiB of memory, and fails as a
# GGUFError naming what was wrong. Where llama.cpp's own reader (ggml/src/gguf.cpp) is stricter, its rule is
# ours: a file llama-server refuses is not worth planning.
MAX_HEADER_BYTES = 64 << 20  # the largest real headers (262k-token vocabularies with merges) are ~11 MB: 6x room
_FIRST_CHUNK = 1 << 20  # 1 MiB: most headers fit in one read
MAX_CHUNK = 2 << 20  # the largest read; parsed bytes are dropped, so a read holds about two chunks, not the header
MAX_STRING_BYTES = 1 << 20  # one string (a key, a token, a chat template: real ones are at most tens of KB)
MAX_KEPT_TEXT = 4 << 20  # keys and string values kept in memory together (long token arrays are not kept)
MAX_KEYS = 4096  # metadata keys; real headers have 30 to 100
MAX_ARRAY_ITEMS = 1 << 22  # one array's items: 16x a 262k-token vocabulary
MAX_TOTAL_ITEMS = 1 << 23  # all arrays' items together (tokens, scores, types and merges are ~1M for 262k tokens)
MAX_KEPT_ITEMS = 1 << 16  # array items kept as Python objects (per-layer arrays); longer or later arrays: a length
MAX_ARRAY_DEPTH = 1  # arrays of arrays: llama.cpp's reader refuses them ("invalid GGUF type")
MAX_TENSORS = 16384  # tensor infos, all shards together; the largest models have ~2,000 (unfused experts ~13,000)
MAX_TENSOR_NAME = 63  # bytes: GGML_MAX_NAME (64) with its terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = (1 << 63) - 1  # a tensor's element count must fit an int64 (gguf.cpp)
MAX_SHARDS = 256  # split files: 256 shards of Hugging Face's 50 GB file limit is 12.8 TB
MAX_ALIGNMENT = 1 << 31  # general.alignment is a uint32 power of two (gguf.cpp)


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
    """Sequential reads over a byte source, fetching growing chunks as needed.

    Only the bytes not parsed yet are kept (at most about two chunks), and the counters hold what the header
    has cost so far against the bounds above.
    """

    def __init__(self, src: ByteSource, first_chunk: int = _FIRST_CHUNK) -> None:
        self.src = src
        self.buf = bytearray()  # the source's bytes from ``base`` on
        self.base = 0
        self.pos = 0  # where the next parse starts, in the source
        self.chunk = first_chunk
        self.eof = False
        self.items = 0  # array items declared
        self.kept_items = 0  # array items kept as objects
        self.kept_text = 0  # string bytes kept

    def _fill(self, n: int) -> None:
        """Make ``buf`` hold bytes ``pos`` to ``pos + n``."""
        if self.pos + n <= self.base + len(self.buf):
            return
        del self.buf[: self.pos - self.base]  # parsed already: never looked at again
        self.base = self.pos
        while len(self.buf) < n:
            if self.eof:
                raise GGUFError(f"{self.src.name}: truncated GGUF header (ended at byte {self.base + len(self.buf)})")
            end = self.base + len(self.buf)
            if end >= MAX_HEADER_BYTES:
                raise GGUFError(f"{self.src.name}: GGUF header larger than {MAX_HEADER_BYTES >> 20} MiB; corrupt?")
            want = min(max(self.chunk, n - len(self.buf)), MAX_HEADER_BYTES - end)
            data = self.src.read(end, want)
            if len(data) < want:
                self.eof = True
            self.buf += data[:want]
            self.chunk = min(self.chunk * 2, MAX_CHUNK)

    def take(self, n: int) -> bytes:
        self._fill(n)
        at = self.pos - self.base
        self.pos += n
        return bytes(self.buf[at : at + n])

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes that must exist, holding at most a chunk of them."""
        while n > 0:
            step = min(n, MAX_CHUNK)
            self._fill(step)
            self.pos += step
            n -= step

    def skip_strings(self, count: int, what: str) -> None:
        """Move past ``count`` length-prefixed strings (a token table: the hot loop of a header)."""
        while count:
            self._fill(8)
            buf, base, pos = self.buf, self.base, self.pos
            end = base + len(buf)
            while count and pos + 8 <= end:
                n = _U64.unpack_from(buf, pos - base)[0]
                if n > MAX_STRING_BYTES or pos + 8 + n > end:
                    break
                pos += 8 + n
                count -= 1
            self.pos = pos
            if count and pos + 8 <= end:  # a string past the buffer's end, or too long: the slow path says which
                self.skip(_string_length(self, what))
                count -= 1

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._fill(size)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos - self.base)[0]
        self.pos += size
        return value


_U64 = struct.Struct("<Q")
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


def _string_length(cur: _Cursor, what: str, limit: int = MAX_STRING_BYTES) -> int:
    n = int(cur.unpack("Q"))
    if n > limit:
        raise GGUFError(f"{cur.src.name}: {what} of {n} bytes at byte {cur.pos - 8} (at most {limit}); corrupt header")
    return n


def _read_string(cur: _Cursor, what: str, keep: bool = True) -> str:
    n = _string_length(cur, what)
    if not keep:
        cur.skip(n)
        return ""
    cur.kept_text += n
    if cur.kept_text > MAX_KEPT_TEXT:
        raise GGUFError(f"{cur.src.name}: more than {MAX_KEPT_TEXT >> 20} MiB of keys and strings; corrupt header")
    return cur.take(n).decode("utf-8", errors="replace")


def _value_type(cur: _Cursor, vtype: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(vtype)
    except ValueError as exc:
        raise GGUFError(f"{cur.src.name}: key {key!r} has unknown value type {vtype} at byte {cur.pos - 4}") from exc


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0, keep: bool = True) -> Any:
    """One metadata value (None when not ``keep``: an item of a long array, only walked past)."""
    t = _value_type(cur, vtype, key)
    if t == GGUFValueType.STRING:
        return _read_string(cur, f"string of key {key!r}", keep)
    if t != GGUFValueType.ARRAY:
        fmt = _SCALAR_FMT[t]
        if not keep:
            cur.skip(struct.calcsize(fmt))
            return None
        return cur.unpack(fmt)
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(f"{cur.src.name}: key {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH} (llama.cpp: none)")
    it = _value_type(cur, cur.unpack("I"), key)
    count = int(cur.unpack("Q"))
    if count > MAX_ARRAY_ITEMS:
        raise GGUFError(f"{cur.src.name}: key {key!r} is an array of {count} items (at most {MAX_ARRAY_ITEMS})")
    cur.items += count
    if cur.items > MAX_TOTAL_ITEMS:
        raise GGUFError(f"{cur.src.name}: arrays of more than {MAX_TOTAL_ITEMS} items in all; corrupt header")
    keep = keep and count <= _KEEP_ARRAY_ITEMS and cur.kept_items + count <= MAX_KEPT_ITEMS
    if keep:
        cur.kept_items += count
    if it in _SCALAR_FMT:
        size = struct.calcsize(_SCALAR_FMT[it]) * count
        if keep:
            return list(struct.unpack(f"<{count}{_SCALAR_FMT[it]}", cur.take(size)))
        cur.skip(size)
    elif it == GGUFValueType.STRING:
        if keep:
            return [_read_string(cur, f"string in key {key!r}") for _ in range(count)]
        cur.skip_strings(count, f"string in key {key!r}")
    else:
        items = [_read_value(cur, it, key, depth + 1, keep) for _ in range(count)]
        if keep:
            return items
    return ArraySummary(it.name, count)


def _alignment(src: ByteSource, meta: dict[str, Any]) -> int:
    value = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_ALIGNMENT:
        raise GGUFError(f"{src.name}: general.alignment is {value!r}, not a positive uint32 power of two")
    if value & (value - 1):
        raise GGUFError(f"{src.name}: general.alignment {value} is not a power of two")
    return value


RawTensor = tuple[str, int, tuple[int, ...], int]


def _read_tensor(cur: _Cursor) -> RawTensor:
    name = cur.take(_string_length(cur, "tensor name", MAX_TENSOR_NAME)).decode("utf-8", errors="replace")
    n_dims = cur.unpack("I")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"{cur.src.name}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    shape = tuple(int(cur.unpack("Q")) for _ in range(n_dims))
    n = 1
    for d in shape:
        n *= d
    if any(d > MAX_ELEMENTS for d in shape) or n > MAX_ELEMENTS:
        raise GGUFError(f"{cur.src.name}: tensor {name!r} of shape {shape} has more elements than an int64 holds")
    return name, int(cur.unpack("I")), shape, int(cur.unpack("Q"))


def _read_one(src: ByteSource) -> tuple[int, dict[str, Any], list[RawTensor], int, int]:
    """(version, metadata, tensor infos, where the data starts, alignment) of one file."""
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
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise GGUFError(
            f"{src.name}: {n_tensors} tensors and {n_kv} keys (at most {MAX_TENSORS} and {MAX_KEYS}); corrupt header"
        )
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_string(cur, "key")
        if key in meta:
            raise GGUFError(f"{src.name}: duplicate key {key!r}")
        meta[key] = _read_value(cur, cur.unpack("I"), key)
    alignment = _alignment(src, meta)
    raw_tensors = [_read_tensor(cur) for _ in range(n_tensors)]
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return int(version), meta, raw_tensors, data_offset, alignment


def split_paths(location: str) -> list[str]:
    """All shard locations of a split model (``-00001-of-0000N.gguf``), or just ``location``."""
    m = _SPLIT_RE.match(location)
    if not m:
        return [location]
    count = int(m.group("count"))
    return [f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def header_from(location: str, sources: Iterable[ByteSource]) -> GGUFHeader:
    """The header of a model from its shards' byte sources, merged (one source for an unsplit file).

    Tensors must follow one another in each shard's data as llama.cpp requires (each at the previous one's
    end, padded to the alignment), and their sizes are checked against each shard's size when it is known,
    so a truncated file is reported.
    """
    meta: dict[str, Any] = {}
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    header_bytes = 0
    file_bytes = 0
    version = 3
    offsets: list[int] = []
    shards = 0
    for src in sources:
        shards += 1
        if shards > MAX_SHARDS:
            raise GGUFError(f"{location}: more than {MAX_SHARDS} shards")
        version, shard_meta, raw, data_offset, alignment = _read_one(src)
        if not meta:
            meta = shard_meta
        if len(tensors) + len(raw) > MAX_TENSORS:
            raise GGUFError(f"{location}: more than {MAX_TENSORS} tensors in all shards")
        header_bytes += data_offset
        offsets.append(data_offset)
        expected = data_end = 0
        for name, ggml_type, shape, offset in raw:
            if name in names:
                raise GGUFError(f"{src.name}: duplicate tensor {name!r}")
            names.add(name)
            if offset != expected:
                raise GGUFError(f"{src.name}: tensor {name!r} at data offset {offset}, expected {expected}")
            nbytes = tensor_nbytes(ggml_type, shape)
            tensors.append(TensorInfo(name, ggml_type, shape, offset, nbytes))
            data_end = offset + nbytes
            expected = (data_end + alignment - 1) // alignment * alignment
        shard_end = data_offset + data_end
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
