"""Offline catalog: architecture facts of popular GGUF models and llama.cpp's quant recipes.

`catalog_facts(name, quant)` yields the same `ModelFacts` a real file of that
shape would give, so `modelfit plan qwen3.5-0.8b --quant q4_0` works without the
file. Tensor types follow llama-quantize's rules (``src/llama-quant.cpp``,
``llama_tensor_get_type_impl``) for the recipes we list, including the tensors a
recipe keeps at higher precision (a tied token embedding at Q6_K for Q4_0, every
other attn_v/ffn_down at Q6_K for Q4_K_M, ...). Dimensions come from the models'
upstream config.json files.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, Field

from .facts import LayerFact, ModelFacts, SSMFacts, TensorFact, build_layers, shortconv_ssm

# Recipe name -> (llama-quantize ftype name, default tensor type).
RECIPES: dict[str, tuple[str, str]] = {
    "Q4_0": ("Q4_0", "Q4_0"),
    "Q4_K_M": ("Q4_K_M", "Q4_K"),
    "Q5_K_M": ("Q5_K_M", "Q5_K"),
    "Q6_K": ("Q6_K", "Q6_K"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "F16": ("F16", "F16"),
}


class ArchSpec(BaseModel):
    """Shape of one model; enough to list every tensor it has."""

    arch: str
    display: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    tied: bool
    qk_norm: bool = False
    rope_freqs: bool = False  # llama 3.x ship rope_freqs.weight
    n_swa: int = 0
    full_attention_interval: int = 0
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_head_dim: int = 0
    ssm_conv: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    attention_layers: list[int] = Field(default_factory=list)  # lfm2: the others are short-convolution blocks
    shortconv_l_cache: int = 0  # lfm2: conv kernel length (conv_L_cache)
    header_bytes: int = 0
    hf_repo: str = ""
    hf_file: str = ""  # with {quant}
    aliases: list[str] = Field(default_factory=list)

    def url(self, quant: str) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file.format(quant=quant)}"


def _qwen35(
    display: str, n_layer: int, n_embd: int, n_head: int, n_kv: int, n_ff: int, v_heads: int, repo: str, tied: bool
) -> ArchSpec:
    return ArchSpec(
        arch="qwen35",
        display=display,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=256,
        n_ff=n_ff,
        n_vocab=248320,
        context_length=262144,
        tied=tied,
        qk_norm=True,
        full_attention_interval=4,
        linear_k_heads=16,
        linear_v_heads=v_heads,
        linear_head_dim=128,
        ssm_conv=4,
        header_bytes=10_961_568,
        hf_repo=repo,
        hf_file=display + "-{quant}.gguf",
    )


def _lfm2(display: str, n_embd: int, n_head: int, n_ff: int) -> ArchSpec:
    """LiquidAI LFM2: 16 blocks, 10 gated short-convolution and 6 GQA attention (layer_types of config.json);
    n_ff is the auto-adjusted block_ff_dim that convert_hf_to_gguf writes (llama.cpp's size names key on it)."""
    return ArchSpec(
        arch="lfm2",
        display=display,
        n_layer=16,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=8,
        head_dim=64,
        n_ff=n_ff,
        n_vocab=65536,
        context_length=128000,
        tied=True,
        qk_norm=True,
        attention_layers=[2, 5, 8, 10, 12, 14],
        shortconv_l_cache=3,
        header_bytes=2_600_000,
        hf_repo=f"LiquidAI/{display}-GGUF",
        hf_file=display + "-{quant}.gguf",
    )


MODELS: dict[str, ArchSpec] = {
    "qwen3.5-0.8b": _qwen35("Qwen3.5-0.8B", 24, 1024, 8, 2, 3584, 16, "unsloth/Qwen3.5-0.8B-GGUF", True),
    "qwen3.5-2b": _qwen35("Qwen3.5-2B", 24, 2048, 8, 2, 6144, 16, "unsloth/Qwen3.5-2B-GGUF", True),
    "qwen3.5-4b": _qwen35("Qwen3.5-4B", 32, 2560, 16, 4, 9216, 32, "unsloth/Qwen3.5-4B-GGUF", True),
    "qwen3.5-9b": _qwen35("Qwen3.5-9B", 32, 4096, 16, 4, 12288, 32, "unsloth/Qwen3.5-9B-GGUF", False),
    "qwen3-0.6b": ArchSpec(
        arch="qwen3",
        display="Qwen3-0.6B",
        n_layer=28,
        n_embd=1024,
        n_head=16,
        n_head_kv=8,
        head_dim=128,
        n_ff=3072,
        n_vocab=151936,
        context_length=40960,
        tied=True,
        qk_norm=True,
        header_bytes=5_950_000,
        hf_repo="unsloth/Qwen3-0.6B-GGUF",
        hf_file="Qwen3-0.6B-{quant}.gguf",
    ),
    "qwen3-8b": ArchSpec(
        arch="qwen3",
        display="Qwen3-8B",
        n_layer=36,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_ff=12288,
        n_vocab=151936,
        context_length=40960,
        tied=False,
        qk_norm=True,
        header_bytes=5_950_000,
        hf_repo="unsloth/Qwen3-8B-GGUF",
        hf_file="Qwen3-8B-{quant}.gguf",
    ),
    "llama-3.2-1b": ArchSpec(
        arch="llama",
        display="Llama-3.2-1B-Instruct",
        n_layer=16,
        n_embd=2048,
        n_head=32,
        n_head_kv=8,
        head_dim=64,
        n_ff=8192,
        n_vocab=128256,
        context_length=131072,
        tied=True,
        rope_freqs=True,
        header_bytes=7_700_000,
        hf_repo="unsloth/Llama-3.2-1B-Instruct-GGUF",
        hf_file="Llama-3.2-1B-Instruct-{quant}.gguf",
    ),
    "llama-3.2-3b": ArchSpec(
        arch="llama",
        display="Llama-3.2-3B-Instruct",
        n_layer=28,
        n_embd=3072,
        n_head=24,
        n_head_kv=8,
        head_dim=128,
        n_ff=8192,
        n_vocab=128256,
        context_length=131072,
        tied=True,
        rope_freqs=True,
        header_bytes=7_700_000,
        hf_repo="unsloth/Llama-3.2-3B-Instruct-GGUF",
        hf_file="Llama-3.2-3B-Instruct-{quant}.gguf",
    ),
    "llama-3.1-8b": ArchSpec(
        arch="llama",
        display="Meta-Llama-3.1-8B-Instruct",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_ff=14336,
        n_vocab=128256,
        context_length=131072,
        tied=False,
        rope_freqs=True,
        header_bytes=7_700_000,
        hf_repo="unsloth/Meta-Llama-3.1-8B-Instruct-GGUF",
        hf_file="Meta-Llama-3.1-8B-Instruct-{quant}.gguf",
    ),
    "gemma-3-1b": ArchSpec(
        arch="gemma3",
        display="gemma-3-1b-it",
        n_layer=26,
        n_embd=1152,
        n_head=4,
        n_head_kv=1,
        head_dim=256,
        n_ff=6912,
        n_vocab=262144,
        context_length=32768,
        tied=True,
        qk_norm=True,
        n_swa=512,
        header_bytes=4_700_000,
        hf_repo="unsloth/gemma-3-1b-it-GGUF",
        hf_file="gemma-3-1b-it-{quant}.gguf",
    ),
    "gemma-3-4b": ArchSpec(
        arch="gemma3",
        display="gemma-3-4b-it",
        n_layer=34,
        n_embd=2560,
        n_head=8,
        n_head_kv=4,
        head_dim=256,
        n_ff=10240,
        n_vocab=262208,
        context_length=131072,
        tied=True,
        qk_norm=True,
        n_swa=1024,
        header_bytes=4_700_000,
        hf_repo="unsloth/gemma-3-4b-it-GGUF",
        hf_file="gemma-3-4b-it-{quant}.gguf",
    ),
    "lfm2-350m": _lfm2("LFM2-350M", 1024, 16, 4608),
    "lfm2-700m": _lfm2("LFM2-700M", 1536, 24, 6912),
    "lfm2-1.2b": _lfm2("LFM2-1.2B", 2048, 32, 8192),
    "qwen3-30b-a3b": ArchSpec(
        arch="qwen3moe",
        display="Qwen3-30B-A3B",
        n_layer=48,
        n_embd=2048,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_ff=6144,
        n_vocab=151936,
        context_length=40960,
        tied=False,
        qk_norm=True,
        n_expert=128,
        n_expert_used=8,
        n_ff_exp=768,
        header_bytes=5_950_000,
        hf_repo="unsloth/Qwen3-30B-A3B-GGUF",
        hf_file="Qwen3-30B-A3B-{quant}.gguf",
    ),
}

_ALIASES = {
    "qwen3.5-0.8b": ["qwen3-5-0-8b", "qwen35-0.8b"],
    "llama-3.2-1b": ["llama3.2-1b"],
    "llama-3.2-3b": ["llama3.2-3b"],
    "llama-3.1-8b": ["llama3.1-8b"],
    "gemma-3-1b": ["gemma3-1b"],
    "gemma-3-4b": ["gemma3-4b"],
}


def resolve_name(name: str) -> str | None:
    """Catalog key for a name or alias (case-insensitive), or None."""
    low = name.lower()
    if low in MODELS:
        return low
    for key, aliases in _ALIASES.items():
        if low in aliases:
            return key
    return None


def normalize_quant(quant: str) -> str:
    q = quant.upper().replace("-", "_")
    if q not in RECIPES:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(RECIPES)}")
    return q


