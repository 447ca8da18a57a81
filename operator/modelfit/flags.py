"""The llama-server flags the plan owns and the flags no spec may pass: ``FLAGS`` renders the plan's arguments
and refuses them in ``spec.serverArgs``; ``REFUSED`` refuses the rest with the reason why.

Apart from the planner so that the CRD's types (``api``) can refuse them without importing it. Adding a
server flag the plan sets is one row here (its spellings and the plan value it renders), the spec field
that feeds it, and the chart value. Both tables feed the operator's check (``api``), ``modelfit plan -f``
and the CRD's CEL rules, so the three refuse the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

Value = str | int | bool | None


class Flag(NamedTuple):
    """A llama-server flag: every spelling llama-server accepts (the first is rendered) and the key of the plan
    value it renders (``render_args``): a bool renders the bare flag when True, None renders nothing, anything
    else renders the flag and its value. ``value=None``: owned (refused in serverArgs) but never rendered."""

    spellings: tuple[str, ...]
    value: str | None = None


# In the order the plan renders them (the order is part of the rendered pod, and so of the plan hash).
FLAGS: tuple[Flag, ...] = (
    Flag(("-m", "--model"), "model"),
    Flag(("--host",), "host"),
    Flag(("--port",), "port"),
    Flag(("-c", "--ctx-size"), "ctx"),
    Flag(("-np", "--parallel"), "parallel"),
    Flag(("--kv-unified", "-kvu"), "kv_unified"),
    Flag(("--no-kv-unified", "-no-kvu"), "no_kv_unified"),
    Flag(("-b", "--batch-size"), "batch"),
    Flag(("-ub", "--ubatch-size"), "ubatch"),
    Flag(("-t", "--threads"), "threads"),
    Flag(("-fa", "--flash-attn"), "flash_attn"),
    Flag(("-ctk", "--cache-type-k"), "type_k"),
    Flag(("-ctv", "--cache-type-v"), "type_v"),
    Flag(("-ngl", "--gpu-layers", "--n-gpu-layers"), "gpu_layers"),
    Flag(("--load-mode", "-lm"), "load_mode"),
    Flag(("--cache-ram", "-cram"), "cache_ram"),
    Flag(("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"), "ctx_checkpoints"),
    Flag(("--fit", "-fit"), "fit"),
    Flag(("--no-repack", "-nr"), "no_repack"),
    Flag(("--metrics",), "metrics"),
    # Owned, never rendered: they change how weights load or what the KV cache holds, which the plan decides.
    Flag(("--mmap", "--no-mmap", "--mlock", "--repack", "--swa-full")),
)

OWNED_FLAGS = frozenset(s for f in FLAGS for s in f.spellings)

Kind = Literal["secret", "memory", "reach", "pod"]

# What each kind of refused flag does, as the CRD's messages say it.
KINDS: dict[Kind, str] = {
    "secret": "carry secrets into the pod's arguments (use spec.apiKeySecretRef or spec.model.tokenSecretRef)",
    "memory": "load or move memory the plan does not count",
    "reach": "fetch from the network, or let requests reach the pod's files, commands or disk",
    "pod": "break the pod the operator renders (its HTTP probes, or llama-server exits at start)",
}


class Refused(NamedTuple):
    """llama-server flags no spec may pass, whatever their value: every spelling (llama.cpp b11434's
    ``common/arg.cpp``, plus older releases' for images set in spec.image) and why, read after the flag."""

    spellings: tuple[str, ...]
    kind: Kind
    why: str


_SPEC_MODEL = "downloads a model the operator did not plan: set spec.model"
_WEIGHTS = "loads weights the plan does not count"
_SPLIT = "moves weights between CPU and GPU, which the plan splits by gpuLayers"
_DRAFT = "downloads a draft model the plan does not count"
_AGENT = "lets API clients run commands, read files or reach the network from the pod"
_EXITS = "makes llama-server print and exit, so the pod restarts forever"

REFUSED: tuple[Refused, ...] = (
    # Secrets: a pod's arguments are readable by anyone who can read the pod.
    Refused(("--api-key",), "secret", "carries a secret into the pod's arguments: use spec.apiKeySecretRef"),
    Refused(("--api-key-file",), "secret", "names a key file the pod does not mount: use spec.apiKeySecretRef"),
    Refused(
        ("-hft", "--hf-token"), "secret", "carries a secret into the pod's arguments: use spec.model.tokenSecretRef"
    ),
    # Memory the plan does not count: the pod would be OOM-killed or not fit its node.
    Refused(("-mm", "--mmproj"), "memory", f"{_WEIGHTS} (a multimodal projector)"),
    Refused(("-mmu", "--mmproj-url"), "memory", f"downloads and {_WEIGHTS} (a multimodal projector)"),
    Refused(("--lora", "--lora-scaled"), "memory", f"{_WEIGHTS} (LoRA adapters)"),
    Refused(("--control-vector", "--control-vector-scaled"), "memory", f"{_WEIGHTS} (control vectors)"),
    Refused(("--spec-draft-model", "-md", "--model-draft"), "memory", f"{_WEIGHTS} (a draft model and its KV cache)"),
    Refused(("--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft", "-hffd", "--hf-file-draft"), "memory", _DRAFT),
    Refused(
        ("--spec-type",),
        "memory",
        "picks speculative decoding types; draft-* build a draft context the plan does not count "
        "(--spec-default turns on n-gram drafting)",
    ),
    Refused(("-mv", "--model-vocoder", "-hfv", "-hfrv", "--hf-repo-v", "-hffv", "--hf-file-v"), "memory", _WEIGHTS),
    Refused(("-ot", "--override-tensor"), "memory", _SPLIT),
    Refused(("-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "-ncffn", "--n-cpu-ffn"), "memory", _SPLIT),
    Refused(
        ("-nkvo", "--no-kv-offload"), "memory", "keeps the KV cache in host memory, which the plan counts on the GPU"
    ),
    Refused(("-dev", "--device"), "memory", "picks the devices the plan places layers on"),
    Refused(("--override-kv",), "memory", "changes the model metadata the plan sized memory from"),
    Refused(("--kv-unified-per-slot",), "memory", "sizes the KV cache, which the plan sizes from spec.context"),
    Refused(("--models-dir", "--models-preset"), "memory", "serves other models (router mode) the plan does not count"),
    # Reach: the network, the node, or the container's files and commands, none of which the operator vetted.
    Refused(
        ("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-dr", "--docker-repo"),
        "reach",
        _SPEC_MODEL,
    ),
    Refused(
        (
            "--embd-gemma-default",
            "--embd-bge-small-en-default",
            "--embd-e5-small-en-default",
            "--embd-gte-small-default",
            "--fim-qwen-1.5b-default",
            "--fim-qwen-3b-default",
            "--fim-qwen-7b-default",
            "--fim-qwen-7b-spec",
            "--fim-qwen-14b-spec",
            "--fim-qwen-30b-default",
            "--gpt-oss-20b-default",
            "--gpt-oss-120b-default",
            "--vision-gemma-4b-default",
            "--vision-gemma-12b-default",
        ),
        "reach",
        _SPEC_MODEL,
    ),
    Refused(("--rpc",), "reach", "offloads the model to RPC servers over the network, outside the plan"),
    Refused(("--path",), "reach", "serves the container's files over HTTP (its environment holds the API key)"),
    Refused(("--media-path",), "reach", "lets requests read the container's files"),
    Refused(("--tools", "--tools-runtime", "-ag", "--agent"), "reach", _AGENT),
    Refused(("--ui-mcp-proxy", "--webui-mcp-proxy", "--mcp-servers-config", "--mcp-servers-json"), "reach", _AGENT),
    Refused(
        ("--slot-save-path", "--log-prompts-dir"),
        "reach",
        "writes request data to the pod's /tmp (1Gi), which evicts the pod when full",
    ),
    # The pod: its probes check /health over HTTP, and a server that exits at once restarts forever.
    Refused(("--api-prefix",), "pod", "moves /health off the path the pod's probes check"),
    Refused(
        ("--ssl-key-file", "--ssl-cert-file"),
        "pod",
        "serves HTTPS from key files the pod does not mount, and its probes speak HTTP",
    ),
    Refused(("-h", "--help", "--usage", "--version", "--license", "--completion-bash"), "pod", _EXITS),
    Refused(("-cl", "--cache-list", "--list-devices"), "pod", _EXITS),
)

REFUSED_FLAGS: dict[str, Refused] = {s: r for r in REFUSED for s in r.spellings}
assert len(REFUSED_FLAGS) == sum(len(r.spellings) for r in REFUSED), "a spelling is refused twice"
assert not OWNED_FLAGS & REFUSED_FLAGS.keys(), "a flag is both owned and refused"


def flag_of(arg: str) -> str:
    """The flag an argument names, as llama-server reads it: a long flag's ``_`` is its ``-``
    (``--ctx_size`` is ``--ctx-size``); ``--flag=value`` and ``"--flag value"`` (one argument) name ``--flag``,
    which llama-server refuses to parse but which would put the value in the pod's arguments all the same."""
    if arg.startswith("--"):
        arg = arg.replace("_", "-")
    return arg.split("=", 1)[0].split(" ", 1)[0]


def cel_refuses(spellings: Iterable[str]) -> str:
    """A CEL rule on ``serverArgs`` that is false when an argument names one of ``spellings`` (``flag_of``)."""
    names = "[" + ", ".join(f"'{s}'" for s in sorted(spellings)) + "]"
    norm = "self.map(a, a.startsWith('--') ? a.replace('_', '-') : a)"
    return f"{norm}.all(a, !{names}.exists(f, a == f || a.startsWith(f + '=') || a.startsWith(f + ' ')))"


def render_args(values: Mapping[str, Value]) -> list[str]:
    """The argument list of the plan's values, keyed by ``Flag.value``; every rendered flag must have a value."""
    args: list[str] = []
    for flag in FLAGS:
        if flag.value is None:
            continue
        v = values[flag.value]
        if v is True:
            args.append(flag.spellings[0])
        elif v is not False and v is not None:
            args += [flag.spellings[0], str(v)]
    return args
