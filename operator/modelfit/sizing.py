"""The planner: model facts + node facts + policy -> llama-server flags and pod resources.

Pure: no I/O. The choices, in order: backend (the node's GPU, else CPU), GPU
layers (as many as GPU memory holds), context (the largest up to the request
that fits), KV type (f16, else q8_0; q4_0 measurably degrades answers and is
used only when asked for; flash attention is on for a quantized cache), load
mode (the lower resident memory), huge pages for the weights the CPU streams
(THP_ENV, in the server's environment), threads from the model and the node's
memory bandwidth (see THREAD_DECODE_BYTES_PER_S), and last the prompt cache
(``--cache-ram``) from the memory the plan leaves free. llama.cpp's
own ``--fit`` never sees a pod's cgroup limit, so the plan turns it off and sets
every flag that decides memory itself.
"""

from __future__ import annotations

import math
import weakref
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from .facts import ModelFacts
from .flags import render_args
from .memory import (
    KVType,
    LoadMode,
    MemoryBreakdown,
    ServerConfig,
    estimate,
    gpu_layer_start,
    output_on_gpu,
    prompt_state_bytes,
    seq_state_bytes,
)
from .nodes import BANDWIDTH_LABEL, MiB, NodeFacts, format_cpu, format_memory, gpu_vendor_info

Auto = Literal["auto"]
# kvCacheType auto: full precision, else q8_0 (close to f16 in answer quality). q4_0 measurably
# degrades answers, so it is never chosen for the user: only an explicit kvCacheType q4_0 uses it.
KV_AUTO: list[KVType] = ["f16", "q8_0"]
KV_OPT_IN: KVType = "q4_0"
MIN_CONTEXT_DEFAULT = 4096
CTX_STEP = 256

# promptCache auto (llama-server --cache-ram, MiB of host RAM for saved slot states). On a shared cluster
# memory is what runs out, so the default must not multiply a small model's request: two full-context
# states of a 262k-token slot made the seed case (qwen3.5 0.8B) request 10.5 GiB instead of 4.1 GiB.
# auto holds PROMPT_CACHE_STATES saved conversations of PROMPT_CACHE_TYPICAL_TOKENS (a long chat;
# the slot's context when shorter), so a conversation that lost its slot to another resumes without
# reprocessing its history; at most PROMPT_CACHE_MODEL_SHARE of the plan's own memory request without
# it, PROMPT_CACHE_FREE_SHARE of the node memory the plan leaves free and llama-server's own default;
# 0 when that would not hold one PROMPT_CACHE_MIN_TOKENS-token prompt. More is opt-in (promptCache MiB).
PROMPT_CACHE_STATES = 2
PROMPT_CACHE_TYPICAL_TOKENS = 8192
PROMPT_CACHE_MODEL_SHARE = 0.25
PROMPT_CACHE_FREE_SHARE = 0.25
PROMPT_CACHE_UPSTREAM_MIB = 8192  # llama-server's default --cache-ram (common.h cache_ram_mib)
PROMPT_CACHE_MIN_TOKENS = 4096
PROMPT_CACHE_MAX_MIB = 1 << 20  # 1 TiB, as spec.promptCache and --cache-ram accept

# threads auto (-t, and the pod's CPU request). Decoding a token streams every weight the CPU holds
# once (decode_bytes_per_token): with t threads it runs at about t x THREAD_DECODE_BYTES_PER_S / bytes
# tokens/s until the node's memory bandwidth caps it at bandwidth / bytes. The plan takes the smallest t
# that reaches the cap, ceil(bandwidth / THREAD_DECODE_BYTES_PER_S), the same for every model held by the
# CPU because both sides scale with its bytes per token; at least MIN_THREADS_DEFAULT (prompt processing
# is compute-bound and scales with threads), at most the node's free whole CPUs; one thread when the GPU
# holds every layer. Nodes do not publish their bandwidth: a node label (nodes.BANDWIDTH_LABEL, GB/s)
# gives it, else MEMORY_BANDWIDTH_DEFAULT. The CPU request is exactly the threads; no CPU limit is set.
# Measured with bench/serving_speed.py and llama-bench (see the issue 9 notes): one thread decodes
# 5.8-8 GB/s of Q4_0 (repacked) or Q8_0 weights on the Xeons measured, while one core copies 19-22 GB/s.
THREAD_DECODE_BYTES_PER_S = 6 * 10**9
MEMORY_BANDWIDTH_DEFAULT = 20 * 10**9  # what a pod may plan on; a few cores of a current server socket
MIN_THREADS_DEFAULT = 2