# ---- tensor lists ---------------------------------------------------------------------------


def tensor_shapes(spec: ArchSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ne-shape) of every tensor, as convert_hf_to_gguf writes them."""
    e, hd = spec.n_embd, spec.head_dim
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (e, spec.n_vocab))]
    out.append(("token_embd_norm.weight" if spec.arch == "lfm2" else "output_norm.weight", (e,)))
    if not spec.tied:
        out.append(("output.weight", (e, spec.n_vocab)))
    if spec.rope_freqs:
        out.append(("rope_freqs.weight", (hd // 2,)))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        recurrent = spec.full_attention_interval > 0 and (i + 1) % spec.full_attention_interval != 0
        out.append((p + "attn_norm.weight", (e,)))
        if spec.arch == "lfm2":
            if i in spec.attention_layers:
                out += [
                    (p + "attn_q.weight", (e, q_dim)),
                    (p + "attn_k.weight", (e, kv_dim)),
                    (p + "attn_v.weight", (e, kv_dim)),
                    (p + "attn_output.weight", (q_dim, e)),
                    (p + "attn_q_norm.weight", (hd,)),
                    (p + "attn_k_norm.weight", (hd,)),
                ]
            else:
                out += [
                    (p + "shortconv.conv.weight", (spec.shortconv_l_cache, e)),
                    (p + "shortconv.in_proj.weight", (e, 3 * e)),
                    (p + "shortconv.out_proj.weight", (e, e)),
                ]
            out.append((p + "ffn_norm.weight", (e,)))
        elif spec.arch == "qwen35":
            out.append((p + "post_attention_norm.weight", (e,)))
            if recurrent:
                k_dim = spec.linear_k_heads * spec.linear_head_dim
                v_dim = spec.linear_v_heads * spec.linear_head_dim
                conv_dim = 2 * k_dim + v_dim
                out += [
                    (p + "attn_qkv.weight", (e, conv_dim)),
                    (p + "attn_gate.weight", (e, v_dim)),
                    (p + "ssm_out.weight", (v_dim, e)),
                    (p + "ssm_alpha.weight", (e, spec.linear_v_heads)),
                    (p + "ssm_beta.weight", (e, spec.linear_v_heads)),
                    (p + "ssm_conv1d.weight", (spec.ssm_conv, conv_dim)),
                    (p + "ssm_dt.bias", (spec.linear_v_heads,)),
                    (p + "ssm_a", (spec.linear_v_heads,)),
                    (p + "ssm_norm.weight", (spec.linear_head_dim,)),
                ]
            else:
                out += [
                    (p + "attn_q.weight", (e, 2 * q_dim)),  # query and output gate
                    (p + "attn_k.weight", (e, kv_dim)),
                    (p + "attn_v.weight", (e, kv_dim)),
                    (p + "attn_output.weight", (q_dim, e)),
                    (p + "attn_q_norm.weight", (hd,)),
                    (p + "attn_k_norm.weight", (hd,)),
                ]
        else:
            out += [
                (p + "attn_q.weight", (e, q_dim)),
                (p + "attn_k.weight", (e, kv_dim)),
                (p + "attn_v.weight", (e, kv_dim)),
                (p + "attn_output.weight", (q_dim, e)),
            ]
            if spec.qk_norm:
                out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
            if spec.arch == "gemma3":
                out += [(p + "post_attention_norm.weight", (e,)), (p + "post_ffw_norm.weight", (e,))]
            out.append((p + "ffn_norm.weight", (e,)))
        if spec.n_expert:
            fe = spec.n_ff_exp
            out += [
                (p + "ffn_gate_inp.weight", (e, spec.n_expert)),
                (p + "ffn_gate_exps.weight", (e, fe, spec.n_expert)),
                (p + "ffn_up_exps.weight", (e, fe, spec.n_expert)),
                (p + "ffn_down_exps.weight", (fe, e, spec.n_expert)),
            ]
        else:
            out += [
                (p + "ffn_gate.weight", (e, spec.n_ff)),
                (p + "ffn_up.weight", (e, spec.n_ff)),
                (p + "ffn_down.weight", (spec.n_ff, e)),
            ]
    return out


# ---- llama-quantize's type choice ----------------------------------------------------------

_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", "shortconv.conv.weight", "rope_freqs")


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _block(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def _fallback(t: str, ncols: int) -> str:
    """llama-quant's tensor_type_fallback for rows not divisible by the block size."""
    if ncols % _block(t) == 0:
        return t
    alt = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}.get(t, t)
    return alt if ncols % _block(alt) == 0 else "F16"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _sort_key(name: str) -> tuple[int, str]:
    if name.startswith("blk."):
        return int(name.split(".")[1]), name
    return -1, name


