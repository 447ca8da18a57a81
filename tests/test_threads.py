"""Threads and the CPU request: from the model and a policy (the memory-bandwidth rule), not the node's free cores.

Pure: no timing. The rule (sizing.THREAD_DECODE_BYTES_PER_S): the smallest t with
t x (bytes/s one thread decodes) >= the node's memory bandwidth, at least Policy.min_threads,
at most the node's free whole CPUs; one thread when the GPU holds every layer; spec.threads
overrides it. The CPU request is exactly the threads, with no CPU limit.
"""

from __future__ import annotations

import math

import pytest

from modelfit.catalog import catalog_facts
from modelfit.memory import ServerConfig
from modelfit.nodes import (
    BANDWIDTH_LABEL,
    GiB,
    NodeFacts,
    Requests,
    bandwidth_from_labels,
    node_facts_from_k8s,
    parse_node_shapes,
    profile,
)
from modelfit.sizing import (
    MEMORY_BANDWIDTH_DEFAULT,
    MIN_THREADS_DEFAULT,
    THREAD_DECODE_BYTES_PER_S,
    Policy,
    decode_bytes_per_token,
    plan,
)

QWEN = catalog_facts("qwen3.5-0.8b", "Q4_0")
LLAMA_8B = catalog_facts("llama-3.1-8b", "Q4_K_M")
RULE = max(math.ceil(MEMORY_BANDWIDTH_DEFAULT / THREAD_DECODE_BYTES_PER_S), MIN_THREADS_DEFAULT)


def node(cpus: float = 16, bandwidth_gbps: float | None = None) -> NodeFacts:
    return NodeFacts(
        name="n",
        cpu_millis=int(cpus * 1000),
        memory_bytes=64 * GiB,
        memory_bandwidth_bytes=int(bandwidth_gbps * 1e9) if bandwidth_gbps else None,
    )


def threads_reason(r) -> str:  # type: ignore[no-untyped-def]
    return next(x for x in r.reasons if x.startswith("threads"))


def test_the_rule_not_the_free_cores_sets_threads() -> None:
    """The seed case asked for 16 CPUs on a 16-core node for a 0.8B model; now the bandwidth rule decides."""
    r = plan(QWEN, profile("cpu-large"), Policy(context=4096))
    assert r.plan.threads == RULE == 4 < 16
    assert r.plan.args[r.plan.args.index("-t") + 1] == "4"
    assert r.resources.requests["cpu"] == "4" and "cpu" not in r.resources.limits
    assert r.cpu_request_millis == 4000 and r.threads_wanted == 4
    why = threads_reason(r)
    assert why.startswith("threads 4: decode reads")
    assert "memory bandwidth (policy default, no node label)" in why and "4 reach the bound" in why
    assert "CPU request 4, no CPU limit" in why


@pytest.mark.parametrize("model", [QWEN, LLAMA_8B, catalog_facts("gemma-3-1b", "Q4_0")])
def test_the_thread_count_at_the_bound_is_the_same_for_every_cpu_model(model) -> None:  # type: ignore[no-untyped-def]
    # per-thread rate and bound both scale with the bytes read per token; the model sets the speed, not t
    assert plan(model, node(16), Policy(context=4096)).plan.threads == RULE


@pytest.mark.parametrize(
    ("gbps", "rate", "floor", "want"),
    [
        (20, 6e9, 2, 4),  # the defaults: ceil(20 / 6)
        (60, 6e9, 2, 10),  # a node labelled with more bandwidth needs more threads to reach it
        (6, 6e9, 2, 2),  # one thread reaches 6 GB/s, but prompts want at least min_threads
        (6, 6e9, 1, 1),
        (24, 8e9, 2, 3),  # a faster core (Policy.thread_decode_bytes_per_s) reaches it with fewer
        (200, 6e9, 2, 16),  # capped by the node's 16 free CPUs
    ],
)
def test_rule_table(gbps: float, rate: float, floor: int, want: int) -> None:
    r = plan(QWEN, node(16, gbps), Policy(context=4096, thread_decode_bytes_per_s=int(rate), min_threads=floor))
    assert r.plan.threads == want
    assert r.resources.requests["cpu"] == str(want)
    assert f"label {BANDWIDTH_LABEL}" in threads_reason(r)


