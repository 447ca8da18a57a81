"""Model facts: what the sizing core needs to know about a GGUF model.

Built from a real header (`facts_from_header`) or from the catalog; both paths
produce the same `ModelFacts`, so the memory model never cares where facts came
from. Layer kinds (attention, sliding-window, recurrent) follow llama.cpp's
per-architecture rules in ``src/models/*.cpp`` and ``llama-hparams.cpp``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from .gguf_header import ArraySummary, GGUFError, GGUFHeader

_BLK_RE = re.compile(r"^blk\.(\d+)\.")
# A header comes from anywhere: every number read from it is checked (a GGUFError naming the key), so a hostile
# one costs a condition, not the operator. llama.cpp reads counts and sizes as uint32 and refuses more than
# LLAMA_MAX_LAYERS (512) blocks; 4096 leaves it room to grow and keeps a header's layers to a few MB.
MAX_LAYERS = 4096
_UINT32 = 1 << 32

# Architectures whose every layer is recurrent (no KV cache).
RECURRENT_ARCHS = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}
# Hybrids whose recurrent layers are marked by full_attention_interval / recurrent_layers.
INTERVAL_HYBRIDS = {"qwen3next", "qwen35", "qwen35moe"}
# Hybrids whose recurrent layers are those with zero KV heads.
ZERO_KV_HYBRIDS = {"jamba", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe"}
# Default sliding-window patterns (n_pattern: every n-th layer is global).
SWA_PATTERNS: dict[str, int] = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2, "llama4": 4}
# Architectures llama.cpp has graph code for (a subset we know well); others get a warning.
KNOWN_ARCHS = {
    "llama",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "qwen35",
    "qwen35moe",
    "qwen3next",
    "gemma",
    "gemma2",
    "gemma3",
    "mistral3",
    "phi3",
    "granite",
    "granitehybrid",
    "jamba",
    "mamba",
    "mamba2",
    "falcon-h1",
    "gpt-oss",
    "cohere2",
    "llama4",
    "deepseek2",
    "olmo2",
    "smollm3",
    "lfm2",
}


class TensorFact(BaseModel):
    """One weight tensor: its GGUF type, shape and exact bytes."""

    model_config = ConfigDict(frozen=True)

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def layer(self) -> int | None:
        """Block index for ``blk.N.*`` tensors, else None (embedding, output, norms)."""
        return layer_of(self.name)


def layer_of(name: str) -> int | None:
    """Block index of a ``blk.N.*`` tensor name."""
    m = _BLK_RE.match(name)
    return int(m.group(1)) if m else None


class LayerFact(BaseModel):
    """What one block keeps in memory besides its weights."""

    model_config = ConfigDict(frozen=True)

    attention: bool = True  # has a KV cache
    swa: bool = False  # KV capped at the sliding window
    recurrent: bool = False  # has recurrent (conv + ssm) state
    n_embd_k_gqa: int = 0
    n_embd_v_gqa: int = 0
    n_head: int = 0


class SSMFacts(BaseModel):
    """Recurrent state dimensions (llama.cpp's n_embd_r / n_embd_s per layer)."""

    d_conv: int = 0
    d_inner: int = 0
    d_state: int = 0
    n_group: int = 0

    @property
    def n_embd_r(self) -> int:
        return max(self.d_conv - 1, 0) * (self.d_inner + 2 * self.n_group * self.d_state)

    @property
    def n_embd_s(self) -> int:
        return self.d_state * self.d_inner


class ModelFacts(BaseModel):
    """Everything about a model that decides llama-server's memory."""

    name: str
    architecture: str
    file_bytes: int
    header_bytes: int
    n_layer: int  # trunk blocks (excludes MTP/nextn blocks)
    n_layer_all: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    context_length: int
    tied_embeddings: bool
    n_swa: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_merges: int = 0
    tokenizer: str = ""
    ssm: SSMFacts = Field(default_factory=SSMFacts)
    layers: list[LayerFact]
    tensors: list[TensorFact]
    file_type: str | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def has_attention(self) -> bool:
        return any(lf.attention for lf in self.layers)

    @property
    def has_recurrent(self) -> bool:
        return any(lf.recurrent for lf in self.layers)

    @property
    def has_swa(self) -> bool:
        return any(lf.swa for lf in self.layers)


def shortconv_ssm(l_cache: int, n_embd: int) -> SSMFacts:
    """LFM2's short-convolution state: (L_cache - 1) x n_embd F32 per layer and sequence, no ssm state
    (llama-hparams.cpp n_embd_r for n_shortconv_l_cache; n_embd_s is 0)."""
    return SSMFacts(d_conv=l_cache, d_inner=n_embd)


def _count(value: Any, where: str, default: int = 0) -> int:
    """A count or size from the header (``where``: its key): a uint32, as llama.cpp reads it."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{where} is of type {type(value).__name__}, not an integer")
    if not 0 <= value < _UINT32:
        raise GGUFError(f"{where} = {value} is out of range (a uint32)")
    return value


def _length(value: Any, where: str) -> int:
    """How many items an array key holds (0 when absent)."""
    if value is None:
        return 0
    if not isinstance(value, list | ArraySummary):
        raise GGUFError(f"{where} is of type {type(value).__name__}, not an array")
    return len(value)


def _blocks(header: GGUFHeader, n_layer_all: int, n_layer: int, arch: str) -> None:
    """The tensors agree with block_count: none past it, and every trunk block has some (llama.cpp loads them)."""
    if n_layer_all > MAX_LAYERS:
        raise GGUFError(f"{arch}.block_count = {n_layer_all}: more than {MAX_LAYERS} layers")
    top = max((b for b in (layer_of(t.name) for t in header.tensors) if b is not None), default=-1)
    if top >= n_layer_all:
        raise GGUFError(f"tensor blk.{top}.* is past {arch}.block_count = {n_layer_all}")
    if n_layer > top + 1:
        raise GGUFError(f"{arch}.block_count = {n_layer_all} but the tensors stop at block {top}")


def _per_layer(value: Any, n: int, default: int, where: str = "") -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, ArraySummary) or (isinstance(value, list) and len(value) > MAX_LAYERS):
        raise GGUFError(f"{where} is an array of {len(value)} items, too long for per-layer values")
    if isinstance(value, list):
        vals = [_count(v, f"{where} item") for v in value]
        if len(vals) < n:
            vals += [vals[-1] if vals else default] * (n - len(vals))
        return vals[:n]
    return [_count(value, where)] * n


def build_layers(
    arch: str,
    n_layer_all: int,
    n_layer: int,
    n_head: list[int],
    n_head_kv: list[int],
    n_ff: list[int],
    head_dim_k: int,
    head_dim_v: int,
    *,
    n_swa: int = 0,
    swa_pattern: int | list[bool] | None = None,
    full_attention_interval: int | None = None,
    recurrent_layers: list[bool] | None = None,
) -> list[LayerFact]:
    """Per-layer kinds, following llama.cpp's rules for the architecture."""
    recurrent = [arch in RECURRENT_ARCHS] * n_layer_all
    if arch in INTERVAL_HYBRIDS:
        if recurrent_layers is not None:
            recurrent = [bool(x) for x in recurrent_layers][:n_layer_all]
            recurrent += [False] * (n_layer_all - len(recurrent))
        else:
            interval = full_attention_interval or 4
            recurrent = [i < n_layer and (i + 1) % interval != 0 for i in range(n_layer_all)]
    elif arch in ZERO_KV_HYBRIDS:
        recurrent = [n_head_kv[i] == 0 for i in range(n_layer_all)]
        if arch.startswith("nemotron_h"):
            recurrent = [n_head_kv[i] == 0 and n_ff[i] == 0 for i in range(n_layer_all)]
    elif arch == "falcon-h1":
        recurrent = [True] * n_layer_all

    swa = [False] * n_layer_all
    if n_swa > 0:
        if isinstance(swa_pattern, list):
            swa = [bool(x) for x in swa_pattern][:n_layer_all]
            swa += [False] * (n_layer_all - len(swa))
        else:
            pattern = swa_pattern if isinstance(swa_pattern, int) else SWA_PATTERNS.get(arch)
            if pattern is not None:
                swa = [i < n_layer and (pattern == 0 or i % pattern < pattern - 1) for i in range(n_layer_all)]
        if arch.startswith("lfm2"):
            swa = [not r for r in recurrent]

    layers = []
    for i in range(n_layer_all):
        if arch in RECURRENT_ARCHS:
            attention = False
        elif arch == "falcon-h1":
            attention = True
        elif arch.startswith("nemotron_h"):
            attention = not recurrent[i] and n_ff[i] == 0
        else:
            attention = not recurrent[i]
        # Trunk KV only: nextn (MTP) blocks get KV only in a draft context.
        attention = attention and i < n_layer
        layers.append(
            LayerFact(
                attention=attention,
                swa=swa[i] and attention,
                recurrent=recurrent[i] and i < n_layer,
                n_embd_k_gqa=head_dim_k * n_head_kv[i] if attention else 0,
                n_embd_v_gqa=head_dim_v * n_head_kv[i] if attention else 0,
                n_head=n_head[i],
            )
        )
    return layers


class _Attention(NamedTuple):
    heads: list[int]  # per layer
    heads_kv: list[int]  # per layer (0: no KV, a recurrent layer of some hybrids)
    n_ff: list[int]  # per layer
    head_k: int
    head_v: int


def _attention(key: Callable[..., Any], n_layer_all: int, n_embd: int, arch: str) -> _Attention:
    """Heads, KV heads and FFN width per layer (scalars or per-layer arrays in GGUF), and head sizes."""

    def per_layer(suffix: str) -> list[int]:
        return _per_layer(key(suffix), n_layer_all, 0, f"{arch}.{suffix}")

    def num(suffix: str) -> int:
        return _count(key(suffix), f"{arch}.{suffix}")

    heads = per_layer("attention.head_count")
    heads_kv = per_layer("attention.head_count_kv")
    if key("attention.head_count_kv") is None:
        heads_kv = list(heads)
    n_ff = per_layer("feed_forward_length")
    n_head_max = max(heads, default=0)
    head_k = num("attention.key_length") or (n_embd // n_head_max if n_head_max else 0)
    head_v = num("attention.value_length") or head_k
    return _Attention(heads, heads_kv, n_ff, head_k, head_v)


def _sliding_window(key: Callable[..., Any], arch: str) -> tuple[int, int | list[bool] | None]:
    """(window size, pattern: a period or a per-layer array); llama4's chunked attention is a window too."""
    raw = key("attention.sliding_window_pattern")
    pattern: int | list[bool] | None
    if isinstance(raw, list):
        if len(raw) > MAX_LAYERS:
            raise GGUFError(f"{arch}.attention.sliding_window_pattern has {len(raw)} items, more than {MAX_LAYERS}")
        pattern = [bool(x) for x in raw]
    elif isinstance(raw, bool):
        pattern = int(raw)
    else:
        pattern = _count(raw, f"{arch}.attention.sliding_window_pattern") if raw is not None else None
    n_swa = _count(key("attention.sliding_window"), f"{arch}.attention.sliding_window")
    if arch == "llama4":
        n_swa = _count(key("attention.chunk_size"), f"{arch}.attention.chunk_size", n_swa)
    return n_swa, pattern


def facts_from_header(header: GGUFHeader, name: str | None = None) -> ModelFacts:
    """Model facts from a GGUF header; unknown architectures are planned as dense."""
    meta = header.metadata
    arch = header.architecture
    warnings: list[str] = []
    if arch not in KNOWN_ARCHS:
        warnings.append(f"architecture {arch!r} is not known to modelfit; planned as a generic dense transformer")

    def key(suffix: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{suffix}", default)

    def num(suffix: str) -> int:
        return _count(key(suffix), f"{arch}.{suffix}")

    if not isinstance(meta.get("general.architecture", ""), str):
        raise GGUFError(f"general.architecture is of type {type(meta['general.architecture']).__name__}, not a string")
    n_layer_all = num("block_count")
    if n_layer_all <= 0:
        blocks = [t for t in (layer_of(x.name) for x in header.tensors) if t is not None]
        n_layer_all = max(blocks) + 1 if blocks else 0
        warnings.append(f"{arch}.block_count missing; counted {n_layer_all} blocks from tensor names")
    n_layer = max(n_layer_all - num("nextn_predict_layers"), 0)
    _blocks(header, n_layer_all, n_layer, arch)
    token_embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    n_embd = num("embedding_length")
    if n_embd <= 0 and token_embd is not None and token_embd.shape:
        n_embd = _count(token_embd.shape[0], "token_embd.weight's first dimension")
    att = _attention(key, n_layer_all, n_embd, arch)
    n_vocab = num("vocab_size") or _length(meta.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
    if n_vocab <= 0 and token_embd is not None and len(token_embd.shape) > 1:
        n_vocab = _count(token_embd.shape[1], "token_embd.weight's second dimension")
    tied = "output.weight" not in {t.name for t in header.tensors}
    n_swa, swa_pattern = _sliding_window(key, arch)
    rec_layers = key("attention.recurrent_layers")
    layers = build_layers(
        arch,
        n_layer_all,
        n_layer,
        att.heads,
        att.heads_kv,
        att.n_ff,
        att.head_k,
        att.head_v,
        n_swa=n_swa,
        swa_pattern=swa_pattern,
        full_attention_interval=num("full_attention_interval") or None,
        recurrent_layers=[bool(x) for x in rec_layers] if isinstance(rec_layers, list) else None,
    )
    ssm = SSMFacts(
        d_conv=num("ssm.conv_kernel"),
        d_inner=num("ssm.inner_size"),
        d_state=num("ssm.state_size"),
        n_group=num("ssm.group_count"),
    )
    if l_cache := num("shortconv.l_cache"):
        ssm = shortconv_ssm(l_cache, n_embd)
    ftype = meta.get("general.file_type")
    return ModelFacts(
        name=name or str(meta.get("general.name") or header.source.rsplit("/", 1)[-1]),
        architecture=arch,
        file_bytes=header.file_bytes,
        header_bytes=header.header_bytes,
        n_layer=n_layer,
        n_layer_all=n_layer_all,
        n_embd=n_embd,
        n_head=max(att.heads, default=0),
        n_head_kv=max(att.heads_kv, default=0),
        head_dim_k=att.head_k,
        head_dim_v=att.head_v,
        n_ff=max(att.n_ff, default=0),
        n_vocab=n_vocab,
        context_length=num("context_length") or 4096,
        tied_embeddings=tied,
        n_swa=n_swa if any(lf.swa for lf in layers) else 0,
        n_expert=num("expert_count"),
        n_expert_used=num("expert_used_count"),
        n_ff_exp=num("expert_feed_forward_length"),
        n_merges=_length(meta.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges"),
        tokenizer=str(meta.get("tokenizer.ggml.model", "")),
        ssm=ssm,
        layers=layers,
        tensors=[
            TensorFact(name=t.name, ggml_type=t.type_name, shape=t.shape, nbytes=t.nbytes) for t in header.tensors
        ],
        file_type=_ftype_name(ftype),
        warnings=warnings,
    )


def _ftype_name(ftype: Any) -> str | None:
    if ftype is None:
        return None
    number = _count(ftype, "general.file_type")
    try:
        from gguf import LlamaFileType

        return LlamaFileType(number).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        return str(ftype)
