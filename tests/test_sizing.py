"""Planner edge cases: nothing fits, exact fit, partial offload, SWA, MoE, recurrent."""

from __future__ import annotations

import pytest

from modelfit.catalog import catalog_facts
from modelfit.memory import GiB, MiB, ServerConfig, prompt_state_bytes, seq_state_bytes
from modelfit.nodes import NodeFacts, profile
from modelfit.sizing import PROMPT_CACHE_MODEL_SHARE, PROMPT_CACHE_TYPICAL_TOKENS, Policy, plan

QWEN = catalog_facts("qwen3.5-0.8b", "Q4_0")


def cpu(memory: int | None, cpus: int = 2000) -> NodeFacts:
    return NodeFacts(name="n", cpu_millis=cpus, memory_bytes=memory)


def test_seed_case_predicts_gigabytes_not_half_a_gigabyte() -> None:
    r = plan(QWEN, profile("cpu"), Policy(context=262144))
    assert r.fits and r.plan.context == 262144 and r.plan.backend == "cpu"
    # KV 3 GiB + weights 0.47 + compute + runtime: ~3.9 GiB once the context is full
    cache = r.memory.cache_ram_bytes
    assert 3.5 * GiB < r.memory.total_bytes == r.memory.full_context_bytes - cache < 4.5 * GiB
    assert r.plan.gpu_layers == 0 and r.plan.total_layers == 25
    # the prompt cache is planned (llama-server's own default would be 8192 MiB, uncounted) and counted
    assert cache > 0 and r.plan.args[r.plan.args.index("--cache-ram") + 1] == str(r.plan.cache_ram_mib)
    assert r.plan.args[r.plan.args.index("--fit") + 1] == "off"


def test_threads_are_capped_by_the_free_cpu() -> None:
    r = plan(QWEN, cpu(8 * GiB, cpus=3500), Policy(context=4096))  # the rule asks for 4 (tests/test_threads.py)
    assert r.plan.threads == 3 and r.threads_wanted == 4
    assert r.plan.args[r.plan.args.index("-t") + 1] == "3"
    assert r.resources.requests["cpu"] == "3"


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
    f16 = plan(QWEN, cpu(None), Policy(context=262144, kv_cache_type="f16", cache_ram_mib=0))
    q8 = plan(QWEN, cpu(None), Policy(context=262144, kv_cache_type="q8_0", cache_ram_mib=0))
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
    need = plan(QWEN, cpu(None), Policy(context=8192, kv_cache_type="f16", cache_ram_mib=0)).memory_request_bytes
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


# ---- KV cache type: answer quality is part of the plan -------------------------------------------

LLAMA_3B = catalog_facts("llama-3.2-3b", "Q4_K_M")


def test_small_node_gets_q8_0_kv_and_a_shorter_context_not_q4_0() -> None:
    """The issue's case: 3B Q4_K_M on a 4Gi node used to take q4_0 KV at context 56320."""
    r = plan(LLAMA_3B, profile("cpu-small"), Policy())
    assert r.fits and r.plan.kv_cache_type == "q8_0" and r.plan.flash_attention
    assert 4096 <= r.plan.context < 56320
    assert r.plan.args[r.plan.args.index("-ctk") + 1] == "q8_0"
    kv = next(x for x in r.reasons if x.startswith("KV cache"))
    assert "f16 would need" in kv and "q4_0 is not used" in kv
    ctx = next(x for x in r.reasons if x.startswith("context"))
    assert "q4_0 KV would reach 55808" in ctx and "degrades answers" in ctx


def test_q4_0_kv_only_when_asked() -> None:
    r = plan(LLAMA_3B, profile("cpu-small"), Policy(kv_cache_type="q4_0"))
    assert r.fits and r.plan.kv_cache_type == "q4_0" and r.plan.context == 55808
    assert any("q4_0 measurably degrades answers" in x for x in r.reasons)


