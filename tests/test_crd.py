from pathlib import Path

import jsonschema
import pytest
import yaml

from modelfit import crd
from modelfit.flags import OWNED_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def schema():
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_file_is_fresh():
    assert (ROOT / "crds" / "modelfit.io_modeldeployments.yaml").read_text() == crd.crd_yaml(), (
        "crds/modelfit.io_modeldeployments.yaml is stale: run `modelfit crd --write`"
    )


def _walk(node, path="$"):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    for path, node in _walk(schema()):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert "title" not in node and "const" not in node, path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") == "object", path
        assert not ("properties" in node and "additionalProperties" in node), path
        if path.count(".") >= 2 and not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{path} has no description"


def test_crd_shape():
    c = crd.crd()
    assert c["spec"]["names"]["shortNames"] == ["md"] and c["spec"]["scope"] == "Namespaced"
    v = c["spec"]["versions"][0]
    assert v["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert v["subresources"]["scale"]["statusReplicasPath"] == ".status.replicas"
    assert "status" in v["subresources"]
    cols = [col["name"] for col in v["additionalPrinterColumns"]]
    for name in ("Model", "Quant", "Backend", "GPU layers", "Context", "Memory", "Ready", "Age"):
        assert name in cols
    spec = schema()["properties"]["spec"]
    rules = " ".join(r["rule"] for r in spec["properties"]["model"]["x-kubernetes-validations"])
    assert "size() == 1" in rules and "has(self.quant)" in rules
    args_rule = spec["properties"]["serverArgs"]["x-kubernetes-validations"][0]["rule"]
    assert all(f"'{f}'" in args_rule for f in OWNED_FLAGS)
    assert spec["properties"]["context"]["x-kubernetes-int-or-string"] is True
    assert spec["properties"]["serverArgs"]["maxItems"] and spec["properties"]["serverArgs"]["items"]["maxLength"]


def _validator():
    return jsonschema.Draft7Validator(schema()["properties"]["spec"])


MD_EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if "kind: ModelDeployment" in p.read_text())


def test_examples_exist():
    assert len(MD_EXAMPLES) >= 2


@pytest.mark.parametrize("path", MD_EXAMPLES)
def test_examples_validate(path):
    doc = yaml.safe_load(path.read_text())
    errors = list(_validator().iter_errors(doc["spec"]))
    assert not errors, errors


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q9"}},
        {"model": {"url": "https://x"}, "parallel": 0},
        {"model": {"url": "https://x"}, "backend": "tpu"},
        {"model": {"url": "https://x"}, "replicas": -2},
        {"model": {"url": "https://x"}, "minContext": 1},
        {"model": {"url": "https://x"}, "service": {"port": 70000}},
        {"model": {"url": "ftp://x"}},
        {"model": {"url": "https://x", "sha256": "xyz"}},
        {"model": {"url": "https://x"}, "serverArgs": "--jinja"},
        {},
    ],
)
def test_schema_rejects(spec):
    assert list(_validator().iter_errors(spec))


def test_cli_check(tmp_path, capsys):
    from modelfit.cli import main

    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    assert main(["crd", "--check", "--file", str(stale)]) == 1
    assert main(["crd", "--check"]) == 0
    assert main(["crd"]) == 0
    assert "CustomResourceDefinition" in capsys.readouterr().out


def test_root_rules_refuse_names_that_cannot_make_children():
    import re

    from modelfit import api

    rules = schema()["x-kubernetes-validations"]
    assert [r["rule"] for r in rules] == [
        "self.metadata.name.size() <= 63",
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    ]
    pattern = re.search(r"matches\('(.*)'\)", rules[1]["rule"]).group(1)
    assert pattern == api.NAME_PATTERN and re.fullmatch(pattern, "qwen-0-8b") and not re.fullmatch(pattern, "0qwen")
    assert all("metadata.name" in r["message"] for r in rules)


def test_resource_quantities_are_patterns_in_the_crd():
    from modelfit import api

    res = schema()["properties"]["spec"]["properties"]["resources"]["properties"]
    for key in ("requests", "limits"):
        assert res[key]["additionalProperties"]["pattern"] == api.QUANTITY_PATTERN
