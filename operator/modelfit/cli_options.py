"""What the command line accepts: option values checked where they are parsed, in the spec's own words.

The spec options (``--context``, ``--threads``, ...) are ``api.ModelDeploymentSpec`` fields: their
ranges, choices and defaults are read from the model's fields (``Field(ge=, le=)``, ``Literal``), so
the CLI accepts exactly what the CRD accepts. One table (``SPEC_OPTIONS``) registers them for
``modelfit plan``, ``serve`` and ``values``, and turns the parsed options back into spec words
(``spec_words``). The node options (``--memory``, ``--cpus``, ...) describe a node, not a spec.

A converter raises argparse.ArgumentTypeError; ``checked`` turns that into a ``Rejected`` value
that ``cli.main`` reports as one line naming the option (exit 2), instead of argparse exiting
from inside parse_args.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Le

from . import catalog
from .api import ModelDeploymentSpec, ServiceSpec
from .nodes import PROFILES, MiB
from .sizing import MIN_CONTEXT_DEFAULT, Policy
from .sources import DEFAULT_QUANT

# ---- refusals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """An option value a converter refused; cli.main prints the message and exits 2."""

    message: str


def checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that hands a refusal to cli.main as a ``Rejected`` value."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:
            return Rejected(str(exc))

    parse.__name__ = convert.__name__
    return parse


# ---- the spec model's own limits -----------------------------------------------------------------


def _constraints(model: type[Any], name: str) -> list[object]:
    """The field's constraint annotations, also those of an int inside ``int | Literal[...]``."""
    info = model.model_fields[name]
    found: list[object] = list(info.metadata)
    for arg in get_args(info.annotation):
        for meta in getattr(arg, "__metadata__", ()):  # Annotated[int, Field(ge=.., le=..)]
            found += getattr(meta, "metadata", [])
    return found


def bounds(name: str, model: type[Any] = ModelDeploymentSpec) -> tuple[int, int]:
    """The ``ge``/``le`` range of an integer field."""
    found = _constraints(model, name)
    lo = next(int(c.ge) for c in found if isinstance(c, Ge))  # type: ignore[call-overload]
    hi = next(int(c.le) for c in found if isinstance(c, Le))  # type: ignore[call-overload]
    return lo, hi


def words(name: str, model: type[Any] = ModelDeploymentSpec) -> tuple[str, ...]:
    """The ``Literal`` words a field accepts (all of them for an enumeration, ``max``/``auto`` beside a number)."""
    annotation = model.model_fields[name].annotation
    parts = get_args(annotation) if get_origin(annotation) is not Literal else (annotation,)
    return tuple(w for part in parts if get_origin(part) is Literal for w in get_args(part))


def default(name: str) -> Any:
    return ModelDeploymentSpec.model_fields[name].default


CONTEXT_MIN, CONTEXT_MAX = bounds("context")
MEMORY_MIN, MEMORY_MAX = MiB, 1 << 50  # 1Mi .. 1Pi: node sizes, no spec field
CPUS_MAX = 4096
GPUS_MAX = 64
BANDWIDTH_MAX_GBPS = 10000.0  # beyond any memory system today

# ---- converters ------------------------------------------------------------------------------------


def _whole(text: str) -> int | None:
    return int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else None


def int_in(lo: int, hi: int, unit: str = "", word: str | None = None) -> Callable[[str], Any]:
    """A whole number (of unit) from lo to hi, or ``word`` (auto, max) where the field takes one."""
    what = f"a whole number of {unit}" if unit else "a whole number"
    rule = f"must be {word} or {what}" if word else f"must be {what}"

    def whole_number(text: str) -> int | str:
        if word is not None and text == word:
            return word
        n = _whole(text)
        if n is None or not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{rule} from {lo} to {hi}, not {text!r}")
        return n

    return whole_number


def spec_int(name: str, unit: str = "") -> Callable[[str], Any]:
    """The converter of an integer spec field, with its range and its word (auto, max) from the model."""
    word = next(iter(words(name)), None)
    return int_in(*bounds(name), unit=unit, word=word)


_context_number = spec_int("context")


def context_arg(text: str) -> int | Literal["max"]:
    """``max`` (the model's trained context) or a size in tokens, as spec.context."""
    if _whole(text) == 0:
        # llama-server's `-c 0` means the model's full context: say so rather than plan for 0
        raise argparse.ArgumentTypeError(
            f"0 is not a context size; use max for the model's full context, or {CONTEXT_MIN} to {CONTEXT_MAX}"
        )
    value: int | Literal["max"] = _context_number(text)
    return value