def recipe_types(spec: ArchSpec, quant: str) -> dict[str, str]:
    """Tensor name -> GGML type name that llama-quantize picks for ``quant``."""
    ftype, default = RECIPES[normalize_quant(quant)]
    shapes = dict(tensor_shapes(spec))
    names = sorted(shapes, key=_sort_key)  # llama-quantize walks tensors in this order
    tied = "output.weight" not in shapes
    n_wv = sum(1 for n in names if n.endswith(("attn_v.weight", "attn_qkv.weight")))
    i_wv = 0
    i_down = 0
    types: dict[str, str] = {}
    for name in names:
        shape = shapes[name]
        if not _allows_quantization(name, shape):
            types[name] = "F32"
            continue
        t = default
        if default == "F16":
            types[name] = "F16"
            continue
        ncols = shape[0]
        is_output = name == "output.weight" or (tied and name == "token_embd.weight")
        if is_output:
            if ncols % _block(t) != 0:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
            if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_wv, n_wv):
                t = "Q6_K"
            if spec.n_expert == 8:
                t = "Q8_0"
            i_wv += 1
        elif name.endswith("attn_k.weight"):
            if spec.n_expert == 8:
                t = "Q8_0"
        elif "ffn_down" in name:
            layer = int(name.split(".")[1]) if spec.n_expert > 1 else i_down
            if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, spec.n_layer):
                t = "Q6_K"
            i_down += 1
        elif name.endswith("attn_output.weight"):
            if spec.n_expert == 8 and ftype == "Q4_K_M":
                t = "Q5_K"
        types[name] = _fallback(t, ncols)
    return types


