import jsonschema
import pytest
from pydantic import ValidationError

from modelfit import catalog, crd
from modelfit.api import ModelDeploymentSpec
from modelfit.cli import build_parser, policy_from_args
from modelfit.nodes import GiB, MiB, NodeFacts
from modelfit.placement import affinity_matches, node_classes, place, policy_for, tolerates

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def cpu_small():
    return NodeFacts(
        name="cpu-small", cpu_millis=2000, memory_bytes=4 * GiB, labels={"kubernetes.io/hostname": "cpu-small"}
    )


def cpu_large():
    return NodeFacts(
        name="cpu-large",
        cpu_millis=16000,
        memory_bytes=64 * GiB,
        cpu_features=["avx2", "avx512f"],
        labels={"kubernetes.io/hostname": "cpu-large", "node.kubernetes.io/instance-type": "c7.4xlarge"},
    )


def gpu_24g(taints=True):
    return NodeFacts(
        name="gpu-24g",
        cpu_millis=8000,
        memory_bytes=32 * GiB,
        gpus=1,
        gpu_vendor="nvidia",
        gpu_memory_bytes=24576 * MiB,
        taints=[GPU_TAINT] if taints else [],
        labels={"kubernetes.io/hostname": "gpu-24g"},
    )


def spec(model="qwen3.5-0.8b", quant="Q4_0", **kw):
    return ModelDeploymentSpec.model_validate({"model": {"catalog": model, "quant": quant}, **kw})


def run(s, nodes):
    facts = catalog.catalog_facts(s.model.catalog, s.model.quant)
    return place(s, facts, nodes, "/models/m.gguf")


def test_gpu_full_offload_preferred_with_auto():
    p = run(spec(context=32768), [cpu_small(), cpu_large(), gpu_24g()])
    assert p.fits and p.reason == "Planned"
    assert p.result.plan.backend == "cuda" and p.result.plan.gpu_layers == p.result.plan.total_layers
    assert p.selector == {"kubernetes.io/hostname": "gpu-24g"}


def test_cpu_backend_skips_tainted_gpu_node_and_picks_most_headroom():
    p = run(spec(context=32768, backend="cpu"), [cpu_small(), cpu_large(), gpu_24g()])
    assert p.fits and p.result.plan.backend == "cpu" and p.node.name == "cpu-large"
    assert p.selector == {"node.kubernetes.io/instance-type": "c7.4xlarge"}


def test_nothing_fits_reports_why():
    p = run(spec("llama-3.1-8b", "Q4_K_M", context=32768), [cpu_small()])
    assert not p.fits and p.reason == "NoNodeFits"
    assert "cpu-small" in p.message and "short by" in p.message
    assert p.result is not None and not p.result.fits


def test_adapt_shrinks_context_only_when_allowed():
    small = NodeFacts(name="tiny", cpu_millis=2000, memory_bytes=1200 * MiB)
    strict = run(spec(context=131072), [small])
    assert not strict.fits
    adapted = run(spec(context=131072, adapt=True, minContext=4096), [small])
    assert adapted.fits and adapted.adapted and adapted.reason == "Adapted"
    assert 4096 <= adapted.result.plan.context < 131072


def test_explicit_backend_without_gpu_needs_adapt():
    assert not run(spec(backend="cuda", context=8192), [cpu_large()]).fits
    p = run(spec(backend="cuda", context=8192, adapt=True), [cpu_large()])
    assert p.fits and p.result.plan.backend == "cpu" and p.adapted


def test_node_selector_tolerations_affinity():
    assert run(spec(nodeSelector={"pool": "x"}), [cpu_large()]).reason == "NoEligibleNodes"
    tainted = cpu_large().model_copy(update={"taints": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]})
    assert run(spec(context=8192), [tainted]).reason == "NoEligibleNodes"
    ok = run(spec(context=8192, tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml"}]), [tainted])
    assert ok.fits
    aff = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["cpu-small"]}]}
                ]
            }
        }
    }
    p = run(spec(context=8192, affinity=aff), [cpu_small(), cpu_large()])
    assert p.fits and p.node.name == "cpu-small"


