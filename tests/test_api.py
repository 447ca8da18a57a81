import pytest
from pydantic import ValidationError

from modelfit.api import ModelDeployment, ModelDeploymentSpec


def spec(**kw):
    return ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, **kw})


def test_defaults_and_camel_case():
    s = spec(minContext=8192, kvCacheType="q8_0", serverArgs=["--temp", "0.7"], apiKeySecretRef={"name": "k"})
    assert s.context == "max" and s.gpu_layers == "auto" and s.replicas == 1 and s.adapt is False
    assert s.min_context == 8192 and s.kv_cache_type == "q8_0"
    assert s.api_key_secret_ref is not None and s.api_key_secret_ref.key == "api-key"
    dumped = s.model_dump(by_alias=True, exclude_none=True)
    assert dumped["minContext"] == 8192 and dumped["serverArgs"] == ["--temp", "0.7"]


@pytest.mark.parametrize(
    "model",
    [
        {"catalog": "qwen3.5-0.8b"},  # catalog without quant
        {"catalog": "qwen3.5-0.8b", "quant": "Q3_X"},  # unknown quant
        {"catalog": "qwen3.5-0.8b", "quant": "Q4_0", "url": "https://x/y.gguf"},  # two sources
        {},  # none
        {"url": "ftp://x/y.gguf"},
        {"url": "https://x/y.gguf", "quant": "Q4_0"},
        {"url": "https://x/y.gguf", "sha256": "abc"},
        {"huggingFace": {"repo": "a/b"}},
    ],
)
def test_bad_model_sources(model):
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate({"model": model})


@pytest.mark.parametrize(
    "kw",
    [
        {"context": -1},
        {"context": "huge"},
        {"parallel": 0},
        {"backend": "tpu"},
        {"gpuLayers": "some"},
        {"replicas": -1},
        {"kvCacheType": "q2"},
        {"service": {"type": "Ingress"}},
        {"modelCache": {"emptyDir": {}, "pvc": {}}},
        {"unknownField": 1},
    ],
)
def test_bad_fields(kw):
    with pytest.raises(ValidationError):
        spec(**kw)


def test_sources_parse():
    hf = ModelDeploymentSpec.model_validate({"model": {"huggingFace": {"repo": "a/b", "file": "m.gguf"}}})
    assert hf.model.hugging_face is not None and hf.model.hugging_face.revision == "main"
    pvc = ModelDeploymentSpec.model_validate({"model": {"pvc": {"claimName": "c", "path": "/m.gguf"}}})
    assert pvc.model.pvc is not None and pvc.model.pvc.claim_name == "c"


def test_owned_flags_detected():
    s = spec(serverArgs=["--temp", "0.7", "-c", "4096", "--ctx-size=8192", "--jinja"])
    assert s.owned_flags_in_server_args() == ["-c", "--ctx-size"]


def test_full_object_with_status():
    md = ModelDeployment.model_validate(
        {
            "apiVersion": "modelfit.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "x"},
            "spec": {"model": {"url": "https://h/m.gguf"}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "ReplicasReady"}],
                "readyReplicas": 1,
            },
        }
    )
    assert md.status is not None and md.status.ready_replicas == 1


@pytest.mark.parametrize("q", ["1", "1.5", ".5", "500m", "2Gi", "2G", "1e3", "1E3", "1.5e-3", "8Ki", "5E", "100n"])
def test_resource_quantities_accepted_and_parsed(q):
    from modelfit.nodes import parse_quantity

    r = ModelDeploymentSpec.model_validate({"model": {"url": "https://x"}, "resources": {"limits": {"memory": q}}})
    assert r.resources is not None and parse_quantity(r.resources.limits["memory"]) >= 0


@pytest.mark.parametrize("q", ["lots", "-1Gi", "2GB", "2gib", "1 Gi", "", "Gi", "1e", "+1"])
def test_resource_quantities_refused(q):
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate({"model": {"url": "https://x"}, "resources": {"requests": {"cpu": q}}})


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("qwen-0-8b", True), ("m" * 63, True), ("m" * 64, False), ("1a", False), ("a.b", False),
     ("a-", False), ("A", False), ("a_b", False)],
)  # fmt: skip
def test_name_problem(name, ok):
    from modelfit.api import name_problem

    assert (name_problem(name) is None) == ok


def test_affinity_shape_checked_only_where_the_planner_reads():
    fine = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
            }
        },
        "podAntiAffinity": {"anything": "the API server checks it"},
    }
    assert ModelDeploymentSpec.model_validate({"model": {"url": "https://x"}, "affinity": fine}).affinity == fine
    bad = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}}
    bad["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0] = {
        "matchExpressions": [{"key": "zone", "operator": "Like"}]
    }
    with pytest.raises(ValidationError, match="operator must be one of"):
        ModelDeploymentSpec.model_validate({"model": {"url": "https://x"}, "affinity": bad})