def test_floor_and_cap_are_explained() -> None:
    low = plan(QWEN, node(16, 3), Policy(context=4096))
    assert low.plan.threads == MIN_THREADS_DEFAULT
    assert "prompt processing is compute-bound" in threads_reason(low)
    capped = plan(QWEN, node(2.5), Policy(context=4096))
    assert capped.plan.threads == 2 and capped.threads_wanted == RULE
    assert "capped by the node's free CPU (2500m)" in threads_reason(capped)
    assert capped.resources.requests["cpu"] == "2" and not capped.warnings


def test_less_than_one_free_cpu_still_plans_one_thread_and_warns() -> None:
    r = plan(QWEN, node(0.5), Policy(context=4096))
    assert r.plan.threads == 1 and r.resources.requests["cpu"] == "1"
    assert any("the scheduler will not place it there" in w for w in r.warnings)


def test_spec_threads_override_the_rule_and_are_not_capped() -> None:
    r = plan(QWEN, node(4), Policy(threads=8, context=4096))
    assert r.plan.threads == 8 and r.resources.requests["cpu"] == "8"
    assert threads_reason(r).startswith("threads 8: as requested")
    assert any("requests 8 CPU but the node has 4 free" in w for w in r.warnings)
    assert Policy(threads="auto").threads == "auto" and Policy().threads == "auto"
    with pytest.raises(ValueError):
        Policy(threads=0)


def test_full_gpu_offload_needs_one_thread_partial_offload_follows_the_rule() -> None:
    full = plan(LLAMA_8B, profile("rtx-4090-24gb"), Policy(context=8192))
    assert full.plan.gpu_layers == full.plan.total_layers and full.plan.threads == 1
    assert full.resources.requests["cpu"] == "1" and "GPU holds every layer" in threads_reason(full)
    part = plan(catalog_facts("qwen3-30b-a3b", "Q4_K_M"), profile("rtx-3060-12gb"), Policy(context=8192))
    assert 0 < part.plan.gpu_layers < part.plan.total_layers and part.plan.threads == RULE


def test_decode_bytes_per_token() -> None:
    cpu = ServerConfig(n_ctx=4096)
    # tied embedding (qwen3.5): the output matrix is the embedding, read in full every token
    assert decode_bytes_per_token(QWEN, cpu) == sum(t.nbytes for t in QWEN.tensors)
    # untied (llama 3.1): the embedding is a lookup of one row; the output matrix is read in full
    embd = next(t for t in LLAMA_8B.tensors if t.name == "token_embd.weight")
    total = sum(t.nbytes for t in LLAMA_8B.tensors)
    assert decode_bytes_per_token(LLAMA_8B, cpu) == total - embd.nbytes + embd.nbytes // LLAMA_8B.n_vocab
    # MoE: the active experts only
    moe = catalog_facts("qwen3-30b-a3b", "Q4_K_M")
    assert decode_bytes_per_token(moe, cpu) < 0.2 * sum(t.nbytes for t in moe.tensors)
    # offloaded layers are not read by the CPU; with everything offloaded only the embedding row is left
    gpu = cpu.model_copy(update={"n_gpus": 1, "backend": "cuda"})
    half = decode_bytes_per_token(LLAMA_8B, gpu.model_copy(update={"n_gpu_layers": 16}))
    assert 0.3 * total < half < 0.7 * total
    assert decode_bytes_per_token(LLAMA_8B, gpu.model_copy(update={"n_gpu_layers": 33})) < 10 * embd.nbytes // (
        LLAMA_8B.n_vocab
    )


def test_bandwidth_label_from_nodes_and_shapes() -> None:
    assert bandwidth_from_labels({BANDWIDTH_LABEL: "25.6"}) == 25_600_000_000
    for bad in ("fast", "-1", "0", "nan", "inf"):
        assert bandwidth_from_labels({BANDWIDTH_LABEL: bad}) is None
    assert bandwidth_from_labels({}) is None
    k8s = {
        "metadata": {"name": "a", "labels": {BANDWIDTH_LABEL: "40"}},
        "status": {"allocatable": {"cpu": "16", "memory": "64Gi"}},
    }
    facts = node_facts_from_k8s(k8s, Requests(cpu_millis=3000))
    assert facts.memory_bandwidth_bytes == 40 * 10**9 and facts.cpu_millis == 13000
    (shape,) = parse_node_shapes([{"name": "s", "labels": {BANDWIDTH_LABEL: "12"}, "cpu": 8, "memory": "32Gi"}])
    assert shape.facts().memory_bandwidth_bytes == 12 * 10**9
    r = plan(QWEN, facts, Policy(context=4096))
    assert r.plan.threads == math.ceil(40e9 / THREAD_DECODE_BYTES_PER_S)