# Huge pages (Policy.huge_pages). llama.cpp allocates its weight buffers with plain malloc, so where the
# node's transparent huge pages are `madvise` (the usual default) they sit on 4 KiB pages, while an mmap'd
# model file is mapped with 2 MiB pages by current kernels' page cache (large folios): that, not repacking,
# is why --load-mode mmap decoded faster than none (see bench/serving_speed.py, issue 9). glibc's tunable
# makes malloc madvise its large chunks, so the copied and repacked weights get huge pages too. Pages a
# short prompt leaves untouched in the compute buffer become resident with their 2 MiB neighbours: the
# compute reserve that memory.full_context_bytes already counts in the memory request.
THP_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


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
    threads: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"  # auto: see THREAD_DECODE_BYTES_PER_S
    min_threads: int = Field(default=MIN_THREADS_DEFAULT, ge=1, le=1024)  # floor of threads auto, for prompts
    max_threads: int | None = Field(default=None, ge=1)  # the pod's CPU limit in whole cores: more would throttle
    memory_bandwidth_bytes: int = Field(default=MEMORY_BANDWIDTH_DEFAULT, gt=0)  # when the node has no label
    thread_decode_bytes_per_s: int = Field(default=THREAD_DECODE_BYTES_PER_S, gt=0)
    # THP_ENV in the server's environment when the CPU holds weights. Off until the memory model counts the
    # ~15 MiB huge pages add to the peak (measured) and render passes Plan.env to the pod.
    huge_pages: bool = False
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
    env: dict[str, str] = Field(default_factory=dict)  # llama-server's environment beside args (THP_ENV)


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
    cpu_request_millis: int = 0  # = plan.threads x 1000: what the scheduler must find free on the node
    threads_wanted: int = 0  # the thread count the rule (or spec.threads) asks for, before the node's free CPU caps it


def _backend(policy: Policy, node: NodeFacts) -> str:
    if policy.backend != "auto":
        return policy.backend
    if node.gpus > 0 and node.gpu_memory_bytes > 0:
        info = gpu_vendor_info(node.gpu_vendor)
        return info.backend if info else "vulkan"
    return "cpu"


def decode_bytes_per_token(facts: ModelFacts, cfg: ServerConfig) -> int:
    """Weight bytes the CPU reads per generated token: the host's share of everything a dense model uses.

    One row of an untied token embedding (a lookup), the output matrix in full, the active share of
    experts; MTP/nextn blocks are not run. Layers and the output head offloaded to a GPU are not read
    by the CPU (``memory.gpu_layer_start``, ``memory.output_on_gpu``).
    """
    start = gpu_layer_start(facts, cfg)
    head_gpu = output_on_gpu(facts, cfg)
    total = 0
    for t in facts.tensors:
        il = t.layer
        if il is not None and (il >= facts.n_layer or il >= start):
            continue
        n = t.nbytes
        if t.name.startswith("token_embd."):
            if not facts.tied_embeddings or head_gpu:  # a lookup; a GPU head reads its own copy
                n //= max(facts.n_vocab, 1)
        elif t.name.startswith(("output.", "output_norm.")) and head_gpu:
            continue
        elif "_exps." in t.name and facts.n_expert > 0:
            n = n * facts.n_expert_used // facts.n_expert
        total += n
    return total


class _Threads(BaseModel):
    threads: int  # -t and the CPU request in cores
    wanted: int  # before the node's free CPU caps it
    reason: str


def _gbps(bytes_per_s: int) -> str:
    return f"{bytes_per_s / 1e9:.3g}GB/s"  # decimal GB, as the node label; no space: "n GB" reads as GiB here


