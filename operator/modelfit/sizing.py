"""The planner: model facts + node facts + policy -> llama-server flags and pod resources.

Pure: no I/O. The choices, in order: backend (the node's GPU, else CPU), GPU
layers (as many as GPU memory holds), context (the largest up to the request
that fits), KV type (f16, else q8_0; q4_0 measurably degrades answers and is
used only when asked for; flash attention is on for a quantized cache), load
mode (the lower resident memory), threads from the CPU limit, and last the
prompt cache (``--cache-ram``) from the memory the plan leaves free. llama.cpp's
own ``--fit`` never sees a pod's cgroup limit, so the plan turns it off and sets
every flag that decides memory itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .facts import ModelFacts
from .memory import (
    GPU_DEVICE_OVERHEAD,
    KVType,
    LoadMode,
    MemoryBreakdown,
    ServerConfig,
    estimate,
    prompt_state_bytes,
    seq_state_bytes,
)
from .nodes import MiB, NodeFacts, format_cpu, format_memory

Auto = Literal["auto"]
# kvCacheType auto: full precision, else q8_0 (close to f16 in answer quality). q4_0 measurably
# degrades answers, so it is never chosen for the user: only an explicit kvCacheType q4_0 uses it.
KV_AUTO: list[KVType] = ["f16", "q8_0"]
KV_OPT_IN: KVType = "q4_0"
MIN_CONTEXT_DEFAULT = 4096
CTX_STEP = 256

# promptCache auto (llama-server --cache-ram, MiB of host RAM for saved slot states): room for
# PROMPT_CACHE_STATES full-context states of one slot, so a conversation that lost its slot to
# another resumes without reprocessing its prompt; at most PROMPT_CACHE_FREE_SHARE of the node
# memory the rest of the plan leaves free and llama-server's own default; 0 when that would not
# hold one PROMPT_CACHE_MIN_TOKENS-token prompt (memory is short).
PROMPT_CACHE_STATES = 2
PROMPT_CACHE_FREE_SHARE = 0.25
PROMPT_CACHE_UPSTREAM_MIB = 8192  # llama-server's default --cache-ram (common.h cache_ram_mib)
PROMPT_CACHE_MIN_TOKENS = 4096
PROMPT_CACHE_MAX_MIB = 1 << 20  # 1 TiB, as spec.promptCache and --cache-ram accept


class Policy(BaseModel):
    """What the user asks for; `auto` leaves the choice to the planner."""

    context: int | Literal["max"] = "max"
    min_context: int = MIN_CONTEXT_DEFAULT
    parallel: int = Field(default=1, ge=1, le=256)
    kv_cache_type: KVType | Auto = "auto"  # auto: f16, else q8_0; q4_0 only when named
    load_mode: LoadMode | Auto = "auto"
    flash_attention: Literal["auto", "on", "off"] = "auto"
    backend: Literal["auto", "cpu", "cuda", "rocm", "vulkan"] = "auto"
    gpu_layers: int | Auto = "auto"
    ubatch: int = Field(default=512, ge=16, le=8192)
    threads: int | Auto = "auto"
    # --cache-ram in MiB; auto: sized from the model and the memory the plan leaves free
    cache_ram_mib: Annotated[int, Field(ge=0, le=PROMPT_CACHE_MAX_MIB)] | Auto = "auto"
    ctx_checkpoints: int | Auto = "auto"
    headroom: float = Field(default=0.05, ge=0, le=1)  # fraction added to the request
    headroom_bytes: int = 64 * MiB
    gpu_margin_bytes: int = 256 * MiB
    repack: bool = True
    port: int = 8080
    host: str = "0.0.0.0"
    metrics: bool = True


def spec_policy(
    *,
    context: int | Literal["max"] | None = None,
    min_context: int | None = None,
    parallel: int | None = None,
    kv_cache_type: str | None = None,
    load_mode: str | None = None,
    flash_attention: str | None = None,
    backend: str | None = None,
    gpu_layers: int | str | None = None,
    prompt_cache: int | str | None = None,
    relaxed: bool = False,
    **extra: Any,
) -> Policy:
    """The planner's Policy from the spec's words; None keeps the default.

    One translation for the operator (``placement.policy_for``), ``modelfit plan``/``serve``
    and ``modelfit values``, so they plan alike. ``prompt_cache`` is spec.promptCache (auto or
    MiB, 0 = off). ``relaxed`` is adapt's second try: backend, GPU layers and KV type are
    freed, but q4_0 KV stays opt-in -- an explicit q4_0 is kept, anything else becomes auto.
    """
    fields: dict[str, Any] = {
        "context": context,
        "min_context": min_context,
        "parallel": parallel,
        "kv_cache_type": kv_cache_type,
        "load_mode": load_mode,
        "flash_attention": flash_attention,
        "backend": backend,
        "gpu_layers": gpu_layers,
        "cache_ram_mib": prompt_cache,
        **extra,
    }
    if relaxed:
        fields.update(
            backend="auto",
            gpu_layers="auto",
            kv_cache_type=KV_OPT_IN if kv_cache_type == KV_OPT_IN else "auto",
        )
    return Policy(**{k: v for k, v in fields.items() if v is not None})


class Plan(BaseModel):
    backend: str
    gpu_layers: int
    total_layers: int
    context: int
    parallel: int
    load_mode: LoadMode
    flash_attention: bool
    kv_cache_type: KVType
    threads: int
    ubatch: int
    cache_ram_mib: int
    ctx_checkpoints: int
    args: list[str]
    node: str


class Resources(BaseModel):
    requests: dict[str, str]
    limits: dict[str, str]


class PlanResult(BaseModel):
    """Everything the CLI prints and the operator writes to status."""

    plan: Plan
    memory: MemoryBreakdown
    resources: Resources
    fits: bool
    shortfall_bytes: int = 0
    reasons: list[str]
    warnings: list[str] = Field(default_factory=list)
    memory_request_bytes: int = 0
    cache_free_request_bytes: int = 0  # the memory request with --cache-ram 0: the least this plan runs in


def _backend(policy: Policy, node: NodeFacts) -> str:
    if policy.backend != "auto":
        return policy.backend
    if node.gpus > 0 and node.gpu_memory_bytes > 0:
        return {"nvidia": "cuda", "amd": "rocm", "intel": "vulkan"}.get(node.gpu_vendor, "vulkan")
    return "cpu"


def _threads(policy: Policy, node: NodeFacts) -> int:
    if policy.threads != "auto":
        return max(1, policy.threads)
    return max(1, node.cpu_millis // 1000)


def _request(policy: Policy, total: int) -> int:
    return int(total * (1 + policy.headroom)) + policy.headroom_bytes


def _checkpoints(policy: Policy, facts: ModelFacts) -> int:
    if policy.ctx_checkpoints != "auto":
        return policy.ctx_checkpoints
    # Recurrent and sliding-window caches cannot roll back: one checkpoint per slot
    # lets the next turn of a chat reuse its prompt. Plain attention needs none.
    return 1 if facts.has_recurrent or facts.has_swa else 0


def build_args(facts: ModelFacts, cfg: ServerConfig, policy: Policy, model_path: str, threads: int) -> list[str]:
    """The complete llama-server argument list for a config."""
    args = [
        "-m",
        model_path,
        "--host",
        policy.host,
        "--port",
        str(policy.port),
        "-c",
        str(cfg.n_ctx),
        "-np",
        str(cfg.n_parallel),
        "--kv-unified" if cfg.kv_unified else "--no-kv-unified",
        "-b",
        str(cfg.n_batch),
        "-ub",
        str(cfg.n_ubatch),
        "-t",
        str(threads),
        "-fa",
        "on" if cfg.flash_attn else "off",
        "-ctk",
        cfg.type_k,
        "-ctv",
        cfg.type_v,
        "-ngl",
        str(cfg.n_gpu_layers),
        "--load-mode",
        cfg.load_mode,
        "--cache-ram",
        str(cfg.cache_ram_mib),
        "-ctxcp",
        str(cfg.ctx_checkpoints),
        "--fit",
        "off",
    ]
    if not cfg.repack:
        args.append("--no-repack")
    if policy.metrics:
        args.append("--metrics")
    return args


OWNED_FLAGS = {
    "-m",
    "--model",
    "--host",
    "--port",
    "-c",
    "--ctx-size",
    "-np",
    "--parallel",
    "--kv-unified",
    "-kvu",
    "--no-kv-unified",
    "-no-kvu",
    "-b",
    "--batch-size",
    "-ub",
    "--ubatch-size",
    "-t",
    "--threads",
    "-fa",
    "--flash-attn",
    "-ctk",
    "--cache-type-k",
    "-ctv",
    "--cache-type-v",
    "-ngl",
    "--gpu-layers",
    "--n-gpu-layers",
    "--load-mode",
    "-lm",
    "--mmap",
    "--no-mmap",
    "--mlock",
    "--cache-ram",
    "-cram",
    "-ctxcp",
    "--ctx-checkpoints",
    "--swa-checkpoints",
    "--fit",
    "-fit",
    "--no-repack",
    "-nr",
    "--repack",
    "--swa-full",
    "-hf",
    "--hf-repo",
    "-mu",
    "--model-url",
}


class _Candidate(BaseModel):
    cfg: ServerConfig
    mem: MemoryBreakdown
    host_need: int
    gpu_need: int


def _evaluate(facts: ModelFacts, cfg: ServerConfig, policy: Policy) -> _Candidate:
    mem = estimate(facts, cfg)
    gpu_need = max(mem.vram_bytes) if mem.vram_bytes else 0
    return _Candidate(cfg=cfg, mem=mem, host_need=_request(policy, mem.full_context_bytes), gpu_need=gpu_need)


def _fits(c: _Candidate, node: NodeFacts, policy: Policy) -> bool:
    host_ok = node.memory_bytes is None or c.host_need <= node.memory_bytes
    gpu_ok = c.cfg.n_gpus == 0 or c.gpu_need + policy.gpu_margin_bytes <= node.gpu_memory_bytes
    return host_ok and gpu_ok


def _largest_context(
    facts: ModelFacts, base: ServerConfig, policy: Policy, node: NodeFacts, lo: int, hi: int
) -> _Candidate | None:
    """Largest context in [lo, hi] (multiples of 256) that fits; binary search, memory grows with context."""
    lo_c = _evaluate(facts, base.model_copy(update={"n_ctx": lo}), policy)
    if not _fits(lo_c, node, policy):
        return None
    hi_c = _evaluate(facts, base.model_copy(update={"n_ctx": hi}), policy)
    if _fits(hi_c, node, policy):
        return hi_c
    a, b = lo // CTX_STEP, hi // CTX_STEP
    best = lo_c
    while a < b - 1:
        mid = (a + b) // 2
        c = _evaluate(facts, base.model_copy(update={"n_ctx": mid * CTX_STEP}), policy)
        if _fits(c, node, policy):
            a, best = mid, c
        else:
            b = mid
    return best


def _kv_reason(facts: ModelFacts, chosen: _Candidate, policy: Policy, fits: bool) -> str:
    """The KV type and its trade-off: what full precision would cost, and why not q4_0."""
    cfg = chosen.cfg
    kv = cfg.type_k

    def costs_more(other: KVType) -> str:
        alt = _evaluate(facts, cfg.model_copy(update={"type_k": other, "type_v": other}), policy)
        more = max(alt.host_need - chosen.host_need, alt.gpu_need - chosen.gpu_need, 0)
        return f"{other} would need {format_memory(more)} more at context {cfg.n_ctx}"

    if policy.kv_cache_type != "auto":
        why = f"KV cache {kv}: as requested"
        if kv == KV_OPT_IN:
            why += f"; q4_0 measurably degrades answers ({costs_more('q8_0')})"
        return why
    if kv == "f16":
        return "KV cache f16: full precision fits" + ("" if fits else " (the model does not fit as it is)")
    return (
        f"KV cache {kv}: {costs_more('f16')}; q8_0 costs little answer quality, q4_0 is not used "
        f"unless kvCacheType {KV_OPT_IN} allows it; quantized KV needs flash attention"
    )


def _auto_prompt_cache(facts: ModelFacts, chosen: _Candidate, policy: Policy, node: NodeFacts) -> tuple[int, str]:
    """promptCache auto: (MiB, reason). See PROMPT_CACHE_* for the rule."""
    cfg = chosen.cfg
    state = seq_state_bytes(facts, cfg)
    mib = max(1, -(-PROMPT_CACHE_STATES * state // MiB))
    why = f"{PROMPT_CACHE_STATES} full-context states of one slot ({PROMPT_CACHE_STATES} x {format_memory(state)})"
    if mib > PROMPT_CACHE_UPSTREAM_MIB:
        full = format_memory(PROMPT_CACHE_STATES * state)
        mib, why = PROMPT_CACHE_UPSTREAM_MIB, f"llama-server's default cap ({PROMPT_CACHE_STATES} full states: {full})"
    if node.memory_bytes is not None:
        free = max(node.memory_bytes - chosen.host_need, 0)
        share = int(free * PROMPT_CACHE_FREE_SHARE / (1 + policy.headroom)) // MiB
        if share < mib:
            mib, why = share, f"a quarter of the {format_memory(free)} the plan leaves free on the node"
    floor = prompt_state_bytes(facts, cfg, PROMPT_CACHE_MIN_TOKENS)
    if mib * MiB < floor:
        tokens = min(PROMPT_CACHE_MIN_TOKENS, cfg.n_ctx)
        return 0, (
            f"prompt cache off (--cache-ram 0): memory is short; {why} ({format_memory(mib * MiB)}) would not "
            f"hold one {tokens}-token prompt ({format_memory(floor)})"
        )
    return mib, (
        f"prompt cache {mib} MiB (--cache-ram): {why}; a conversation that lost its slot resumes without "
        "reprocessing its prompt; counted in the memory limit, filled only as prompts are saved"
    )


def plan(
    facts: ModelFacts, node: NodeFacts, policy: Policy | None = None, model_path: str = "/models/model.gguf"
) -> PlanResult:
    """Choose llama-server's flags for a model on a node, and the pod's resources."""
    policy = policy or Policy()
    reasons: list[str] = []
    warnings = list(facts.warnings)
    backend = _backend(policy, node)
    threads = _threads(policy, node)
    n_train = facts.context_length
    target = n_train if policy.context == "max" else min(int(policy.context), n_train)
    if policy.context != "max" and int(policy.context) > n_train:
        warnings.append(f"requested context {policy.context} exceeds the model's trained {n_train}; capped")
    target = max(CTX_STEP, target // CTX_STEP * CTX_STEP) if target >= CTX_STEP else target
    min_ctx = min(max(policy.min_context, 1), target)
    min_ctx = max(CTX_STEP, min_ctx // CTX_STEP * CTX_STEP) if min_ctx >= CTX_STEP else min_ctx

    gpus = node.gpus if backend != "cpu" else 0
    if backend != "cpu" and gpus == 0:
        warnings.append(f"backend {backend} requested but the node has no GPU; planned on CPU")
        backend, gpus = "cpu", 0
    fa_forced_off = policy.flash_attention == "off"
    kv_types: list[KVType] = list(KV_AUTO) if policy.kv_cache_type == "auto" else [policy.kv_cache_type]
    if fa_forced_off:
        kv_types = [t for t in kv_types if t in ("f16", "f32", "bf16")] or ["f16"]
        if policy.kv_cache_type not in ("auto", "f16", "f32", "bf16"):
            warnings.append("a quantized V cache needs flash attention; using f16 because flash attention is off")

    load_modes: list[LoadMode] = ["mmap", "none"] if policy.load_mode == "auto" else [policy.load_mode]
    total_units = facts.n_layer + 1
    layer_options: list[int]
    if gpus == 0:
        layer_options = [0]
    elif policy.gpu_layers != "auto":
        layer_options = [min(int(policy.gpu_layers), total_units)]
    else:
        layer_options = list(range(total_units, -1, -1))

    base = ServerConfig(
        n_ctx=target,
        n_parallel=policy.parallel,
        n_ubatch=policy.ubatch,
        flash_attn=not fa_forced_off,
        n_gpus=gpus,
        backend=backend,
        cpu_arch=node.cpu_arch,
        cpu_features=node.cpu_features,
        repack=policy.repack,
        cache_ram_mib=0 if policy.cache_ram_mib == "auto" else policy.cache_ram_mib,
        ctx_checkpoints=_checkpoints(policy, facts),
    )

    def best_for(kv: KVType, ngl: int) -> _Candidate | None:
        best: _Candidate | None = None
        for lm in load_modes:
            cfg = base.model_copy(update={"type_k": kv, "type_v": kv, "n_gpu_layers": ngl, "load_mode": lm})
            c = _largest_context(facts, cfg, policy, node, min_ctx, target)
            if c is None:
                continue
            if (
                best is None
                or c.cfg.n_ctx > best.cfg.n_ctx
                or (c.cfg.n_ctx == best.cfg.n_ctx and c.mem.total_bytes < best.mem.total_bytes)
            ):
                best = c
        return best

    chosen: _Candidate | None = None
    # 1. Most GPU layers first (layers beat context on a GPU node), then f16 before quantized KV
    #    at the full target context; 2. else the longest context any option reaches.
    fallback: _Candidate | None = None
    for ngl in layer_options:
        for kv in kv_types:
            c = best_for(kv, ngl)
            if c is None:
                continue
            if c.cfg.n_ctx >= target:
                chosen = c
                break
            if fallback is None or c.cfg.n_ctx > fallback.cfg.n_ctx:
                fallback = c
        if chosen is not None:
            break
        if fallback is not None and gpus and fallback.cfg.n_gpu_layers == ngl and ngl == total_units:
            # full offload at a shorter context beats partial offload at a longer one only when
            # the shorter context still meets the minimum, which _largest_context guarantees
            chosen = fallback
            break
    if chosen is None:
        chosen = fallback

    fits = chosen is not None
    if chosen is None:
        # Nothing fits: report the smallest sensible configuration and the shortfall.
        cfg = base.model_copy(
            update={
                "n_ctx": min_ctx,
                "type_k": kv_types[-1],
                "type_v": kv_types[-1],
                "n_gpu_layers": 0 if gpus == 0 else layer_options[-1],
            }
        )
        modes = [_evaluate(facts, cfg.model_copy(update={"load_mode": lm}), policy) for lm in load_modes]
        chosen = min(modes, key=lambda c: c.mem.total_bytes)
        short_host = chosen.host_need - (node.memory_bytes or chosen.host_need)
        short_gpu = (chosen.gpu_need + policy.gpu_margin_bytes - node.gpu_memory_bytes) if gpus else 0
        shortfall = max(short_host, short_gpu, 0)
        why = (
            f"does not fit: even at context {min_ctx} with {kv_types[-1]} KV the pod needs "
            f"{format_memory(chosen.host_need)} but the node offers {format_memory(node.memory_bytes or 0)}"
        )
        if policy.kv_cache_type == "auto" and not fa_forced_off:
            q4 = _evaluate(facts, cfg.model_copy(update={"type_k": KV_OPT_IN, "type_v": KV_OPT_IN}), policy)
            if _fits(q4, node, policy) or any(
                _fits(_evaluate(facts, q4.cfg.model_copy(update={"load_mode": lm}), policy), node, policy)
                for lm in load_modes
            ):
                why += f"; q4_0 KV would fit, but it degrades answers and is used only with kvCacheType {KV_OPT_IN}"
        reasons.append(why)
    else:
        shortfall = 0

    cfg = chosen.cfg
    mem = chosen.mem
    # Reasons, one per choice.
    if backend == "cpu":
        reasons.append("backend cpu: " + ("no GPU on the node" if node.gpus == 0 else "CPU backend requested"))
    else:
        reasons.append(
            f"backend {backend}: {node.gpus}x {node.gpu_vendor} GPU with {format_memory(node.gpu_memory_bytes)} each"
        )
        if cfg.n_gpu_layers >= total_units:
            reasons.append(f"gpu layers {cfg.n_gpu_layers}/{total_units}: the whole model fits in GPU memory")
        else:
            reasons.append(
                f"gpu layers {cfg.n_gpu_layers}/{total_units}: the most that fit in {format_memory(node.gpu_memory_bytes)} "
                f"with {format_memory(policy.gpu_margin_bytes)} spare; the rest run on the CPU"
            )
    if cfg.n_ctx >= target:
        reasons.append(
            f"context {cfg.n_ctx}: " + ("the model's maximum" if policy.context == "max" else "as requested")
        )
    elif fits:
        why = f"context {cfg.n_ctx}: the largest that fits with {cfg.type_k} KV (asked {target}, minimum {min_ctx})"
        if policy.kv_cache_type == "auto" and not fa_forced_off:
            q4c = best_for(KV_OPT_IN, cfg.n_gpu_layers)
            if q4c is not None and q4c.cfg.n_ctx > cfg.n_ctx:
                why += (
                    f"; q4_0 KV would reach {q4c.cfg.n_ctx} but measurably degrades answers "
                    f"(kvCacheType {KV_OPT_IN} allows it)"
                )
        reasons.append(why)
    reasons.append(_kv_reason(facts, chosen, policy, fits))
    reasons.append(
        "flash attention "
        + ("off: as requested" if not cfg.flash_attn else "on: smaller compute buffer, needed for quantized KV")
    )
    if policy.load_mode == "auto":
        if cfg.load_mode == "none":
            reasons.append(
                f"load mode none: the CPU backend repacks {format_memory(mem.repack_bytes)} of weights; "
                "with mmap the file pages would stay resident beside the copy"
            )
        else:
            reasons.append(
                "load mode mmap: weights stay in the page cache, shared and reclaimable; nothing is repacked"
            )
    else:
        reasons.append(f"load mode {cfg.load_mode}: as requested")
    reasons.append(
        f"threads {threads}: from the CPU limit ({format_cpu(node.cpu_millis)}), never the host's core count"
    )
    cache_free_request = _request(policy, mem.full_context_bytes - mem.cache_ram_bytes)
    if policy.cache_ram_mib == "auto" and fits:
        mib, why = _auto_prompt_cache(facts, chosen, policy, node)
        if mib:
            with_cache = _evaluate(facts, cfg.model_copy(update={"cache_ram_mib": mib}), policy)
            if _fits(with_cache, node, policy):
                chosen, cfg, mem = with_cache, with_cache.cfg, with_cache.mem
            else:  # cannot happen: the budget is a share of the free memory; never trade the plan for it
                mib, why = 0, "prompt cache off (--cache-ram 0): memory is short"
        if mib:
            why += f" (promptCache 0 would make the memory request {format_memory(cache_free_request)})"
        reasons.append(why)
    elif policy.cache_ram_mib == "auto":
        reasons.append("prompt cache off (--cache-ram 0): the model does not fit as it is")
    elif cfg.cache_ram_mib == 0:
        reasons.append("prompt cache off (--cache-ram 0): as requested")
    else:
        reasons.append(
            f"prompt cache {cfg.cache_ram_mib} MiB (--cache-ram): as requested; counted in the memory limit "
            f"(one full-context state of a slot is {format_memory(seq_state_bytes(facts, cfg))})"
        )

    request = _request(policy, mem.full_context_bytes)
    cpu_req = max(1000, threads * 1000)
    resources = Resources(
        requests={"cpu": format_cpu(cpu_req), "memory": format_memory(request)},
        limits={"memory": format_memory(request)},
    )
    if backend == "cuda" and gpus:
        resources.requests["nvidia.com/gpu"] = str(gpus)
        resources.limits["nvidia.com/gpu"] = str(gpus)
    elif backend == "rocm" and gpus:
        resources.requests["amd.com/gpu"] = str(gpus)
        resources.limits["amd.com/gpu"] = str(gpus)

    threads_arg = threads
    args = build_args(facts, cfg, policy, model_path, threads_arg)
    p = Plan(
        backend=backend,
        gpu_layers=cfg.n_gpu_layers,
        total_layers=total_units,
        context=cfg.n_ctx,
        parallel=cfg.n_parallel,
        load_mode=cfg.load_mode,
        flash_attention=cfg.flash_attn,
        kv_cache_type=cfg.type_k,
        threads=threads,
        ubatch=cfg.n_ubatch,
        cache_ram_mib=cfg.cache_ram_mib,
        ctx_checkpoints=cfg.ctx_checkpoints,
        args=args,
        node=node.name,
    )
    return PlanResult(
        plan=p,
        memory=mem,
        resources=resources,
        fits=fits,
        shortfall_bytes=shortfall,
        reasons=reasons,
        warnings=warnings,
        memory_request_bytes=request,
        cache_free_request_bytes=cache_free_request,
    )


__all__ = ["GPU_DEVICE_OVERHEAD", "OWNED_FLAGS", "Plan", "PlanResult", "Policy", "Resources", "plan"]