def test_no_nodes():
    assert run(spec(), []).reason == "NoNodes"


@pytest.mark.parametrize(
    ("tol", "ok"),
    [
        ({"operator": "Exists"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "nvidia.com/gpu", "value": "present"}, True),
        ({"key": "nvidia.com/gpu", "value": "other"}, False),
    ],
)
def test_tolerates(tol, ok):
    assert tolerates([tol], GPU_TAINT) is ok


def test_affinity_operators():
    labels = {"a": "1", "n": "5"}

    def aff(expr):
        return {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}
            }
        }

    assert affinity_matches(labels, "x", aff({"key": "a", "operator": "Exists"}))
    assert not affinity_matches(labels, "x", aff({"key": "b", "operator": "Exists"}))
    assert affinity_matches(labels, "x", aff({"key": "n", "operator": "Gt", "values": ["3"]}))
    assert affinity_matches(labels, "x", aff({"key": "a", "operator": "NotIn", "values": ["2"]}))
    assert affinity_matches(labels, "x", None)


def test_node_classes_group_by_instance_type():
    a = cpu_large()
    b = cpu_large().model_copy(update={"name": "cpu-large-2", "memory_bytes": 80 * GiB})
    classes = node_classes([a, b, cpu_small()])
    assert len(classes) == 2
    big = next(n for sel, n in classes if "node.kubernetes.io/instance-type" in sel)
    assert big.name == "cpu-large-2" and big.count == 2


# ---- KV cache type and prompt cache from the spec -------------------------------------------------


def test_spec_kv_auto_never_q4_0_and_adapt_keeps_it_opt_in():
    p = run(spec("llama-3.2-3b", "Q4_K_M"), [cpu_small()])
    assert p.fits and p.result.plan.kv_cache_type == "q8_0" and p.result.plan.context < 56320
    assert "KV q8_0" in p.message
    opted = run(spec("llama-3.2-3b", "Q4_K_M", kvCacheType="q4_0"), [cpu_small()])
    assert opted.fits and opted.result.plan.kv_cache_type == "q4_0" and opted.result.plan.context == 55808
    # adapt's second try frees the KV type, but only to auto (f16, else q8_0) ...
    strict_f16 = spec("llama-3.2-3b", "Q4_K_M", context=65536, kvCacheType="f16", adapt=True)
    p = run(strict_f16, [cpu_small()])
    assert p.fits and p.adapted and p.result.plan.kv_cache_type == "q8_0"
    # ... and keeps an explicit q4_0
    q4 = spec("llama-3.2-3b", "Q4_K_M", context=131072, kvCacheType="q4_0", adapt=True)
    p = run(q4, [cpu_small()])
    assert p.fits and p.adapted and p.result.plan.kv_cache_type == "q4_0"


def test_policy_for_relaxed_kv_types():
    assert policy_for(spec(kvCacheType="f16"), relaxed=True).kv_cache_type == "auto"
    assert policy_for(spec(kvCacheType="q4_0"), relaxed=True).kv_cache_type == "q4_0"
    assert policy_for(spec(kvCacheType="q8_0")).kv_cache_type == "q8_0"


@pytest.mark.parametrize(("value", "mib"), [(None, None), ("auto", None), (0, 0), (768, 768)])
def test_spec_prompt_cache_reaches_the_plan(value, mib):
    kw = {} if value is None else {"promptCache": value}
    p = run(spec(context=8192, **kw), [cpu_large()])
    assert p.fits
    if mib is None:  # auto on a roomy node: two full-context states of the slot
        assert p.result.plan.cache_ram_mib > 0
    else:
        assert p.result.plan.cache_ram_mib == mib
    args = p.result.plan.args
    assert args[args.index("--cache-ram") + 1] == str(p.result.plan.cache_ram_mib)
    assert p.result.memory.cache_ram_bytes == p.result.plan.cache_ram_mib * MiB


