import pytest

from modelfit import catalog
from modelfit.api import ModelDeploymentSpec
from modelfit.nodes import GiB, MiB, NodeFacts
from modelfit.placement import affinity_matches, node_classes, place, tolerates

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
