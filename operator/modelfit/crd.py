"""The ModelDeployment CRD, generated from the pydantic models in ``api.py``.

Pydantic's JSON schema is turned into a structural OpenAPI v3 schema: ``$ref``
inlined, ``anyOf [X, null]`` collapsed to ``X``, ``int | "max"`` to
``x-kubernetes-int-or-string``, free-form objects to
``x-kubernetes-preserve-unknown-fields``, titles dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import api

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modelfit.io_modeldeployments.yaml"
_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        for key in ("description", "x-kubernetes-validations"):
            if key in node:
                out[key] = node[key]
        out["x-kubernetes-int-or-string"] = True
        default = node.get("default")
        if default is not None:
            out["default"] = default
        return out
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']} structurally; mark it int-or-string")
        merged = {**{k: v for k, v in node.items() if k not in ("anyOf", "default")}, **options[0]}
        if "description" in node:
            merged["description"] = node["description"]
        if node.get("default") is not None:
            merged["default"] = node["default"]
        return _structural(merged, defs)
    if "const" in node and "enum" not in node:
        node = {**node, "enum": [node["const"]]}
    for key, value in node.items():
        if key in _DROP or key == "const":
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    ap = node.get("additionalProperties")
    if out.get("type") == "object" and "properties" not in out:
        if isinstance(ap, dict) and ap:
            out["additionalProperties"] = _structural(ap, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array" and out.get("items", {}) == {}:
        out["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if isinstance(out.get("default"), (dict, list)) and not out["default"]:
        del out["default"]
    return out


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    return _structural(raw, raw.get("$defs", {}))


def _strip_defaults(node: dict[str, Any]) -> None:
    """Status is written by the operator only; apiserver defaults there would only add noise."""
    node.pop("default", None)
    for sub in node.get("properties", {}).values():
        _strip_defaults(sub)
    if isinstance(node.get("items"), dict):
        _strip_defaults(node["items"])


def openapi_schema() -> dict[str, Any]:
    spec = _schema(api.ModelDeploymentSpec)
    status = _schema(api.ModelDeploymentStatus)
    # The operator's status is the only writer; plan fields stay typed, conditions are a map by type.
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    spec["properties"]["serverArgs"]["items"] = {"type": "string", "maxLength": 256}
    _strip_defaults(status)
    return {
        "type": "object",
        "description": api.ModelDeployment.__doc__,
        "required": ["spec"],
        # Rules at the root may read metadata.name: names that cannot make valid children are refused.
        "x-kubernetes-validations": api.NAME_RULES,
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: modelfit.io/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: ModelDeployment."},
            "metadata": {"type": "object"},  # the API server forbids anything else here
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".status.plan.model", "description": "Model name."},
    {"name": "Quant", "type": "string", "jsonPath": ".status.plan.quant", "description": "Quantization."},
    {"name": "Backend", "type": "string", "jsonPath": ".status.plan.backend", "description": "Planned backend."},
    {"name": "GPU layers", "type": "integer", "jsonPath": ".status.plan.gpuLayers", "description": "GPU layers."},
    {"name": "Context", "type": "integer", "jsonPath": ".status.plan.context", "description": "Planned context."},
    {"name": "Memory", "type": "string", "jsonPath": ".status.plan.memoryRequest", "description": "Memory per pod."},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Ready condition.",
    },
    {
        "name": "Node",
        "type": "string",
        "jsonPath": ".status.plan.nodeClass",
        "priority": 1,
        "description": "Node class.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": "modeldeployment",
                "shortNames": ["md"],
                "categories": ["all", "modelfit"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = "# Generated by `modelfit crd` from operator/modelfit/api.py; do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


def cmd_crd(args: argparse.Namespace) -> int:
    text = crd_yaml()
    path = Path(args.file)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is stale; run `modelfit crd --write`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    sys.stdout.write(text)
    return 0


def register(sub: Any) -> None:
    sp = sub.add_parser("crd", help="print the ModelDeployment CRD generated from the API models")
    sp.add_argument("--check", action="store_true", help="fail when the file differs from the generated CRD")
    sp.add_argument("--write", action="store_true", help="write the generated CRD to the file")
    sp.add_argument("--file", default=str(CRD_PATH), help="CRD file (default crds/modelfit.io_modeldeployments.yaml)")
    sp.set_defaults(func=cmd_crd)