@pytest.mark.parametrize("bad", [-1, 1048577, "lots", "Auto", 1.5])
def test_spec_prompt_cache_rejects(bad):
    with pytest.raises(ValidationError):
        spec(promptCache=bad)


@pytest.mark.parametrize("value", ["auto", 0, 512, 1048576])
def test_crd_accepts_what_the_spec_accepts(value):
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    doc = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "promptCache": value}
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    assert spec(promptCache=value).prompt_cache == value


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kvCacheType": "q4_0", "promptCache": 300},
        {"kvCacheType": "q8_0", "promptCache": 0, "parallel": 2, "loadMode": "mmap", "flashAttention": "on"},
        {"kvCacheType": "f16", "backend": "cpu", "gpuLayers": 0, "promptCache": "auto"},
    ],
)
def test_operator_and_cli_translate_the_spec_alike(options):
    """placement.policy_for (the operator) and cli.policy_from_args (`modelfit plan`) give one Policy."""
    flags = {
        "kvCacheType": "--kv-cache-type",
        "promptCache": "--prompt-cache",
        "parallel": "--parallel",
        "loadMode": "--load-mode",
        "flashAttention": "--flash-attention",
        "backend": "--backend",
        "gpuLayers": "--gpu-layers",
    }
    argv = ["plan", "qwen3.5-0.8b"] + [x for k, v in options.items() for x in (flags[k], str(v))]
    args = build_parser().parse_args(argv)
    assert policy_for(spec(**options)) == policy_from_args(args)


def _shapes():
    from modelfit.nodes import parse_node_shapes

    return parse_node_shapes(
        [
            {"name": "huge", "labels": {"pool": "huge"}, "cpu": 64, "memory": "512Gi"},
            {"name": "large", "labels": {"pool": "large"}, "cpu": 16, "memory": "64Gi"},
            {"name": "gpu", "labels": {"pool": "gpu"}, "cpu": 8, "memory": "32Gi", "gpus": 1, "gpuMemory": "24Gi"},
        ]
    )


def test_place_with_shapes_picks_the_smallest_fitting_shape():
    from modelfit.nodes import parse_node_shapes
    from modelfit.placement import place_with_shapes

    spec = ModelDeploymentSpec.model_validate(
        {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072, "backend": "cpu"}
    )
    facts = catalog.catalog_facts("llama-3.1-8b", "Q8_0")
    got = place_with_shapes(spec, facts, [cpu_small()], _shapes(), "/m.gguf")
    assert got.fits and got.reason == "WaitingForNode" and got.selector == {"pool": "large"}
    assert "node shape large (pool=large)" in got.message and "NoNodeFits" in got.message
    assert got.node is not None and got.node.name == "large"
    # Without shapes (or with none that fits) the present answer stands.
    assert place_with_shapes(spec, facts, [cpu_small()], [], "/m.gguf").reason == "NoNodeFits"
    tiny = parse_node_shapes([{"name": "tiny", "labels": {"pool": "tiny"}, "cpu": 2, "memory": "4Gi"}])
    assert place_with_shapes(spec, facts, [], tiny, "/m.gguf").reason == "NoNodes"
    # A GPU shape for a CPU plan only when no other shape fits.
    assert place_with_shapes(spec, facts, [], _shapes()[2:], "/m.gguf").selector == {"pool": "gpu"}
    # A present node of a shape is pinned to the shape's labels, not its hostname.
    arrived = NodeFacts(
        name="ca-1", cpu_millis=16000, memory_bytes=64 * GiB, labels={"pool": "large", "kubernetes.io/hostname": "ca-1"}
    )
    there = place_with_shapes(spec, facts, [cpu_small(), arrived], _shapes(), "/m.gguf")
    assert there.reason == "Planned" and there.selector == {"pool": "large"}
    assert there.result is not None and got.result is not None and there.result.plan.args == got.result.plan.args


