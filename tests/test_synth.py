"""Tests for modelfit_dev.synth: synthetic GGUF files that llama-server really loads.

The llama-server tests build the pinned binaries via scripts/build-llama-server.sh
when they are not found (slow the first time, cached after); set
MODELFIT_SKIP_LLAMA=1 to skip them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from modelfit_dev import synth  # noqa: E402


def _field(r: gguf.GGUFReader, key: str) -> object:
    f = r.get_field(key)
    assert f is not None, key
    return f.contents()


@pytest.mark.parametrize("name", synth.TINY_SPECS)
def test_tiny_roundtrip(name: str, tmp_path: Path) -> None:
    spec = synth.SPECS[name]
    path = synth.write_gguf(spec, tmp_path / f"{name}.gguf")
    assert path.stat().st_size < 10 * 2**20
    r = gguf.GGUFReader(path)
    arch = spec.arch
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.block_count") == spec.n_layer
    assert _field(r, f"{arch}.embedding_length") == spec.n_embd
    if arch == "lfm2":  # per-layer KV heads: 0 on the short-convolution blocks
        kv = [0 if spec.is_recurrent(il) else spec.n_head_kv for il in range(spec.n_layer)]
        assert _field(r, "lfm2.attention.head_count_kv") == kv and 0 < sum(x > 0 for x in kv) < spec.n_layer
        assert _field(r, "lfm2.shortconv.l_cache") == spec.shortconv_l_cache
    else:
        assert _field(r, f"{arch}.attention.head_count_kv") == spec.n_head_kv
    assert _field(r, f"{arch}.context_length") == spec.n_ctx_train
    assert _field(r, "tokenizer.ggml.model") == spec.tokenizer
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == spec.n_vocab
    assert len(set(tokens)) == spec.n_vocab
    plan = {t.name: t for t in synth.tensor_plan(spec)}
    assert {t.name for t in r.tensors} == set(plan)
    for t in r.tensors:
        assert tuple(int(x) for x in t.shape) == plan[t.name].ne, t.name
    if arch == "qwen35":
        assert _field(r, "qwen35.full_attention_interval") == 4
        assert _field(r, "qwen35.rope.dimension_sections") == [11, 11, 10, 0]
    if arch == "gemma3":
        assert _field(r, "gemma3.attention.sliding_window") == spec.sliding_window
    if arch == "qwen3moe":
        assert _field(r, "qwen3moe.expert_count") == spec.n_expert
        assert "output.weight" in plan
    if arch == "qwen3":  # dense, tied, attention wider than the residual stream
        assert "output.weight" not in plan and "blk.0.attn_q_norm.weight" in plan
        assert plan["blk.0.attn_q.weight"].ne == (spec.n_embd, spec.n_head * spec.head_dim)
        assert spec.n_head * spec.head_dim > spec.n_embd


def test_real_shapes_param_counts() -> None:
    # llama.cpp print_info "model params" of the published models.
    assert synth.n_params(synth.SPECS["qwen35-0.8b"]) == 752_393_024
    assert synth.n_params(synth.SPECS["gemma3-1b"]) == 999_885_952
    assert synth.n_params(synth.SPECS["llama-3.2-1b"]) == 1_235_814_432
    assert synth.n_params(synth.SPECS["qwen3-0.6b"]) == 596_049_920  # llama.cpp: "596.05 M"
    assert synth.n_params(synth.SPECS["lfm2-350m"]) == 354_483_968  # LFM2-350M: 354 M


def test_ensure_model_caches(tmp_path: Path) -> None:
    p1 = synth.ensure_model("llama-tiny", "F16", cache_dir=tmp_path)
    assert p1 == tmp_path / "models" / "llama-tiny-F16.gguf"
    mtime = p1.stat().st_mtime_ns
    assert synth.ensure_model("llama-tiny", "F16", cache_dir=tmp_path) == p1
    assert p1.stat().st_mtime_ns == mtime


def test_llama_bin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "llama-fake"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("MODELFIT_LLAMA_BIN", str(tmp_path))
    assert synth.llama_bin("llama-fake") == exe
    with pytest.raises(FileNotFoundError):
        synth.llama_bin("llama-does-not-exist")


@pytest.fixture(scope="session")
def llama_bins() -> dict[str, Path]:
    if os.environ.get("MODELFIT_SKIP_LLAMA") == "1":
        pytest.skip("MODELFIT_SKIP_LLAMA=1")
    try:
        synth.llama_bin("llama-server")
        synth.llama_bin("llama-quantize")
    except FileNotFoundError:
        subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh")], check=True, stdout=subprocess.DEVNULL)
    return {n: synth.llama_bin(n) for n in ("llama-server", "llama-quantize")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: dict[str, object] | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


@pytest.fixture
def server(llama_bins: dict[str, Path], tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(model: Path) -> str:
        port = _free_port()
        log = open(tmp_path / "server.log", "wb")
        p = subprocess.Popen(
            [
                str(llama_bins["llama-server"]),
                "-m",
                str(model),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "-c",
                "512",
                "-np",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if p.poll() is not None:
                pytest.fail(f"llama-server exited {p.returncode}:\n" + (tmp_path / "server.log").read_text()[-4000:])
            try:
                if _http(base + "/health", timeout=2)[0] == 200:
                    return base
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail("llama-server not healthy:\n" + (tmp_path / "server.log").read_text()[-4000:])

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", synth.TINY_SPECS)
def test_tiny_q4_0_serves(name: str, server: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = synth.ensure_model(name, "Q4_0", cache_dir=tmp_path_factory.mktemp("cache"))
    r = gguf.GGUFReader(model)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert (
        types["blk.0.ffn_norm.weight" if "blk.0.ffn_norm.weight" in types else "blk.0.attn_norm.weight"]
        == gguf.GGMLQuantizationType.F32
    )
    assert gguf.GGMLQuantizationType.Q4_0 in types.values()
    base = server(model)  # type: ignore[operator]
    status, text = _http(base + "/completion", {"prompt": "hello world", "n_predict": 4})
    assert status == 200, text
    body = json.loads(text)
    assert isinstance(body["content"], str)
    assert 1 <= body["tokens_predicted"] <= 4


def test_lfm2_header_gives_the_hybrid_layers(tmp_path: Path) -> None:
    """facts_from_header knows lfm2: per-layer KV heads (0: a short-convolution block) and its conv state."""
    from modelfit.facts import facts_from_header
    from modelfit.gguf_reader import read_gguf

    spec = synth.SPECS["lfm2-tiny"]
    facts = facts_from_header(read_gguf(synth.write_gguf(spec, tmp_path / "lfm2.gguf")))
    assert not facts.warnings
    assert [lf.recurrent for lf in facts.layers] == [spec.is_recurrent(il) for il in range(spec.n_layer)]
    assert [lf.n_embd_k_gqa for lf in facts.layers if lf.attention] == [spec.n_head_kv * spec.head_dim] * 2
    assert facts.ssm.n_embd_r == (spec.shortconv_l_cache - 1) * spec.n_embd and facts.ssm.n_embd_s == 0