UBATCH_MIN, UBATCH_MAX = bounds("ubatch", Policy)  # not a spec word: the planner's micro-batch
PORT_MIN, PORT_MAX = bounds("port", ServiceSpec)  # a TCP port, as spec.service.port
ubatch_arg = int_in(UBATCH_MIN, UBATCH_MAX)
port_arg = int_in(PORT_MIN, PORT_MAX)
gpus_arg = int_in(0, GPUS_MAX)


def bandwidth_arg(text: str) -> int:
    """A memory bandwidth in GB/s (as the node label modelfit.io/memory-bandwidth-gbps), in bytes/s."""
    try:
        gbps = float(text)
    except ValueError:
        gbps = float("nan")
    if not 0.1 <= gbps <= BANDWIDTH_MAX_GBPS:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be GB/s from 0.1 to {BANDWIDTH_MAX_GBPS:g}, not {text!r}")
    return int(gbps * 1e9)


def quant_arg(text: str) -> str:
    """A catalog quantization in any case (q4_k_m, Q4-K-M), as the CRD accepts it; returns Q4_K_M."""
    try:
        return catalog.normalize_quant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def node_arg(text: str) -> str:
    """A hardware profile name or ``host``."""
    if text != "host" and text not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown node profile {text!r}; choose from {', '.join(PROFILES)}, host")
    return text


def _quantity(text: str) -> Decimal:
    """A Kubernetes quantity, parsed as the API server does (kubernetes.utils.parse_quantity)."""
    from kubernetes.utils import parse_quantity  # imported here: the kubernetes package is slow to import

    try:
        q: object = parse_quantity(text)  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation):
        raise ValueError(text) from None
    if not isinstance(q, Decimal) or not q.is_finite():
        raise ValueError(text)
    return q