def test_without_shapes_a_full_node_class_is_the_shape():
    """No present node has room, but an empty node of a present class would hold the model: planned for that
    class (WaitingForNode), so the pending pod schedules when room frees up or on a node an autoscaler adds."""
    from modelfit.placement import place_with_shapes

    spec = ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192})
    facts = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0")
    empty = [cpu_small(), cpu_large()]
    full = [n.model_copy(update={"cpu_millis": 500, "memory_bytes": 256 << 20}) for n in empty]
    got = place_with_shapes(spec, facts, full, [], "/m.gguf", empty=empty)
    assert got.fits and got.reason == "WaitingForNode"
    assert got.selector == {"node.kubernetes.io/instance-type": "c7.4xlarge"}  # the roomier class, by its type
    assert "no present node has room now" in got.message and "short by" in got.message
    fresh = place_with_shapes(spec, facts, empty, [], "/m.gguf", empty=empty)
    assert got.result is not None and fresh.result is not None and got.result.plan.args == fresh.result.plan.args
    # Room somewhere: planned there, as before.
    assert place_with_shapes(spec, facts, [full[0], empty[1]], [], "/m.gguf", empty=empty).reason == "Planned"
    # Too big for any empty node, or no eligible node: the present answer stands.
    big = ModelDeploymentSpec.model_validate(
        {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072, "backend": "cpu"}
    )
    big_facts = catalog.catalog_facts("llama-3.1-8b", "Q8_0")
    assert place_with_shapes(big, big_facts, full[:1], [], "/m.gguf", empty=empty[:1]).reason == "NoNodeFits"
    nowhere = spec.model_copy(update={"node_selector": {"pool": "none"}})
    assert place_with_shapes(nowhere, facts, full, [], "/m.gguf", empty=empty).reason == "NoEligibleNodes"


def test_node_shapes_parse_and_refuse():
    from modelfit.nodes import parse_node_shapes

    gpu = _shapes()[2].facts()
    assert gpu.gpus == 1 and gpu.gpu_vendor == "nvidia" and gpu.gpu_memory_bytes == 24 * GiB and gpu.cpu_millis == 8000
    assert parse_node_shapes({"nodeShapes": []}) == [] and parse_node_shapes(None) == []
    for bad in (
        {"x": 1},
        [{"name": "a", "labels": {}, "cpu": 1, "memory": "1Gi"}],
        [{"name": "a", "labels": {"a": "b"}}],
    ):
        with pytest.raises(ValueError):
            parse_node_shapes(bad)
    twice = {"name": "a", "labels": {"a": "b"}, "cpu": 1, "memory": "1Gi"}
    with pytest.raises(ValueError, match="unique"):
        parse_node_shapes([twice, twice])


# ---- CPU: requests from the threads rule, counted per node like the scheduler does --------------------


def k8s_node(name, cpu, memory, labels=None):
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"}},
    }


def pod_of(p, i):
    """The pod a placement makes: the plan's requests on the chosen node."""
    return {
        "metadata": {"name": f"m{i}", "namespace": "default"},
        "spec": {"nodeName": p.node.name, "containers": [{"resources": {"requests": p.result.resources.requests}}]},
        "status": {"phase": "Running"},
    }


