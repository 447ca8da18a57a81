"""hostPath caches: only under a root the admin allows, each model in a directory of its own (issue 17, item 1)."""

from __future__ import annotations

import pytest

from modelfit.api import ModelDeploymentSpec
from modelfit.cache import host_cache_dir, host_path_problem
from modelfit.reconciler import OperatorState
from modelfit.render import cache_file_name
from modelfit.settings import Settings
from test_handlers import CPU_LARGE, SEED, FakeKube, deploy_path, go, md
from test_render import META, build, pod

ROOT = "/var/lib/modelfit/models"
SHA = "ab" * 32


def spec(path: str, **model: str) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {"model": {"url": "https://h/m.gguf", **model}, "modelCache": {"hostPath": {"path": path}}}
    )


def test_no_host_path_is_allowed_by_default():
    why = host_path_problem(spec("/etc"), Settings())
    assert why is not None and "allows no hostPath" in why and "--host-path-root" in why


@pytest.mark.parametrize(
    "path",
    [
        "/etc",
        "/etc/kubernetes/manifests",  # the kubelet's static pods: the node
        f"{ROOT}/../../../etc",  # traversal out of an allowed root
        f"{ROOT}/./x",
        f"{ROOT}//tenant",
        f"{ROOT}/tenant",  # under the root, not the root: roots never nest into another model's directory
        "/var/lib/modelfit",  # above it
    ],
)
def test_only_an_allowed_root_itself(path):
    why = host_path_problem(spec(path), Settings(host_path_roots=(ROOT,)))
    assert why is not None and path in why


@pytest.mark.parametrize("path", [ROOT, ROOT + "/"])
def test_an_allowed_root_is_accepted(path):
    assert host_path_problem(spec(path), Settings(host_path_roots=(ROOT, "/mnt/fast"))) is None


@pytest.mark.parametrize("root", ["/", "/etc", "/var", "/tmp", "/usr", "relative", "/a/../etc", "/a//b"])
def test_the_admin_cannot_allow_a_system_directory_or_a_crooked_path(root):
    with pytest.raises(ValueError, match="host path root"):
        Settings(host_path_roots=(root,))


def test_each_model_mounts_a_directory_of_its_own():
    assert host_cache_dir(ROOT + "/", "team-a", "qwen", None, split=False) == f"{ROOT}/team-a/qwen"
    # A digest names the content: every model with it shares one directory, in any namespace.
    assert host_cache_dir(ROOT, "team-a", "qwen", SHA.upper(), split=False) == f"{ROOT}/sha256-{SHA}"
    assert host_cache_dir(ROOT, "team-b", "other", SHA, split=False) == f"{ROOT}/sha256-{SHA}"
    # A split model's later shards are not covered by the digest: never shared.
    assert host_cache_dir(ROOT, "team-a", "qwen", SHA, split=True) == f"{ROOT}/team-a/qwen"


def test_rendered_volume_is_the_models_own_directory_and_only_it_is_chowned():
    _, _, r = build(modelCache={"hostPath": {"path": ROOT}})
    vol = next(v for v in pod(r)["volumes"] if v["name"] == "model-cache")
    assert vol["hostPath"] == {"path": f"{ROOT}/{META['namespace']}/{META['name']}", "type": "DirectoryOrCreate"}
    prep = next(c for c in pod(r)["initContainers"] if c["name"] == "prepare-cache")
    script = prep["command"][-1]
    assert "chown 1000:1000 /models" in script and "-R" not in script
    assert prep["volumeMounts"] == [{"name": "model-cache", "mountPath": "/models"}]


def test_rendered_volume_with_a_digest_is_content_addressed():
    _, _, r = build(model={"url": "https://h/qwen.gguf", "sha256": SHA}, modelCache={"hostPath": {"path": ROOT}})
    vol = next(v for v in pod(r)["volumes"] if v["name"] == "model-cache")
    assert vol["hostPath"]["path"] == f"{ROOT}/sha256-{SHA}"
    env = {e["name"]: e.get("value") for e in pod(r)["initContainers"][-1]["env"]}
    assert env["MODEL_SHA256"] == SHA  # the downloader verifies before it reuses what another pod left there


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://h/org/m-Q4_K_M.gguf", "m-Q4_K_M.gguf"),
        ("https://h/x/m-00001-of-00003.gguf?download=true", "m-00001-of-00003.gguf"),
        ("https://h/etc/passwd", "passwd"),  # a plain name: it lands in the model's own directory only
        ("https://h/a/..", "model.gguf"),
        ("https://h/a/.", "model.gguf"),
        ("https://h/a/", "model.gguf"),
        ("https://h/a/%2e%2e%2fetc", "model.gguf"),
        ("https://h/a/.hidden", "model.gguf"),
        ("https://h/a/m.gguf#/../../x", "m.gguf"),
    ],
)
def test_the_file_name_is_a_plain_name_in_the_cache_directory(url, name):
    assert cache_file_name(url) == name


def test_operator_refuses_a_host_path_outside_its_roots_with_a_condition():
    body = md({**SEED, "modelCache": {"hostPath": {"path": "/etc"}}})
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    p = go(body, k, st)
    planned = next(c for c in p["conditions"] if c["type"] == "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "HostPathNotAllowed")
    conds = {c["type"]: (c["status"], c["reason"]) for c in p["conditions"]}
    assert conds["Degraded"] == ("True", "HostPathNotAllowed") and "Unschedulable" not in conds  # bad input, not room
    assert deploy_path() not in k.objects and k.applies == 0
    st.settings = Settings(host_path_roots=(ROOT,))
    p = go(md({**SEED, "modelCache": {"hostPath": {"path": ROOT}}}), k, st)
    planned = next(c for c in p["conditions"] if c["type"] == "Planned")
    assert planned["status"] == "True"
    vol = next(v for v in k.objects[deploy_path()]["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache")
    assert vol["hostPath"]["path"] == f"{ROOT}/default/qwen"