def _nbytes(t: str, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def catalog_facts(name: str, quant: str) -> ModelFacts:
    """Model facts for a catalog model at a quantization, without the file."""
    key = resolve_name(name)
    if key is None:
        raise KeyError(f"model {name!r} is not in the catalog; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[key]
    q = normalize_quant(quant)
    types = recipe_types(spec, q)
    tensors = [
        TensorFact(name=n, ggml_type=types[n], shape=s, nbytes=_nbytes(types[n], s)) for n, s in tensor_shapes(spec)
    ]
    n = spec.n_layer
    heads_kv = [spec.n_head_kv] * n
    if spec.attention_layers:
        heads_kv = [spec.n_head_kv if i in spec.attention_layers else 0 for i in range(n)]
    layers: list[LayerFact] = build_layers(
        spec.arch,
        n,
        n,
        [spec.n_head] * n,
        heads_kv,
        [spec.n_ff] * n,
        spec.head_dim,
        spec.head_dim,
        n_swa=spec.n_swa,
        full_attention_interval=spec.full_attention_interval or None,
    )
    ssm = SSMFacts()
    if spec.arch == "qwen35":
        ssm = SSMFacts(
            d_conv=spec.ssm_conv,
            d_inner=spec.linear_v_heads * spec.linear_head_dim,
            d_state=spec.linear_head_dim,
            n_group=spec.linear_k_heads,
        )
    if spec.shortconv_l_cache:
        ssm = shortconv_ssm(spec.shortconv_l_cache, spec.n_embd)
    weights = sum(t.nbytes for t in tensors)
    return ModelFacts(
        name=f"{spec.display}-{q}",
        architecture=spec.arch,
        file_bytes=weights + spec.header_bytes,
        header_bytes=spec.header_bytes,
        n_layer=n,
        n_layer_all=n,
        n_embd=spec.n_embd,
        n_head=spec.n_head,
        n_head_kv=spec.n_head_kv,
        head_dim_k=spec.head_dim,
        head_dim_v=spec.head_dim,
        n_ff=spec.n_ff,
        n_vocab=spec.n_vocab,
        context_length=spec.context_length,
        tied_embeddings=spec.tied,
        n_swa=spec.n_swa,
        n_expert=spec.n_expert,
        n_expert_used=spec.n_expert_used,
        n_ff_exp=spec.n_ff_exp,
        n_merges=spec.n_vocab if spec.arch != "gemma3" else 0,
        tokenizer="llama" if spec.arch == "gemma3" else "gpt2",
        ssm=ssm,
        layers=layers,
        tensors=tensors,
        file_type=q,
    )


def catalog_url(name: str, quant: str) -> str:
    key = resolve_name(name)
    if key is None:
        raise KeyError(name)
    return MODELS[key].url(normalize_quant(quant))


# A real file may differ a little from the recipe estimate (metadata, llama-quantize's per-tensor choices).
SIZE_TOLERANCE = 0.05


def facts_mismatch(header: ModelFacts, built_in: ModelFacts) -> list[str]:
    """What a file's header says differently from the catalog's facts on the numbers that matter most:
    architecture, layers, embedding width, trained context and file size (within SIZE_TOLERANCE)."""
    out = []
    for what, h, c in (
        ("architecture", header.architecture, built_in.architecture),
        ("layers", header.n_layer, built_in.n_layer),
        ("embedding width", header.n_embd, built_in.n_embd),
        ("trained context", header.context_length, built_in.context_length),
    ):
        if h != c:
            out.append(f"{what} {h} (catalog {c})")
    if abs(header.file_bytes - built_in.file_bytes) > SIZE_TOLERANCE * built_in.file_bytes:
        out.append(f"file size {header.file_bytes} bytes (catalog {built_in.file_bytes})")
    return out


def for_file_name(file_name: str) -> tuple[str, str] | None:
    """The (catalog model, quant) whose published file has this name: how a model on a PVC is recognised."""
    for key, spec in MODELS.items():
        for quant in RECIPES:
            if spec.hf_file.format(quant=quant) == file_name:
                return key, quant
    return None