def test_models_pack_onto_one_node_each_with_the_cpu_its_threads_need():
    from modelfit.occupancy import node_facts

    nodes = [k8s_node("big", "16", "64Gi")]
    other = {  # a pod that is not ours still takes its CPU
        "metadata": {"name": "x", "namespace": "kube-system"},
        "spec": {"nodeName": "big", "containers": [{"resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}]},
        "status": {"phase": "Running"},
    }
    pods = [other]
    threads = []
    for i in range(4):
        p = run(spec(context=8192), node_facts(nodes, pods))
        assert p.fits and p.node.name == "big", p.message
        res = p.result
        assert res.resources.requests["cpu"] == str(res.plan.threads) and "cpu" not in res.resources.limits
        threads.append(res.plan.threads)
        pods.append(pod_of(p, i))
    # 14.5 CPUs free for models: 4 + 4 + 4 take the rule's 4 threads, the fourth gets the 2 whole CPUs left
    assert threads == [4, 4, 4, 2]
    last = run(spec(context=8192), node_facts(nodes, pods))  # 500m left: one thread needs a whole CPU
    assert not last.fits and last.reason == "NoNodeFits"
    assert "big: short by 500m CPU" in last.message
    assert last.result is not None and not last.result.fits and "requests 1 CPU" in last.result.reasons[0]


def test_a_node_without_the_free_cpu_is_refused_for_one_that_has_it():
    roomy_but_busy = NodeFacts(name="busy", cpu_millis=500, memory_bytes=64 * GiB)
    small_but_free = NodeFacts(name="free", cpu_millis=2000, memory_bytes=8 * GiB)
    p = run(spec(context=8192), [roomy_but_busy, small_but_free])
    assert p.fits and p.node.name == "free" and p.result.plan.threads == 2
    assert not run(spec(context=8192), [roomy_but_busy]).fits


def test_threads_the_rule_asks_for_beat_spare_memory():
    more_memory = NodeFacts(name="mem", cpu_millis=2000, memory_bytes=64 * GiB)
    more_cpu = NodeFacts(name="cpu", cpu_millis=8000, memory_bytes=32 * GiB)
    p = run(spec(context=8192), [more_memory, more_cpu])
    assert p.node.name == "cpu" and p.result.plan.threads == p.result.threads_wanted


def test_cpu_request_override_counts_for_the_fit():
    n = NodeFacts(name="n", cpu_millis=3000, memory_bytes=8 * GiB)
    assert run(spec(context=8192, resources={"requests": {"cpu": "2500m"}}), [n]).fits
    p = run(spec(context=8192, resources={"requests": {"cpu": "4"}}), [n])
    assert not p.fits and "short by 1 CPU" in p.message


def test_node_class_representative_has_a_free_cpu():
    a = cpu_large().model_copy(update={"name": "a", "cpu_millis": 200, "memory_bytes": 80 * GiB})
    b = cpu_large().model_copy(update={"name": "b"})
    ((_, rep),) = node_classes([a, b])
    assert rep.name == "b" and rep.count == 2
    assert run(spec(context=8192), [a, b]).fits


def test_spec_threads_override_the_rule_and_must_fit_the_node():
    assert policy_for(spec()).threads == "auto" and policy_for(spec(threads=6)).threads == 6
    n = NodeFacts(name="n", cpu_millis=4000, memory_bytes=8 * GiB)
    p = run(spec(context=8192, threads=3), [n])
    assert p.fits and p.result.plan.threads == 3 and p.result.resources.requests["cpu"] == "3"
    assert p.result.plan.args[p.result.plan.args.index("-t") + 1] == "3"
    too_many = run(spec(context=8192, threads=6), [n])
    assert not too_many.fits and "n: short by 2 CPU" in too_many.message


def test_a_gpu_another_pod_holds_is_not_planned_on():
    """The node's only GPU is taken: the plan runs on its CPU, and asks for no GPU."""
    facts = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0")
    node = gpu_24g(taints=False)
    free_gpu = place(spec(context=8192), facts, [node], "/m.gguf")
    assert free_gpu.result is not None and free_gpu.result.plan.backend == "cuda"
    assert free_gpu.result.resources.requests["nvidia.com/gpu"] == "1"
    taken = place(spec(context=8192), facts, [node.model_copy(update={"gpus": 0})], "/m.gguf")
    assert taken.fits and taken.result is not None and taken.result.plan.backend == "cpu"
    assert "nvidia.com/gpu" not in taken.result.resources.requests
