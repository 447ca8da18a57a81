"""`modelfit values`: the helmfile state values for one model, quantization and node profile.

    helmfile --state-values-file <(modelfit values qwen3.5-0.8b --quant q4_0 --node cpu) apply

The output has four parts, read by ``helmfile.yaml`` at the repository root:

- ``name`` and ``namespace``: the model's release (and ModelDeployment) and where it runs;
- ``operator``: whether to install ``charts/modelfit`` and its values;
- ``modelDeployment``: the values of ``charts/modeldeployment`` (the ModelDeployment spec);
- ``expectedPlan``: where the operator's placement (``placement.place``, the same call as its
  reconcile) puts the ModelDeployment on a cluster of the named node profile (backend, GPU
  layers, context, memory request, llama-server args; ``fits: false`` with the reason when it
  does not fit, e.g. an explicit context without ``adapt``). Informational: the operator plans
  from the live nodes and writes its own plan to ``status.plan``; the chart records this one in
  the ``modelfit.io/expected-plan`` annotation so the two can be compared, and
  ``modelfit plan -f`` places the rendered manifest the same way.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Literal, cast

import yaml

from . import catalog
from .api import ModelDeploymentSpec
from .cli import (
    CACHE_RAM_HELP,
    KV_CACHE_TYPE_HELP,
    cache_ram_arg,
    catalog_facts_cached,
    check_min_context,
    checked,
    context_arg,
    gpu_layers_arg,
    load_model,
    min_context_arg,
    parallel_arg,
    quant_arg,
    replicas_arg,
    threads_arg,
)
from .facts import ModelFacts
from .nodes import PROFILES, NodeFacts, profile
from .placement import Placement, place
from .render import model_file
from .sizing import PlanResult

_DNS = re.compile(r"[^a-z0-9]+")


def release_name(model: str) -> str:
    """A DNS-1123 label for a model: ``qwen3.5-0.8b`` -> ``qwen3-5-0-8b`` (the seed's slug)."""
    base = model.rsplit("/", 1)[-1].split("?", 1)[0]
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    slug = _DNS.sub("-", base.lower()).strip("-")[:63].rstrip("-")
    return slug or "model"


def model_source(model: str, quant: str | None) -> dict[str, Any]:
    """The ``model`` section of the ModelDeployment: a catalog entry or a URL."""
    if model.startswith(("http://", "https://")):
        return {"url": model}
    key = catalog.resolve_name(model)
    if key is None:
        raise KeyError(f"{model!r} is neither a catalog model ({', '.join(sorted(catalog.MODELS))}) nor an http(s) URL")
    return {"catalog": key, "quant": catalog.normalize_quant(quant or "Q4_K_M")}


def expected_plan(res: PlanResult, node: NodeFacts, placement: Placement | None = None) -> dict[str, Any]:
    """The camelCase summary of a plan that the values file carries."""
    p = res.plan
    out: dict[str, Any] = {
        "nodeProfile": node.name,
        "backend": p.backend,
        "gpuLayers": p.gpu_layers,
        "totalLayers": p.total_layers,
        "context": p.context,
        "parallel": p.parallel,
        "kvCacheType": p.kv_cache_type,
        "loadMode": p.load_mode,
        "flashAttention": p.flash_attention,
        "threads": p.threads,
        "cacheRamMib": p.cache_ram_mib,
        "memoryRequest": res.resources.requests["memory"],
        "memoryRequestBytes": res.memory_request_bytes,
        "predictedPeakBytes": res.memory.total_bytes,
        "vramBytes": sum(res.memory.vram_bytes),
        "resources": res.resources.model_dump(),
        "fits": res.fits,
        "shortfallBytes": res.shortfall_bytes,
        "args": list(p.args),
        "reasons": list(res.reasons),
        "warnings": list(res.warnings),
    }
    if placement is not None:
        out["reason"], out["message"] = placement.reason, placement.message
    return out


def state_values(
    model: str,
    quant: str | None = None,
    node: str = "cpu",
    *,
    context: int | Literal["max"] = "max",
    namespace: str = "default",
    name: str | None = None,
    min_context: int | None = None,
    parallel: int | None = None,
    replicas: int | None = None,
    backend: str | None = None,
    gpu_layers: int | Literal["auto"] | None = None,
    kv_cache_type: str | None = None,
    load_mode: str | None = None,
    flash_attention: str | None = None,
    prompt_cache: int | Literal["auto"] | None = None,
    threads: int | Literal["auto"] | None = None,
    adapt: bool | None = None,
    install_operator: bool = True,
    operator_values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The helmfile state values (a plain dict, ready for YAML)."""
    source = model_source(model, quant)
    facts: ModelFacts
    if "catalog" in source:
        facts = catalog_facts_cached(source["catalog"], source["quant"])
    else:
        facts, _ = load_model(model, None)
    node_facts = profile(node)
    spec: dict[str, Any] = {"model": source, "nodeProfile": node_facts.name, "context": context}
    for key, value in (
        ("minContext", min_context),
        ("parallel", parallel),
        ("backend", backend),
        ("gpuLayers", gpu_layers),
        ("kvCacheType", kv_cache_type),
        ("loadMode", load_mode),
        ("flashAttention", flash_attention),
        ("promptCache", prompt_cache),
        ("threads", threads),
        ("replicas", replicas),
        ("adapt", adapt),
    ):
        if value is not None:
            spec[key] = value
    # The operator's own call (handlers._place): the spec as the CRD reads it, one node of the profile.
    md = ModelDeploymentSpec.model_validate({k: v for k, v in spec.items() if k != "nodeProfile"})
    placed = place(md, facts, [node_facts], model_file(md, facts.file_bytes).path, 0.0)
    assert placed.result is not None  # one node without taints or labels: always eligible, always planned
    return {
        "name": name or release_name(model),
        "namespace": namespace,
        "operator": {"enabled": install_operator, "values": operator_values or {}},
        "modelDeployment": spec,
        "expectedPlan": expected_plan(placed.result, node_facts, placed),
    }


def render(values: dict[str, Any], command: str) -> str:
    header = (
        f"# Generated by: {command}\n"
        "# Use: helmfile --state-values-file <this file> apply   (from the modelfit repository root)\n"
    )
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False, width=1000)


def _operator_values(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.operator_image:
        repo, _, tag = cast(str, args.operator_image).rpartition(":")
        if not repo or "/" in tag:
            repo, tag = args.operator_image, ""
        out["image"] = {"repository": repo, "pullPolicy": "IfNotPresent"}
        if tag:
            out["image"]["tag"] = tag
    if args.watch_namespace:
        out["watchNamespaces"] = list(args.watch_namespace)
    return out


def cmd_values(args: argparse.Namespace) -> int:
    check_min_context(args.context, args.min_context)
    values = state_values(
        args.model,
        args.quant,
        args.node,
        context=args.context,
        namespace=args.namespace,
        name=args.name,
        min_context=args.min_context,
        parallel=args.parallel,
        replicas=args.replicas,
        backend=args.backend,
        gpu_layers=args.gpu_layers,
        kv_cache_type=args.kv_cache_type,
        load_mode=args.load_mode,
        flash_attention=args.flash_attention,
        prompt_cache=args.cache_ram,
        threads=args.threads,
        adapt=args.adapt,
        install_operator=not args.no_operator,
        operator_values=_operator_values(args),
    )
    quant = values["modelDeployment"]["model"].get("quant")
    what = f"modelfit values {args.model}" + (f" --quant {quant}" if quant else "") + f" --node {args.node}"
    sys.stdout.write(render(values, what))
    ep = values["expectedPlan"]
    if not ep["fits"]:
        print(f"modelfit: warning: does not fit {args.node}: {ep['reason']}: {ep['message']}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``modelfit values`` to the CLI's subparsers."""
    sp: argparse.ArgumentParser = sub.add_parser(
        "values",
        help="print helmfile state values for a model, quantization and node profile",
        description="Print the helmfile state values (operator, ModelDeployment, expected plan) for a model. "
        "Use: helmfile --state-values-file <(modelfit values MODEL --quant Q --node PROFILE) apply",
    )
    sp.add_argument("model", help="catalog name (e.g. qwen3.5-0.8b) or http(s) URL of a .gguf")
    sp.add_argument(
        "--quant",
        type=checked(quant_arg),
        help=f"quantization of a catalog model, any case ({', '.join(catalog.RECIPES)}; default Q4_K_M)",
    )
    sp.add_argument("--node", default="cpu", choices=list(PROFILES), help="hardware profile the plan expects")
    sp.add_argument(
        "--context",
        default="max",
        type=checked(context_arg),
        help="context size in tokens, 256 to 16777216, or max for the model's full context (default: max)",
    )
    sp.add_argument("--min-context", type=checked(min_context_arg), help="256 to 16777216 (at most --context)")
    sp.add_argument("--parallel", type=checked(parallel_arg), help="parallel slots, 1 to 256")
    sp.add_argument("--replicas", type=checked(replicas_arg), help="llama-server pods, 0 to 1000")
    sp.add_argument("--backend", choices=["auto", "cpu", "cuda", "rocm", "vulkan"])
    sp.add_argument("--gpu-layers", type=checked(gpu_layers_arg), help="layers on the GPU, 0 to 1000, or auto")
    sp.add_argument("--kv-cache-type", choices=["auto", "f16", "q8_0", "q4_0"], help=KV_CACHE_TYPE_HELP)
    sp.add_argument("--load-mode", choices=["auto", "mmap", "none", "mlock"])
    sp.add_argument("--flash-attention", choices=["auto", "on", "off"])
    sp.add_argument("--cache-ram", "--prompt-cache", dest="cache_ram", type=checked(cache_ram_arg), help=CACHE_RAM_HELP)
    sp.add_argument(
        "--threads", type=checked(threads_arg), help="llama-server threads and CPU request, 1 to 1024, or auto"
    )
    sp.add_argument(
        "--adapt", action=argparse.BooleanOptionalAction, default=None, help="let the operator shrink the plan to fit"
    )
    sp.add_argument("-n", "--namespace", default="default", help="namespace of the ModelDeployment")
    sp.add_argument("--name", help="release and ModelDeployment name (default: from the model)")
    sp.add_argument("--no-operator", action="store_true", help="do not install the operator chart (already installed)")
    sp.add_argument("--operator-image", help="operator image, REPOSITORY[:TAG]")
    sp.add_argument(
        "--watch-namespace", action="append", help="namespace the operator watches (repeatable; default: all)"
    )
    sp.set_defaults(func=cmd_values)
