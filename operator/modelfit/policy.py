"""The one meaning of a ModelDeployment spec for the planner: spec -> ``sizing.Policy``. Pure.

Every rule that gives a spec word its planning meaning lives here, and every door uses it: the operator
(``placement``), ``modelfit plan``/``serve`` (which build a spec from their flags) and ``modelfit values``.

- context: a number the user set is the minimum too (llama.cpp's own fitter never reduces a context the
  user set); ``max`` asks for the trained context and accepts down to ``minContext`` (default 4096).
- adapt: the second, relaxed try frees the context down to ``minContext``, the backend, the GPU layers and
  the KV type, but q4_0 KV stays opt-in (an explicit q4_0 is kept, anything else becomes auto).
- headroom: 5% of the predicted peak, raised by the OOM boost the operator records after an OOM kill.
- threads: never above the pod's CPU limit (``spec.resources.limits.cpu``), where the CFS quota would
  throttle the extra threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .api import ModelDeploymentSpec
from .occupancy import cpu_millis
from .sizing import KV_OPT_IN, MIN_CONTEXT_DEFAULT, Policy

BASE_HEADROOM = 0.05


def min_context(spec: ModelDeploymentSpec, relaxed: bool = False) -> int:
    """The least context that counts as fitting: the one the user set, else minContext (or its default)."""
    if relaxed or spec.context == "max":
        return spec.min_context or MIN_CONTEXT_DEFAULT
    return int(spec.context)


def cpu_limit_threads(spec: ModelDeploymentSpec) -> int | None:
    """The most threads a CPU limit lets run unthrottled (whole cores, at least 1), or None without a limit."""
    limit = (spec.resources.limits or {}).get("cpu") if spec.resources else None
    return None if limit is None else max(1, cpu_millis(limit) // 1000)


def policy_for(
    spec: ModelDeploymentSpec,
    headroom_boost: float = 0.0,
    relaxed: bool = False,
    knobs: Mapping[str, Any] | None = None,
) -> Policy:
    """The planner's policy for ``spec``; ``relaxed`` is adapt's second try, ``headroom_boost`` the OOM boost,
    ``knobs`` Policy fields no spec field sets (the CLI's --ubatch and --port)."""
    fields: dict[str, Any] = {
        "context": spec.context,
        "min_context": min_context(spec, relaxed),
        "parallel": spec.parallel,
        "kv_cache_type": spec.kv_cache_type,
        "load_mode": spec.load_mode,
        "flash_attention": spec.flash_attention,
        "backend": spec.backend,
        "gpu_layers": spec.gpu_layers,
        "cache_ram_mib": spec.prompt_cache,
        "threads": spec.threads,
        "max_threads": cpu_limit_threads(spec),
        "headroom": min(1.0, BASE_HEADROOM + headroom_boost),
    }
    if relaxed:
        fields.update(
            backend="auto",
            gpu_layers="auto",
            kv_cache_type=KV_OPT_IN if spec.kv_cache_type == KV_OPT_IN else "auto",
        )
    return Policy(**fields, **(knobs or {}))
