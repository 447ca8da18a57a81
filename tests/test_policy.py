"""The one meaning of the spec for the planner (modelfit.policy)."""

from __future__ import annotations

import pytest

from modelfit.api import ModelDeploymentSpec
from modelfit.catalog import catalog_facts
from modelfit.nodes import GiB, NodeFacts
from modelfit.placement import place
from modelfit.policy import BASE_HEADROOM, cpu_limit_threads, min_context, policy_for
from modelfit.sizing import MIN_CONTEXT_DEFAULT


def spec(**kw: object) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, **kw})


@pytest.mark.parametrize(
    ("fields", "relaxed", "expected"),
    [
        ({}, False, MIN_CONTEXT_DEFAULT),  # max: down to the default minimum
        ({"minContext": 8192}, False, 8192),
        ({"context": 32768}, False, 32768),  # a context the user set is the minimum
        ({"context": 32768, "minContext": 8192}, False, 32768),
        ({"context": 32768, "minContext": 8192}, True, 8192),  # adapt's relaxed try may shrink it
        ({"context": 32768}, True, MIN_CONTEXT_DEFAULT),
    ],
)
def test_min_context(fields: dict[str, object], relaxed: bool, expected: int) -> None:
    assert min_context(spec(**fields), relaxed) == expected
    assert policy_for(spec(**fields), relaxed=relaxed).min_context == expected


def test_headroom_is_the_base_plus_the_oom_boost_capped_at_100_percent() -> None:
    assert policy_for(spec()).headroom == BASE_HEADROOM
    assert policy_for(spec(), headroom_boost=0.2).headroom == pytest.approx(BASE_HEADROOM + 0.2)
    assert policy_for(spec(), headroom_boost=5).headroom == 1.0


def test_relaxed_frees_backend_layers_and_kv_but_keeps_q4_0_opt_in() -> None:
    p = policy_for(spec(backend="cpu", gpuLayers=3, kvCacheType="f16"), relaxed=True)
    assert (p.backend, p.gpu_layers, p.kv_cache_type) == ("auto", "auto", "auto")
    assert policy_for(spec(kvCacheType="q4_0"), relaxed=True).kv_cache_type == "q4_0"


@pytest.mark.parametrize(("limit", "threads"), [(None, None), ("1", 1), ("1500m", 1), ("500m", 1), ("3", 3)])
def test_cpu_limit_in_whole_threads(limit: str | None, threads: int | None) -> None:
    resources = {"limits": {"cpu": limit}} if limit else None
    assert cpu_limit_threads(spec(resources=resources)) == threads


def test_threads_never_exceed_a_cpu_limit() -> None:
    """A CPU limit of 1 ran -t 4: three threads waiting on the CFS quota, and a request above the limit."""
    facts = catalog_facts("qwen3.5-0.8b", "Q4_0")
    node = NodeFacts(name="n", cpu_millis=8000, memory_bytes=16 * GiB)
    for fields, want in [({}, 4), ({"resources": {"limits": {"cpu": "1"}}}, 1), ({"threads": 6}, 6)]:
        p = place(spec(context=8192, **fields), facts, [node], "/models/m.gguf")
        assert p.fits and p.result is not None
        assert p.result.plan.threads == want
        assert p.result.plan.args[p.result.plan.args.index("-t") + 1] == str(want)
    p = place(spec(context=8192, threads=6, resources={"limits": {"cpu": "2"}}), facts, [node], "/models/m.gguf")
    assert p.result is not None and p.result.plan.threads == 2
    assert any("exceed the pod's CPU limit" in w for w in p.result.warnings)
    assert any("capped by the pod's CPU limit" in r for r in p.result.reasons)