def _threads(facts: ModelFacts, policy: Policy, node: NodeFacts, cfg: ServerConfig, warnings: list[str]) -> _Threads:
    """The thread count (see THREAD_DECODE_BYTES_PER_S for the rule) and why; a warning when the node lacks the CPU."""
    if policy.threads != "auto":
        wanted, why = policy.threads, "as requested"
    elif cfg.n_gpus > 0 and cfg.backend != "cpu" and cfg.n_gpu_layers > facts.n_layer:
        wanted, why = 1, "the GPU holds every layer and the output; one thread feeds it"
    else:
        per_token = max(decode_bytes_per_token(facts, cfg), 1)
        bandwidth = node.memory_bandwidth_bytes or policy.memory_bandwidth_bytes
        source = f"label {BANDWIDTH_LABEL}" if node.memory_bandwidth_bytes else "policy default, no node label"
        rate = policy.thread_decode_bytes_per_s
        by_bandwidth = max(1, math.ceil(bandwidth / rate))
        wanted = max(by_bandwidth, policy.min_threads)
        why = (
            f"decode reads {per_token / MiB:.0f} MiB of weights per token, one thread streams {_gbps(rate)} "
            f"({rate / per_token:.1f} tokens/s); {by_bandwidth} reach the bound of the node's {_gbps(bandwidth)} "
            f"memory bandwidth ({source}), {bandwidth / per_token:.1f} tokens/s"
        )
        if wanted > by_bandwidth:
            why += f"; at least {policy.min_threads}: prompt processing is compute-bound"
    n = wanted
    if policy.max_threads is not None and n > policy.max_threads:
        n = policy.max_threads
        why += f"; capped by the pod's CPU limit ({n}): more threads than the CFS quota allows only wait"
        if policy.threads != "auto":
            warnings.append(f"threads {policy.threads} exceed the pod's CPU limit; the server runs {n}")
    if policy.threads == "auto" and n * 1000 > node.cpu_millis:
        n = max(1, node.cpu_millis // 1000)
        why += f"; capped by the node's free CPU ({format_cpu(node.cpu_millis)})"
    if n * 1000 > node.cpu_millis:
        warnings.append(
            f"the pod requests {n} CPU but the node has {format_cpu(node.cpu_millis)} free: "
            "the scheduler will not place it there"
        )
    return _Threads(threads=n, wanted=wanted, reason=f"threads {n}: {why}; CPU request {n}, no CPU limit")


def _huge_pages(policy: Policy, space: _Space, cfg: ServerConfig) -> tuple[dict[str, str], list[str]]:
    """The server's environment for huge pages (see THP_ENV), and why; nothing when the GPU holds every weight."""
    if space.backend != "cpu" and cfg.n_gpu_layers >= space.total_units:
        return {}, []
    if not policy.huge_pages:
        return {}, [
            "huge pages off: weight buffers stay on 4 KiB pages unless the node's THP is always (on, they decode "
            "up to 4% faster and peak about 15 MiB higher, which the memory model does not count yet)"
        ]
    return dict(THP_ENV), [
        "huge pages on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): the weights decode streams every token sit on "
        "2 MiB pages, as an mmap'd file's do; the compute buffer's reserve becomes resident, already in the limit"
    ]


def _request(policy: Policy, total: int) -> int:
    return int(total * (1 + policy.headroom)) + policy.headroom_bytes


def _checkpoints(policy: Policy, facts: ModelFacts) -> int:
    if policy.ctx_checkpoints != "auto":
        return policy.ctx_checkpoints
    # Recurrent and sliding-window caches cannot roll back: one checkpoint per slot
    # lets the next turn of a chat reuse its prompt. Plain attention needs none.
    return 1 if facts.has_recurrent or facts.has_swa else 0


def build_args(cfg: ServerConfig, policy: Policy, model_path: str, threads: int) -> list[str]:
    """The complete llama-server argument list for a config (the flag table ``flags.FLAGS`` renders it)."""
    return render_args(
        {
            "model": model_path,
            "host": policy.host,
            "port": policy.port,
            "ctx": cfg.n_ctx,
            "parallel": cfg.n_parallel,
            "kv_unified": cfg.kv_unified,
            "no_kv_unified": not cfg.kv_unified,
            "batch": cfg.n_batch,
            "ubatch": cfg.n_ubatch,
            "threads": threads,
            "flash_attn": "on" if cfg.flash_attn else "off",
            "type_k": cfg.type_k,
            "type_v": cfg.type_v,
            "gpu_layers": cfg.n_gpu_layers,
            "load_mode": cfg.load_mode,
            "cache_ram": cfg.cache_ram_mib,
            "ctx_checkpoints": cfg.ctx_checkpoints,
            "fit": "off",  # llama.cpp's own fitter never sees the pod's cgroup limit: the plan sets every flag
            "no_repack": not cfg.repack,
            "metrics": policy.metrics,
        }
    )


class _Candidate(BaseModel):
    cfg: ServerConfig
    mem: MemoryBreakdown
    host_need: int
    gpu_need: int


_ESTIMATES: dict[int, dict[str, MemoryBreakdown]] = {}  # id(facts) -> ServerConfig JSON -> estimate


def _estimate(facts: ModelFacts, cfg: ServerConfig) -> MemoryBreakdown:
    """``estimate``, remembered per facts object (while it lives) and config: the operator plans the same
    model on the same configs again and again (every reconcile, every node class), and it is pure."""
    per = _ESTIMATES.get(id(facts))
    if per is None:
        per = _ESTIMATES[id(facts)] = {}
        weakref.finalize(facts, _ESTIMATES.pop, id(facts), None)
    key = cfg.model_dump_json()
    mem = per.get(key)
    if mem is None:
        if len(per) >= 4096:
            per.clear()
        mem = per[key] = estimate(facts, cfg)
    return mem.model_copy()


def _evaluate(facts: ModelFacts, cfg: ServerConfig, policy: Policy) -> _Candidate:
    mem = _estimate(facts, cfg)
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
    """promptCache auto: (MiB, reason). See PROMPT_CACHE_* for the rule; each bound that binds is named."""
    cfg = chosen.cfg
    slot_ctx = cfg.n_ctx if cfg.kv_unified else max(cfg.n_ctx // max(cfg.n_parallel, 1), 1)
    tokens = min(PROMPT_CACHE_TYPICAL_TOKENS, slot_ctx)
    state = prompt_state_bytes(facts, cfg, tokens)
    mib = max(1, -(-PROMPT_CACHE_STATES * state // MiB))
    why = f"{PROMPT_CACHE_STATES} saved {tokens}-token conversations ({PROMPT_CACHE_STATES} x {format_memory(state)})"
    own = chosen.mem.full_context_bytes - chosen.mem.cache_ram_bytes
    bounds = [
        (PROMPT_CACHE_UPSTREAM_MIB, "llama-server's default cap"),
        (int(own * PROMPT_CACHE_MODEL_SHARE) // MiB, f"a quarter of the plan's own {format_memory(own)}"),
    ]
    if node.memory_bytes is not None:
        free = max(node.memory_bytes - chosen.host_need, 0)
        share = int(free * PROMPT_CACHE_FREE_SHARE / (1 + policy.headroom)) // MiB
        bounds.append((share, f"a quarter of the {format_memory(free)} the plan leaves free on the node"))
    for cap, what in bounds:
        if cap < mib:
            mib, why = cap, f"{what} (asked: {why})"
    floor = prompt_state_bytes(facts, cfg, PROMPT_CACHE_MIN_TOKENS)
    if mib * MiB < floor:
        n = min(PROMPT_CACHE_MIN_TOKENS, cfg.n_ctx)
        return 0, (
            f"prompt cache off (--cache-ram 0): memory is short; {why} ({format_memory(mib * MiB)}) would not "
            f"hold one {n}-token prompt ({format_memory(floor)})"
        )
    return mib, (
        f"prompt cache {mib} MiB (--cache-ram): {why}; a conversation that lost its slot resumes without "
        "reprocessing its prompt; counted in the memory limit, filled only as prompts are saved; "
        "promptCache MiB sets more"
    )


class _Space(BaseModel):
    """What the search may choose from, after the policy and the node have narrowed it."""

    backend: str
    gpus: int
    target: int  # the context asked for (capped at the trained one, whole CTX_STEPs)
    min_ctx: int  # the least context that counts as fitting
    kv_types: list[KVType]  # in order of preference
    load_modes: list[LoadMode]
    layer_options: list[int]  # GPU layers, most first
    total_units: int  # blocks + the output head
    fa_forced_off: bool
    base: ServerConfig  # the flags the search does not vary


def _whole_steps(n: int) -> int:
    return max(CTX_STEP, n // CTX_STEP * CTX_STEP) if n >= CTX_STEP else n


def _context_bounds(facts: ModelFacts, policy: Policy, warnings: list[str]) -> tuple[int, int]:
    """(target, minimum) context: the request capped at the trained context, in whole CTX_STEPs."""
    n_train = facts.context_length
    target = n_train if policy.context == "max" else min(int(policy.context), n_train)
    if policy.context != "max" and int(policy.context) > n_train:
        warnings.append(f"requested context {policy.context} exceeds the model's trained {n_train}; capped")
    target = _whole_steps(target)
    min_ctx = _whole_steps(min(max(policy.min_context, 1), target))
    return target, min_ctx


def _kv_options(policy: Policy, warnings: list[str]) -> list[KVType]:
    """KV types to try, in order; without flash attention only unquantized ones."""
    kv_types: list[KVType] = list(KV_AUTO) if policy.kv_cache_type == "auto" else [policy.kv_cache_type]
    if policy.flash_attention == "off":
        kv_types = [t for t in kv_types if t in ("f16", "f32", "bf16")] or ["f16"]
        if policy.kv_cache_type not in ("auto", "f16", "f32", "bf16"):
            warnings.append("a quantized V cache needs flash attention; using f16 because flash attention is off")
    return kv_types


def _search_space(facts: ModelFacts, node: NodeFacts, policy: Policy, warnings: list[str]) -> _Space:
    backend = _backend(policy, node)
    target, min_ctx = _context_bounds(facts, policy, warnings)
    gpus = node.gpus if backend != "cpu" else 0
    if backend != "cpu" and gpus == 0:
        warnings.append(f"backend {backend} requested but the node has no GPU; planned on CPU")
        backend, gpus = "cpu", 0
    fa_forced_off = policy.flash_attention == "off"
    kv_types = _kv_options(policy, warnings)
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
    return _Space(
        backend=backend,
        gpus=gpus,
        target=target,
        min_ctx=min_ctx,
        kv_types=kv_types,
        load_modes=load_modes,
        layer_options=layer_options,
        total_units=total_units,
        fa_forced_off=fa_forced_off,
        base=base,
    )


def _best_for(
    facts: ModelFacts, node: NodeFacts, policy: Policy, space: _Space, kv: KVType, ngl: int
) -> _Candidate | None:
    """The longest context any load mode reaches with this KV type and offload; ties: the lower peak."""
    best: _Candidate | None = None
    for lm in space.load_modes:
        cfg = space.base.model_copy(update={"type_k": kv, "type_v": kv, "n_gpu_layers": ngl, "load_mode": lm})
        c = _largest_context(facts, cfg, policy, node, space.min_ctx, space.target)
        if c is None:
            continue
        if (
            best is None
            or c.cfg.n_ctx > best.cfg.n_ctx
            or (c.cfg.n_ctx == best.cfg.n_ctx and c.mem.total_bytes < best.mem.total_bytes)
        ):
            best = c
    return best


def _search(facts: ModelFacts, node: NodeFacts, policy: Policy, space: _Space) -> _Candidate | None:
    """1. Most GPU layers first (layers beat context on a GPU node), then f16 before quantized KV at the
    full target context; 2. else the longest context any option reaches; None when nothing fits."""
    fallback: _Candidate | None = None
    for ngl in space.layer_options:
        for kv in space.kv_types:
            c = _best_for(facts, node, policy, space, kv, ngl)
            if c is None:
                continue
            if c.cfg.n_ctx >= space.target:
                return c
            if fallback is None or c.cfg.n_ctx > fallback.cfg.n_ctx:
                fallback = c
        if fallback is not None and space.gpus and fallback.cfg.n_gpu_layers == ngl and ngl == space.total_units:
            # full offload at a shorter context beats partial offload at a longer one only when
            # the shorter context still meets the minimum, which _largest_context guarantees
            return fallback
    return fallback


def _nothing_fits(facts: ModelFacts, node: NodeFacts, policy: Policy, space: _Space) -> tuple[_Candidate, int, str]:
    """The smallest sensible configuration, its shortfall in bytes, and why it does not fit."""
    kv = space.kv_types[-1]
    cfg = space.base.model_copy(
        update={
            "n_ctx": space.min_ctx,
            "type_k": kv,
            "type_v": kv,
            "n_gpu_layers": 0 if space.gpus == 0 else space.layer_options[-1],
        }
    )
    modes = [_evaluate(facts, cfg.model_copy(update={"load_mode": lm}), policy) for lm in space.load_modes]
    chosen = min(modes, key=lambda c: c.mem.total_bytes)
    short_host = chosen.host_need - (node.memory_bytes or chosen.host_need)
    short_gpu = (chosen.gpu_need + policy.gpu_margin_bytes - node.gpu_memory_bytes) if space.gpus else 0
    why = (
        f"does not fit: even at context {space.min_ctx} with {kv} KV the pod needs "
        f"{format_memory(chosen.host_need)} but the node offers {format_memory(node.memory_bytes or 0)}"
    )
    if policy.kv_cache_type == "auto" and not space.fa_forced_off:
        q4 = _evaluate(facts, cfg.model_copy(update={"type_k": KV_OPT_IN, "type_v": KV_OPT_IN}), policy)
        if _fits(q4, node, policy) or any(
            _fits(_evaluate(facts, q4.cfg.model_copy(update={"load_mode": lm}), policy), node, policy)
            for lm in space.load_modes
        ):
            why += f"; q4_0 KV would fit, but it degrades answers and is used only with kvCacheType {KV_OPT_IN}"
    return chosen, max(short_host, short_gpu, 0), why


def _hardware_reasons(node: NodeFacts, policy: Policy, space: _Space, cfg: ServerConfig) -> list[str]:
    """Why this backend and this many GPU layers."""
    if space.backend == "cpu":
        return ["backend cpu: " + ("no GPU on the node" if node.gpus == 0 else "CPU backend requested")]
    out = [
        f"backend {space.backend}: {node.gpus}x {node.gpu_vendor} GPU with {format_memory(node.gpu_memory_bytes)} each"
    ]
    units = space.total_units
    if cfg.n_gpu_layers >= units:
        out.append(f"gpu layers {cfg.n_gpu_layers}/{units}: the whole model fits in GPU memory")
    else:
        out.append(
            f"gpu layers {cfg.n_gpu_layers}/{units}: the most that fit in {format_memory(node.gpu_memory_bytes)} "
            f"with {format_memory(policy.gpu_margin_bytes)} spare; the rest run on the CPU"
        )
    return out


def _context_reason(
    facts: ModelFacts, node: NodeFacts, policy: Policy, space: _Space, cfg: ServerConfig, fits: bool
) -> list[str]:
    """Why this context: the one asked for, or the largest that fits (and what q4_0 KV would reach)."""
    if cfg.n_ctx >= space.target:
        return [f"context {cfg.n_ctx}: " + ("the model's maximum" if policy.context == "max" else "as requested")]
    if not fits:
        return []
    why = (
        f"context {cfg.n_ctx}: the largest that fits with {cfg.type_k} KV (asked {space.target}, "
        f"minimum {space.min_ctx})"
    )
    if policy.kv_cache_type == "auto" and not space.fa_forced_off:
        q4c = _best_for(facts, node, policy, space, KV_OPT_IN, cfg.n_gpu_layers)
        if q4c is not None and q4c.cfg.n_ctx > cfg.n_ctx:
            why += (
                f"; q4_0 KV would reach {q4c.cfg.n_ctx} but measurably degrades answers "
                f"(kvCacheType {KV_OPT_IN} allows it)"
            )
    return [why]


def _load_mode_reason(policy: Policy, cfg: ServerConfig, mem: MemoryBreakdown) -> str:
    if policy.load_mode != "auto":
        return f"load mode {cfg.load_mode}: as requested"
    if cfg.load_mode == "none":
        return (
            f"load mode none: the CPU backend repacks {format_memory(mem.repack_bytes)} of weights; "
            "with mmap the file pages would stay resident beside the copy"
        )
    return "load mode mmap: weights stay in the page cache, shared and reclaimable; nothing is repacked"


def _prompt_cache(
    facts: ModelFacts, node: NodeFacts, policy: Policy, chosen: _Candidate, fits: bool
) -> tuple[_Candidate, str]:
    """The prompt cache (--cache-ram) step: the candidate with its budget, and the reason."""
    cfg = chosen.cfg
    if policy.cache_ram_mib != "auto":
        if cfg.cache_ram_mib == 0:
            return chosen, "prompt cache off (--cache-ram 0): as requested"
        return chosen, (
            f"prompt cache {cfg.cache_ram_mib} MiB (--cache-ram): as requested; counted in the memory limit "
            f"(one full-context state of a slot is {format_memory(seq_state_bytes(facts, cfg))})"
        )
    if not fits:
        return chosen, "prompt cache off (--cache-ram 0): the model does not fit as it is"
    cache_free_request = _request(policy, chosen.mem.full_context_bytes - chosen.mem.cache_ram_bytes)
    mib, why = _auto_prompt_cache(facts, chosen, policy, node)
    if mib:
        with_cache = _evaluate(facts, cfg.model_copy(update={"cache_ram_mib": mib}), policy)
        if _fits(with_cache, node, policy):
            chosen = with_cache
        else:  # cannot happen: the budget is a share of the free memory; never trade the plan for it
            mib, why = 0, "prompt cache off (--cache-ram 0): memory is short"
    if mib:
        why += f" (promptCache 0 would make the memory request {format_memory(cache_free_request)})"
    return chosen, why


def _resources(node: NodeFacts, gpus: int, threads: int, memory_request: int) -> Resources:
    """Requests and limits of the pod: a whole CPU per thread (no CPU limit), memory request = limit, and the
    node vendor's GPU resource when the plan uses GPUs."""
    resources = Resources(
        requests={"cpu": format_cpu(threads * 1000), "memory": format_memory(memory_request)},
        limits={"memory": format_memory(memory_request)},
    )
    info = gpu_vendor_info(node.gpu_vendor)
    if info is not None and gpus:
        resources.requests[info.resource] = str(gpus)
        resources.limits[info.resource] = str(gpus)
    return resources


def _choice_reasons(
    facts: ModelFacts, node: NodeFacts, policy: Policy, space: _Space, found: _Candidate, fits: bool
) -> list[str]:
    """One reason per memory choice: backend, GPU layers, context, KV type, flash attention, load mode."""
    cfg = found.cfg
    reasons = _hardware_reasons(node, policy, space, cfg)
    reasons += _context_reason(facts, node, policy, space, cfg, fits)
    reasons.append(_kv_reason(facts, found, policy, fits))
    reasons.append(
        "flash attention "
        + ("off: as requested" if not cfg.flash_attn else "on: smaller compute buffer, needed for quantized KV")
    )
    reasons.append(_load_mode_reason(policy, cfg, found.mem))
    return reasons


def plan(
    facts: ModelFacts, node: NodeFacts, policy: Policy | None = None, model_path: str = "/models/model.gguf"
) -> PlanResult:
    """Choose llama-server's flags for a model on a node, and the pod's resources.

    The steps: the search space (backend, context bounds, KV types, load modes, GPU layers), the
    search, the nothing-fits report, one reason per choice, threads, the prompt cache, resources.
    """
    policy = policy or Policy()
    warnings = list(facts.warnings)
    space = _search_space(facts, node, policy, warnings)
    reasons: list[str] = []
    found = _search(facts, node, policy, space)
    fits, shortfall = found is not None, 0
    if found is None:
        found, shortfall, why = _nothing_fits(facts, node, policy, space)
        reasons.append(why)
    reasons += _choice_reasons(facts, node, policy, space, found, fits)
    env, why_env = _huge_pages(policy, space, found.cfg)
    threads = _threads(facts, policy, node, found.cfg, warnings)
    reasons += [*why_env, threads.reason]
    cache_free_request = _request(policy, found.mem.full_context_bytes - found.mem.cache_ram_bytes)
    chosen, why = _prompt_cache(facts, node, policy, found, fits)
    reasons.append(why)
    cfg, mem = chosen.cfg, chosen.mem
    request = _request(policy, mem.full_context_bytes)
    p = Plan(
        backend=space.backend,
        gpu_layers=cfg.n_gpu_layers,
        total_layers=space.total_units,
        context=cfg.n_ctx,
        parallel=cfg.n_parallel,
        load_mode=cfg.load_mode,
        flash_attention=cfg.flash_attn,
        kv_cache_type=cfg.type_k,
        threads=threads.threads,
        ubatch=cfg.n_ubatch,
        cache_ram_mib=cfg.cache_ram_mib,
        ctx_checkpoints=cfg.ctx_checkpoints,
        args=build_args(cfg, policy, model_path, threads.threads),
        node=node.name,
        env=env,
    )
    return PlanResult(
        plan=p,
        memory=mem,
        resources=_resources(node, space.gpus, threads.threads, request),
        fits=fits,
        shortfall_bytes=shortfall,
        reasons=reasons,
        warnings=warnings,
        memory_request_bytes=request,
        cache_free_request_bytes=cache_free_request,
        cpu_request_millis=threads.threads * 1000,
        threads_wanted=threads.wanted,
    )


__all__ = [
    "THP_ENV",
    "Plan",
    "PlanResult",
    "Policy",
    "Resources",
    "decode_bytes_per_token",
    "plan",
]