def _unit_hint(text: str) -> str:
    """How to write a size that is almost a Kubernetes quantity: 2GB, 2gi, 2GiB."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpe])i?b?\s*", text, re.IGNORECASE)
    if m is None:
        return ""
    num, unit = m.group(1), m.group(2).upper()
    return f"; write {num}{unit}i (binary) or {num}{'k' if unit == 'K' else unit} (decimal)"


def memory_arg(text: str) -> int:
    """Bytes from a Kubernetes quantity (4Gi, 4096Mi, 4G), from 1Mi to 1Pi."""
    rule = "must be a Kubernetes quantity from 1Mi to 1Pi (e.g. 4Gi, 4096Mi, 4G)"
    try:
        q = _quantity(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, not {text!r}{_unit_hint(text)}") from None
    if not MEMORY_MIN <= q <= MEMORY_MAX:
        t, hint = text.strip(), ""
        if _whole(t) is not None and q >= 0:
            hint = f"; a plain number is bytes: write {t}Gi or {t}Mi"
        elif t.endswith("m") and q >= 0:
            hint = f"; m means milli: write {t[:-1]}Mi or {t[:-1]}M"
        raise argparse.ArgumentTypeError(f"{rule}, not {text!r}{hint}")
    return int(q)


def cpus_arg(text: str) -> int:
    """CPU millicores from a Kubernetes quantity (2, 1.5, 1500m), from 1m to 4096."""
    try:
        q = _quantity(text)
    except ValueError:
        q = Decimal(-1)
    if not Decimal("0.001") <= q <= CPUS_MAX:
        raise argparse.ArgumentTypeError(f"must be a number of CPUs from 0.001 (1m) to {CPUS_MAX}, not {text!r}")
    return int(q * 1000)


# ---- the spec options: one table for plan, serve and values ----------------------------------------


@dataclass(frozen=True)
class SpecOption:
    """A ModelDeploymentSpec field as a command-line option; the parsed value lands in ``args.<field>``.

    ``help`` may name ``{range}`` (the field's ge..le), ``{choices}`` and ``{default}``; a field of
    ``Literal`` words only becomes ``choices``, a bool ``--x/--no-x``, an integer field a checked number.
    """

    field: str
    flags: tuple[str, ...]
    help: str
    unit: str = ""

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def alias(self) -> str:
        """The field's name in a manifest (camelCase)."""
        return ModelDeploymentSpec.model_fields[self.field].alias or self.field

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        annotation = ModelDeploymentSpec.model_fields[self.field].annotation
        enumeration = get_origin(annotation) is Literal
        number = annotation is not bool and not enumeration
        text = self.help.format(
            range="{} to {}".format(*bounds(self.field)) if number else "",
            choices=", ".join(words(self.field)),
            default=default(self.field),
        )
        if annotation is bool:
            parser.add_argument(*self.flags, dest=self.field, action=argparse.BooleanOptionalAction, help=text)
        elif enumeration:
            parser.add_argument(*self.flags, dest=self.field, choices=list(words(self.field)), help=text)
        else:
            convert = context_arg if self.field == "context" else spec_int(self.field, self.unit)
            metavar = self.flag.removeprefix("--").upper().replace("-", "_")
            parser.add_argument(*self.flags, dest=self.field, type=checked(convert), metavar=metavar, help=text)


SPEC_OPTIONS: tuple[SpecOption, ...] = (
    SpecOption(
        "context",
        ("--context",),
        "context size in tokens, {range}, or max for the model's trained context (default {default}); a number "
        "is also the least context that fits, unless --adapt",
    ),
    SpecOption(
        "min_context",
        ("--min-context",),
        "smallest acceptable context, {range} (at most --context; default "
        f"{MIN_CONTEXT_DEFAULT}): how far max, or --adapt, may shrink the context",
    ),
    SpecOption("parallel", ("--parallel",), "parallel slots, {range} (default {default})"),
    SpecOption(
        "threads",
        ("--threads",),
        "llama-server threads and the CPU request in cores, {range}, or auto (default: the fewest that reach "
        "the node's memory bandwidth, at least 2)",
    ),
    SpecOption(
        "kv_cache_type",
        ("--kv-cache-type",),
        "KV cache type: {choices} (default auto: f16 when the context fits, else q8_0; q4_0 degrades answers "
        "and is used only when named)",
    ),
    SpecOption("load_mode", ("--load-mode",), "how weights are loaded: {choices} (default {default})"),
    SpecOption("flash_attention", ("--flash-attention",), "flash attention: {choices} (default {default})"),
    SpecOption(
        "prompt_cache",
        ("--cache-ram", "--prompt-cache"),
        "prompt cache (llama-server --cache-ram) in MiB, {range} (0: off), or auto (default: two full-context "
        "states of a slot, at most a quarter of the free memory and 8192; 0 when memory is short); counted in "
        "the memory limit",
        unit="MiB",
    ),
    SpecOption("backend", ("--backend",), "compute backend: {choices} (default {default}: the node's GPU, else cpu)"),
    SpecOption("gpu_layers", ("--gpu-layers",), "layers on the GPU, {range}, or auto (default {default})"),
    SpecOption("replicas", ("--replicas",), "llama-server pods, {range} (default {default})"),
    SpecOption(
        "adapt",
        ("--adapt",),
        "let the plan shrink the context down to --min-context, quantize the KV cache to q8_0 or change "
        "backend to fit (default: no)",
    ),
)
OPTIONS = {o.field: o for o in SPEC_OPTIONS}


def add_spec_options(parser: argparse.ArgumentParser, fields: Iterable[str]) -> None:
    """Register the spec options for ``fields`` (each defaults to None: not given, the spec's default)."""
    for name in fields:
        OPTIONS[name].add_to(parser)


def spec_words(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the command line sets, by their manifest names (context, minContext, ...)."""
    check_min_context(getattr(args, "context", None), getattr(args, "min_context", None))
    return {o.alias: getattr(args, o.field) for o in SPEC_OPTIONS if getattr(args, o.field, None) is not None}


def check_min_context(context: object, min_context: int | None) -> None:
    """--min-context above --context is refused, as the CRD's CEL rule refuses minContext above context."""
    if isinstance(context, int) and min_context is not None and min_context > context:
        raise ValueError(f"argument --min-context: {min_context} is above --context {context}")


# ---- the model argument ----------------------------------------------------------------------------

DEFAULT_QUANT_REASON = (
    f"quant {DEFAULT_QUANT}: the default, as --quant was not given ({DEFAULT_QUANT} is the usual balance of file "
    f"size and answer quality; --quant picks another: {', '.join(catalog.RECIPES)})"
)
