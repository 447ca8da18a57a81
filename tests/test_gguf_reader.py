"""GGUF header reader: local files, HTTP Range reads, split files, bad input."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from modelfit.facts import facts_from_header
from modelfit.gguf_reader import GGUFError, read_gguf, split_paths


def write_llama(path: Path, n_layer: int = 2, n_embd: int = 64, n_vocab: int = 300, extra_meta: bool = True) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    if extra_meta:
        w.add_token_list([f"t{i}" for i in range(n_vocab)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), dtype=np.float16))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.zeros((32, n_embd), dtype=np.float16))
        # a raw Q8_0 tensor: 64 x 64 elements -> 2 blocks of 34 bytes per row
        q8 = np.zeros((n_embd, n_embd // 32 * 34), dtype=np.uint8)
        w.add_tensor(f"blk.{i}.attn_v.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.gguf"
    write_llama(p)
    return p


def test_local_file(model: Path) -> None:
    h = read_gguf(model)
    assert h.architecture == "llama"
    assert h.get("llama.block_count") == 2
    assert len(h.get("tokenizer.ggml.tokens")) == 300
    byname = {t.name: t for t in h.tensors}
    assert byname["token_embd.weight"].shape == (64, 300)
    assert byname["token_embd.weight"].nbytes == 64 * 300 * 2
    assert byname["blk.0.attn_v.weight"].type_name == "Q8_0"
    assert byname["blk.0.attn_v.weight"].nbytes == 64 * 2 * 34
    assert h.file_bytes == model.stat().st_size
    # data ends exactly at the end of the file (after alignment padding)
    assert h.header_bytes + h.tensor_bytes <= h.file_bytes


def test_facts_from_header(model: Path) -> None:
    f = facts_from_header(read_gguf(model))
    assert f.n_layer == 2 and f.n_embd == 64 and f.n_vocab == 300
    assert f.head_dim_k == 16 and f.n_head_kv == 2
    assert f.tied_embeddings
    assert all(lf.attention and not lf.recurrent for lf in f.layers)
    assert f.layers[0].n_embd_k_gqa == 32


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    requests_seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).requests_seen.append(rng or "")
        if rng:
            start_s, end_s = rng.removeprefix("bytes=").split("-")
            start, end = int(start_s), min(int(end_s), len(data) - 1)
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args: object, **kw: object) -> _RangeHandler:
        return _RangeHandler(*args, directory=str(root), **kw)  # type: ignore[arg-type]

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _RangeHandler.requests_seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()


def test_http_range_reads_only_the_header(http_root: tuple[str, Path]) -> None:
    url, root = http_root
    # a file whose weights dwarf the header: 4 MB of tensor data
    write_llama(root / "big.gguf", n_layer=2, n_embd=1024, n_vocab=1000)
    h = read_gguf(f"{url}/big.gguf")
    local = read_gguf(root / "big.gguf")
    assert [t.name for t in h.tensors] == [t.name for t in local.tensors]
    assert h.file_bytes == (root / "big.gguf").stat().st_size
    assert all(r.startswith("bytes=") for r in _RangeHandler.requests_seen)
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in _RangeHandler.requests_seen)
    assert fetched <= 2 * (1 << 20)  # one or two chunks, far less than the 4+ MB file


def test_http_404_is_a_clear_error(http_root: tuple[str, Path]) -> None:
    url, _ = http_root
    with pytest.raises(GGUFError, match="HTTP 404"):
        read_gguf(f"{url}/missing.gguf")


def test_unreachable_url_is_a_clear_error() -> None:
    with pytest.raises(GGUFError, match="cannot fetch"):
        read_gguf("http://127.0.0.1:9/none.gguf")


def test_split_files(tmp_path: Path) -> None:
    a = tmp_path / "m-00001-of-00002.gguf"
    b = tmp_path / "m-00002-of-00002.gguf"
    write_llama(a, n_layer=1)
    w = GGUFWriter(str(b), "llama")
    w.add_tensor("blk.1.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert split_paths(str(a)) == [str(a), str(b)]
    h = read_gguf(a)
    assert h.shards == 2
    assert "blk.1.attn_q.weight" in {t.name for t in h.tensors}
    assert h.file_bytes == a.stat().st_size + b.stat().st_size


def test_truncated_file(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(head)


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="not GGUF"):
        read_gguf(empty)


def test_corrupt_header(model: Path, tmp_path: Path) -> None:
    data = bytearray(model.read_bytes())
    # a huge key-length right after the counts
    data[24:32] = (2**62).to_bytes(8, "little")
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="corrupt"):
        read_gguf(p)
    data = bytearray(model.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unsupported GGUF version 99"):
        read_gguf(p)


def test_missing_file() -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf("/nonexistent/model.gguf")


def test_unknown_architecture_is_planned_with_a_warning(tmp_path: Path) -> None:
    p = tmp_path / "odd.gguf"
    w = GGUFWriter(str(p), "brandnew")
    w.add_uint32("brandnew.block_count", 2)
    w.add_uint32("brandnew.embedding_length", 64)
    w.add_uint32("brandnew.attention.head_count", 4)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.add_tensor("blk.1.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = facts_from_header(read_gguf(p))
    assert f.architecture == "brandnew"
    assert any("not known" in w for w in f.warnings)
    assert f.n_layer == 2 and f.n_vocab == 100
