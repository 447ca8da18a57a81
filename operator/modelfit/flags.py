"""The llama-server flags the plan owns: one table that renders the plan's arguments and refuses them in
``spec.serverArgs``.

Apart from the planner so that the CRD's types (``api``) can refuse them without importing it. Adding a
server flag the plan sets is one row here (its spellings and the plan value it renders), the spec field
that feeds it, and the chart value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

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
    # Owned, never rendered: the model comes from spec.model only.
    Flag(("-hf", "--hf-repo", "-mu", "--model-url")),
)

OWNED_FLAGS = frozenset(s for f in FLAGS for s in f.spellings)


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