@pytest.mark.parametrize("memory_gib", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize(("model", "quant"), [("llama-3.2-3b", "Q4_K_M"), ("qwen3.5-0.8b", "Q4_0")])
def test_auto_never_chooses_q4_0(model: str, quant: str, memory_gib: int) -> None:
    r = plan(catalog_facts(model, quant), cpu(memory_gib * GiB), Policy())
    assert r.plan.kv_cache_type in ("f16", "q8_0")
    assert "-ctk" in r.plan.args and r.plan.args[r.plan.args.index("-ctk") + 1] != "q4_0"


def test_f16_when_the_context_fits_at_full_precision() -> None:
    r = plan(LLAMA_3B, profile("cpu-small"), Policy(context=8192))
    assert r.plan.kv_cache_type == "f16" and r.plan.context == 8192
    assert "KV cache f16: full precision fits" in r.reasons


def test_does_not_fit_says_when_q4_0_would() -> None:
    def need(kv: str) -> int:
        p = Policy(context=4096, min_context=4096, kv_cache_type=kv, cache_ram_mib=0)  # type: ignore[arg-type]
        return plan(LLAMA_3B, cpu(None), p).memory_request_bytes

    between = (need("q4_0") + need("q8_0")) // 2
    r = plan(LLAMA_3B, cpu(between), Policy(context=4096, min_context=4096))
    assert not r.fits and r.plan.kv_cache_type == "q8_0"
    assert "q4_0 KV would fit" in r.reasons[0] and "kvCacheType q4_0" in r.reasons[0]
    assert plan(LLAMA_3B, cpu(between), Policy(context=4096, min_context=4096, kv_cache_type="q4_0")).fits


def test_flash_attention_off_keeps_f16() -> None:
    r = plan(LLAMA_3B, profile("cpu-small"), Policy(flash_attention="off"))
    assert r.plan.kv_cache_type == "f16" and not r.plan.flash_attention


# ---- prompt cache (--cache-ram) ------------------------------------------------------------------


def test_prompt_cache_auto_holds_two_typical_conversations() -> None:
    g = catalog_facts("gemma-3-1b", "Q4_0")
    r = plan(g, profile("cpu-large"), Policy())
    off = plan(g, profile("cpu-large"), Policy(cache_ram_mib=0))
    cfg = ServerConfig(n_ctx=r.plan.context, ctx_checkpoints=r.plan.ctx_checkpoints)
    state = prompt_state_bytes(g, cfg, PROMPT_CACHE_TYPICAL_TOKENS)
    assert r.plan.context > PROMPT_CACHE_TYPICAL_TOKENS
    assert r.plan.cache_ram_mib == -(-2 * state // MiB)
    assert r.plan.args[r.plan.args.index("--cache-ram") + 1] == str(r.plan.cache_ram_mib)
    # counted in the limit (filled as prompts are saved), not in a fresh server's peak
    assert r.memory.cache_ram_bytes == r.plan.cache_ram_mib * MiB
    assert r.memory.total_bytes == off.memory.total_bytes
    assert r.memory.full_context_bytes == off.memory.full_context_bytes + r.memory.cache_ram_bytes
    assert r.memory_request_bytes > off.memory_request_bytes + r.memory.cache_ram_bytes
    assert r.cache_free_request_bytes == off.memory_request_bytes
    why = next(x for x in r.reasons if x.startswith("prompt cache"))
    assert f"2 saved {PROMPT_CACHE_TYPICAL_TOKENS}-token conversations" in why and "counted in the memory limit" in why


def test_prompt_cache_auto_does_not_multiply_a_small_models_request() -> None:
    """The seed case at its full 262k context: two full-context states made the request 10.5 GiB (was 2.5x)."""
    r = plan(QWEN, profile("cpu"), Policy(context=262144))
    own = r.memory.full_context_bytes - r.memory.cache_ram_bytes
    assert 0 < r.memory.cache_ram_bytes <= own * PROMPT_CACHE_MODEL_SHARE
    assert r.memory_request_bytes <= 1.1 * r.cache_free_request_bytes


def test_prompt_cache_auto_takes_at_most_a_quarter_of_the_models_own_memory() -> None:
    r = plan(QWEN, profile("cpu"), Policy(context=16384))
    own = r.memory.full_context_bytes - r.memory.cache_ram_bytes
    assert r.plan.cache_ram_mib == int(own * PROMPT_CACHE_MODEL_SHARE) // MiB
    assert any("a quarter of the plan's own" in x for x in r.reasons)


def test_prompt_cache_explicit_budget_may_exceed_the_auto_bounds() -> None:
    r = plan(QWEN, profile("cpu"), Policy(context=32768, cache_ram_mib=4096))
    assert r.fits and r.plan.cache_ram_mib == 4096


def test_prompt_cache_auto_takes_at_most_a_quarter_of_the_free_memory() -> None:
    off = plan(QWEN, cpu(None), Policy(context=32768, cache_ram_mib=0))
    free = 512 * MiB
    r = plan(QWEN, cpu(off.memory_request_bytes + free), Policy(context=32768))
    assert r.fits and r.plan.context == 32768 and r.plan.kv_cache_type == "f16"
    assert 0 < r.plan.cache_ram_mib * MiB <= free // 4
    assert r.memory_request_bytes - off.memory_request_bytes <= free // 4 + MiB
    assert any("a quarter of the" in x for x in r.reasons)


def test_prompt_cache_off_when_memory_is_short() -> None:
    r = plan(LLAMA_3B, profile("cpu-small"), Policy())  # the context had to shrink: no room for a cache
    assert r.fits and r.plan.cache_ram_mib == 0
    assert r.plan.args[r.plan.args.index("--cache-ram") + 1] == "0"
    assert any(x.startswith("prompt cache off (--cache-ram 0): memory is short") for x in r.reasons)


def test_prompt_cache_off_when_nothing_fits() -> None:
    r = plan(QWEN, cpu(256 * MiB), Policy(context=32768))
    assert not r.fits and r.plan.cache_ram_mib == 0


def test_prompt_cache_explicit_budget_is_counted_and_can_cost_context() -> None:
    off = plan(QWEN, cpu(None), Policy(context=8192, cache_ram_mib=0))
    r = plan(QWEN, cpu(None), Policy(context=8192, cache_ram_mib=512))
    assert r.plan.cache_ram_mib == 512 and r.plan.args[r.plan.args.index("--cache-ram") + 1] == "512"
    assert r.memory_request_bytes >= off.memory_request_bytes + 512 * MiB
    assert any("prompt cache 512 MiB (--cache-ram): as requested" in x for x in r.reasons)
    zero = plan(QWEN, cpu(None), Policy(context=8192, cache_ram_mib=0))
    assert "prompt cache off (--cache-ram 0): as requested" in zero.reasons
    # an explicit budget is part of the fit: on a tight node it takes memory from the context
    tight = plan(QWEN, cpu(2 * GiB), Policy(cache_ram_mib=1024))
    assert tight.plan.context < plan(QWEN, cpu(2 * GiB), Policy(cache_ram_mib=0)).plan.context


def test_prompt_state_of_a_recurrent_model_includes_its_state_and_checkpoints() -> None:
    cfg = ServerConfig(n_ctx=4096, ctx_checkpoints=1)
    state = seq_state_bytes(QWEN, cfg)
    kv_only = seq_state_bytes(QWEN, cfg.model_copy(update={"ctx_checkpoints": 0}))
    assert state > kv_only > 0
    assert prompt_state_bytes(QWEN, cfg, 1024) < state


# ---- the planner's steps (plan() composes them) ----------------------------------------------------


def test_step_context_bounds() -> None:
    from modelfit.sizing import _context_bounds

    warnings: list[str] = []
    assert _context_bounds(QWEN, Policy(context=5000, min_context=1000), warnings) == (4864, 768)
    assert _context_bounds(QWEN, Policy(context="max"), warnings) == (262144, 4096)
    assert not warnings
    assert _context_bounds(QWEN, Policy(context=10**6), warnings) == (262144, 4096)
    assert warnings == ["requested context 1000000 exceeds the model's trained 262144; capped"]
    assert _context_bounds(QWEN, Policy(context=100, min_context=50), []) == (100, 50)  # below one step: as is


def test_step_search_space() -> None:
    from modelfit.sizing import _search_space

    warnings: list[str] = []
    cpu_space = _search_space(QWEN, cpu(None), Policy(flash_attention="off", kv_cache_type="q8_0"), warnings)
    assert cpu_space.backend == "cpu" and cpu_space.layer_options == [0] and cpu_space.kv_types == ["f16"]
    assert cpu_space.load_modes == ["mmap", "none"] and cpu_space.fa_forced_off and not cpu_space.base.flash_attn
    assert warnings == ["a quantized V cache needs flash attention; using f16 because flash attention is off"]
    gpu = _search_space(QWEN, profile("rtx-3060-12gb"), Policy(load_mode="none"), [])
    assert gpu.backend == "cuda" and gpu.layer_options[0] == gpu.total_units == 25 and gpu.layer_options[-1] == 0
    assert gpu.kv_types == ["f16", "q8_0"] and gpu.load_modes == ["none"]
    nogpu: list[str] = []
    assert _search_space(QWEN, cpu(None), Policy(backend="cuda"), nogpu).backend == "cpu" and nogpu


def test_step_search_and_nothing_fits() -> None:
    from modelfit.sizing import _nothing_fits, _search, _search_space

    node, policy = cpu(256 * MiB), Policy(context=32768)
    space = _search_space(QWEN, node, policy, [])
    assert _search(QWEN, node, policy, space) is None
    smallest, short, why = _nothing_fits(QWEN, node, policy, space)
    assert smallest.cfg.n_ctx == 4096 and smallest.cfg.type_k == "q8_0" and short == smallest.host_need - 256 * MiB
    assert why.startswith("does not fit: even at context 4096 with q8_0 KV")
    roomy = cpu(16 * GiB)
    found = _search(QWEN, roomy, policy, _search_space(QWEN, roomy, policy, []))
    assert found is not None and found.cfg.n_ctx == 32768 and found.cfg.type_k == "f16"


def test_step_prompt_cache_keeps_an_explicit_budget() -> None:
    from modelfit.sizing import _prompt_cache, _search, _search_space

    node, policy = cpu(None), Policy(context=8192, cache_ram_mib=300)
    found = _search(QWEN, node, policy, _search_space(QWEN, node, policy, []))
    assert found is not None
    same, why = _prompt_cache(QWEN, node, policy, found, True)
    assert same is found and same.cfg.cache_ram_mib == 300 and why.startswith("prompt cache 300 MiB")


def test_huge_pages_for_weights_the_cpu_streams() -> None:
    from modelfit.sizing import THP_ENV

    r = plan(QWEN, cpu(8 * GiB), Policy(context=4096, huge_pages=True))
    assert r.plan.env == THP_ENV == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert any(x.startswith("huge pages on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)") for x in r.reasons)
    off = plan(QWEN, cpu(8 * GiB), Policy(context=4096))  # the default until the memory model counts them
    assert off.plan.env == {} and any(x.startswith("huge pages off: weight buffers") for x in off.reasons)
    assert off.plan.args == r.plan.args and off.memory == r.memory  # the flags and the memory model are the same
    gpu = plan(catalog_facts("llama-3.1-8b", "Q4_K_M"), profile("rtx-4090-24gb"), Policy(context=8192))
    assert gpu.plan.gpu_layers == gpu.plan.total_layers and gpu.plan.env == {}
    assert not any(x.startswith("huge pages") for x in gpu.reasons)
