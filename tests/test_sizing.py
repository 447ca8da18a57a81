"""Planner edge cases: nothing fits, exact fit, partial offload, SWA, MoE, recurrent."""

from __future__ import annotations

from modelfit.catalog import catalog_facts
from modelfit.memory import GiB, MiB
from modelfit.nodes import NodeFacts, profile
from modelfit.sizing import Policy, plan

QWEN = catalog_facts("qwen3.5-0.8b", "Q4_0")


def cpu(memory: int | None, cpus: int = 2000) -> NodeFacts:
    return NodeFacts(name="n", cpu_millis=cpus, memory_bytes=memory)


def test_seed_case_predicts_gigabytes_not_half_a_gigabyte() -> None:
    r = plan(QWEN, profile("cpu"), Policy(context=262144))
    assert r.fits and r.plan.context == 262144 and r.plan.backend == "cpu"
    # KV 3 GiB + weights 0.47 + compute + runtime: ~3.9 GiB once the context is full
    assert 3.5 * GiB < r.memory.total_bytes < r.memory.full_context_bytes < 4.5 * GiB
    assert r.plan.gpu_layers == 0 and r.plan.total_layers == 25
    assert "--cache-ram" in r.plan.args and r.plan.args[r.plan.args.index("--cache-ram") + 1] == "0"
    assert r.plan.args[r.plan.args.index("--fit") + 1] == "off"


def test_threads_follow_the_cpu_limit() -> None:
    r = plan(QWEN, cpu(8 * GiB, cpus=3500), Policy(context=4096))
    assert r.plan.threads == 3
    assert r.plan.args[r.plan.args.index("-t") + 1] == "3"


def test_context_shrinks_to_fit_then_kv_quantizes() -> None:
    r = plan(QWEN, cpu(2 * GiB), Policy(context="max"))
    assert r.fits
    assert r.memory_request_bytes <= 2 * GiB
    # f16 cannot hold 262k in 2 GiB; the plan quantizes KV or shortens the context
    assert r.plan.kv_cache_type != "f16" or r.plan.context < 262144
    assert r.plan.context >= 4096


def test_f16_kept_when_it_fits() -> None:
    r = plan(QWEN, cpu(16 * GiB), Policy(context=262144))
    assert r.plan.kv_cache_type == "f16" and r.plan.context == 262144


def test_quantized_kv_when_f16_does_not_fit_the_requested_context() -> None:
    f16 = plan(QWEN, cpu(None), Policy(context=262144, kv_cache_type="f16"))
    q8 = plan(QWEN, cpu(None), Policy(context=262144, kv_cache_type="q8_0"))
    budget = (f16.memory_request_bytes + q8.memory_request_bytes) // 2
    r = plan(QWEN, cpu(budget), Policy(context=262144))
    assert r.fits and r.plan.kv_cache_type == "q8_0" and r.plan.context == 262144
    assert r.plan.flash_attention


def test_nothing_fits_reports_shortfall() -> None:
    r = plan(QWEN, cpu(256 * MiB), Policy(context=32768))
    assert not r.fits
    assert r.shortfall_bytes > 0
    assert "does not fit" in r.reasons[0]


def test_exact_fit_boundary() -> None:
    need = plan(QWEN, cpu(None), Policy(context=8192, kv_cache_type="f16")).memory_request_bytes
    exact = plan(QWEN, cpu(need), Policy(context=8192, kv_cache_type="f16", min_context=8192))
    assert exact.fits and exact.plan.context == 8192
    short = plan(QWEN, cpu(need - 1), Policy(context=8192, kv_cache_type="f16", min_context=8192))
    assert not short.fits and short.shortfall_bytes >= 1


def test_load_mode_auto_avoids_the_repack_double_count() -> None:
    r = plan(QWEN, cpu(8 * GiB), Policy(context=4096))
    assert r.memory.repack_bytes > 0 and r.plan.load_mode == "none"
    q8 = plan(catalog_facts("qwen3.5-0.8b", "Q8_0"), cpu(8 * GiB), Policy(context=4096))
    assert q8.plan.load_mode == "mmap"


def test_full_gpu_offload() -> None:
    f = catalog_facts("llama-3.1-8b", "Q4_K_M")
    r = plan(f, profile("rtx-4090-24gb"), Policy(context=32768))
    assert r.plan.backend == "cuda" and r.plan.gpu_layers == 33 == r.plan.total_layers
    assert r.resources.limits["nvidia.com/gpu"] == "1"
    assert "-ngl" in r.plan.args and r.plan.args[r.plan.args.index("-ngl") + 1] == "33"


def test_partial_gpu_offload() -> None:
    f = catalog_facts("qwen3-30b-a3b", "Q4_K_M")  # ~18 GB of weights on a 12 GB card
    r = plan(f, profile("rtx-3060-12gb"), Policy(context=8192))
    assert r.fits
    assert 0 < r.plan.gpu_layers < r.plan.total_layers
    assert max(r.memory.vram_bytes) + 256 * MiB <= 12288 * MiB
    assert r.memory.weights_bytes > 6 * GiB  # the rest stays in host RAM


def test_sliding_window_model_fits_long_context_cheaply() -> None:
    g = catalog_facts("gemma-3-1b", "Q4_0")
    r = plan(g, cpu(None), Policy(context="max"))
    assert r.plan.context == 32768
    assert r.plan.ctx_checkpoints == 1  # SWA cache cannot roll back


def test_recurrent_state_scales_with_slots() -> None:
    one = plan(QWEN, cpu(None), Policy(context=4096, parallel=1))
    four = plan(QWEN, cpu(None), Policy(context=4096, parallel=4))
    assert four.memory.recurrent_bytes == 4 * one.memory.recurrent_bytes
    assert four.memory.kv_cache_bytes == one.memory.kv_cache_bytes  # unified KV: total context is shared


def test_context_above_training_is_capped_with_warning() -> None:
    r = plan(catalog_facts("qwen3-0.6b", "Q8_0"), cpu(None), Policy(context=100000))
    assert r.plan.context == 40960
    assert any("exceeds" in w for w in r.warnings)
