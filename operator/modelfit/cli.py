"""`modelfit` command line: plan, serve, values, crd, run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from . import catalog
from .facts import ModelFacts, facts_from_header
from .gguf_reader import GGUFError, read_gguf
from .nodes import PROFILES, GiB, MiB, NodeFacts, host_facts, parse_quantity, profile
from .sizing import PlanResult, Policy, plan


def load_model(model: str, quant: str | None) -> tuple[ModelFacts, str]:
    """Facts and the path llama-server should load, for a catalog name, a .gguf path or a URL."""
    if model.startswith(("http://", "https://")) or model.endswith(".gguf") or Path(model).is_file():
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


def _ctx(value: str) -> int | str:
    return "max" if value == "max" else int(value)


def node_from_args(args: argparse.Namespace) -> NodeFacts:
    node = profile(args.node) if args.node != "host" else host_facts()
    if args.cpus is not None:
        node.cpu_millis = int(float(args.cpus) * 1000)
    if args.memory is not None:
        node.memory_bytes = int(parse_quantity(args.memory))
    if args.gpus is not None:
        node.gpus = args.gpus
        if node.gpus and node.gpu_vendor == "none":
            node.gpu_vendor = "nvidia"
    if args.gpu_memory is not None:
        node.gpu_memory_bytes = int(parse_quantity(args.gpu_memory))
        if node.gpus == 0:
            node.gpus, node.gpu_vendor = 1, "nvidia"
    return node


def policy_from_args(args: argparse.Namespace) -> Policy:
    kw: dict[str, Any] = {}
    if args.context is not None:
        kw["context"] = _ctx(args.context)
    for name in ("parallel", "min_context", "ubatch"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if args.kv_cache_type:
        kw["kv_cache_type"] = args.kv_cache_type
    if args.load_mode:
        kw["load_mode"] = args.load_mode
    if args.flash_attention:
        kw["flash_attention"] = args.flash_attention
    if args.cache_ram is not None:
        kw["cache_ram_mib"] = args.cache_ram
    if args.backend:
        kw["backend"] = args.backend
    if args.gpu_layers is not None:
        kw["gpu_layers"] = "auto" if args.gpu_layers == "auto" else int(args.gpu_layers)
    if getattr(args, "port", None) is not None:
        kw["port"] = args.port
    return Policy(**kw)


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


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GB"


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


def table(facts: ModelFacts, node: NodeFacts, res: PlanResult) -> str:
    p, m = res.plan, res.memory
    vram_avail = node.gpu_memory_bytes * node.gpus if p.backend != "cpu" else 0
    rows = [
        ("Model", f"{facts.name} ({facts.architecture}, {facts.parameters / 1e9:.2f}B params)"),
        ("Model size", _gb(facts.file_bytes)),
        ("VRAM available", _gb(vram_avail)),
        ("VRAM used", _gb(sum(m.vram_bytes))),
        ("System RAM", _gb(node.memory_bytes) if node.memory_bytes is not None else "not given (reporting needs)"),
        ("Min RAM required", _gb(res.memory_request_bytes)),
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
        ("RSS with the context full", _mib(m.full_context_bytes)),
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


def _add_plan_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="catalog name, .gguf path or http(s) URL")
    sp.add_argument("--quant", help="quantization for catalog models (Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16)")
    sp.add_argument("--node", default="cpu", help=f"hardware profile: {', '.join(PROFILES)} or host")
    sp.add_argument("--cpus", help="allocatable CPUs (e.g. 2 or 1.5)")
    sp.add_argument("--memory", help="allocatable memory (e.g. 4Gi); without it, report what the model needs")
    sp.add_argument("--gpus", type=int)
    sp.add_argument("--gpu-memory", help="memory per GPU (e.g. 24Gi)")
    sp.add_argument("--context", help="context size or 'max'")
    sp.add_argument("--min-context", type=int)
    sp.add_argument("--parallel", type=int)
    sp.add_argument("--ubatch", type=int)
    sp.add_argument("--kv-cache-type", choices=["auto", "f16", "q8_0", "q4_0"])
    sp.add_argument("--load-mode", choices=["auto", "mmap", "none", "mlock"])
    sp.add_argument("--flash-attention", choices=["auto", "on", "off"])
    sp.add_argument("--cache-ram", type=int, help="prompt cache budget in MiB (counted in the memory request)")
    sp.add_argument("--backend", choices=["auto", "cpu", "cuda", "rocm", "vulkan"])
    sp.add_argument("--gpu-layers")


def cmd_plan(args: argparse.Namespace) -> int:
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


def find_llama_server() -> str | None:
    env = os.environ.get("MODELFIT_LLAMA_BIN")
    if env and (Path(env) / "llama-server").exists():
        return str(Path(env) / "llama-server")
    try:
        from .synth import llama_bin

        return str(llama_bin("llama-server"))
    except Exception:  # noqa: BLE001 - fall back to PATH
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
    if args.dry_run:
        print(" ".join([binary, *res.plan.args]))
        return 0
    os.execv(binary, [binary, *res.plan.args])
    return 0  # pragma: no cover


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modelfit", description="Right-size llama-server for GGUF models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("plan", help="plan llama-server flags and memory for a model on a node")
    _add_plan_options(sp)
    sp.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    sp.set_defaults(func=cmd_plan)

    ss = sub.add_parser("serve", help="plan for this machine and run llama-server")
    _add_plan_options(ss)
    ss.add_argument("--port", type=int, default=8080)
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


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except (GGUFError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"modelfit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
