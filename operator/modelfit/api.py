"""ModelDeployment v1alpha1: the spec users write and the status the operator reports.

The CRD's OpenAPI schema is generated from these models (see ``crd.py``), so a
description here is what ``kubectl explain`` shows.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .catalog import RECIPES
from .flags import KINDS, OWNED_FLAGS, REFUSED, REFUSED_FLAGS, cel_refuses, flag_of

GROUP = "modelfit.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
API_VERSION = f"{GROUP}/{VERSION}"

QuantName = Literal["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
assert set(QuantName.__args__) == set(RECIPES), "QuantName must list catalog.RECIPES"  # type: ignore[attr-defined]


def _quant_pattern() -> str:
    """The quant names in any case, with - or _: what `modelfit plan --quant` accepts (catalog.normalize_quant)."""

    def spell(name: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else "[_-]" if c == "_" else c for c in name)

    return "^(" + "|".join(spell(q) for q in QuantName.__args__) + ")$"  # type: ignore[attr-defined]


def _canonical_quant(value: Any) -> Any:
    return value.upper().replace("-", "_") if isinstance(value, str) else value


# Case-insensitive like the CLI; the operator works with (and reports) the canonical upper-case name.
Quant = Annotated[
    QuantName,
    BeforeValidator(_canonical_quant),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 8,
            "pattern": _quant_pattern(),
            # The pattern keeps the schema structural; this rule gives the readable message.
            "x-kubernetes-validations": [
                {
                    "rule": "self.upperAscii().replace('-', '_') in ["
                    + ", ".join(f"'{q}'" for q in QuantName.__args__)
                    + "]",
                    "message": "quant must be one of " + ", ".join(QuantName.__args__) + " (any case, - or _)",
                }
            ],
        }
    ),
]
Backend = Literal["auto", "cpu", "cuda", "rocm", "vulkan"]

# serverArgs' CEL rules, from the same tables as ``server_args_problem`` (``flags.flag_of`` spells both): the
# flags the plan owns, then one rule per kind of refused flag, its message naming every spelling.
OWNED_FLAGS_RULE: dict[str, Any] = {
    "rule": cel_refuses(OWNED_FLAGS),
    "message": "serverArgs must not contain flags the plan owns (model, context, parallel, KV cache, GPU layers, "
    "threads, batch, load mode, host, port, fit...); set the matching spec field instead",
}
REFUSED_FLAGS_RULES: list[dict[str, Any]] = [
    {
        "rule": cel_refuses(s for r in REFUSED if r.kind == kind for s in r.spellings),
        "message": f"serverArgs must not contain flags that {text}: "
        + ", ".join(s for r in REFUSED if r.kind == kind for s in r.spellings),
    }
    for kind, text in KINDS.items()
]
INT_OR_STRING: dict[str, Any] = {"x-kubernetes-int-or-string": True}

# The name of a ModelDeployment names its Service (a DNS-1035 label) and is a label value on every child
# (at most 63 characters), so only names that make valid children are admitted (CEL at the CRD's root).
NAME_MAX = 63
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_RULES: list[dict[str, str]] = [
    {
        "rule": f"self.metadata.name.size() <= {NAME_MAX}",
        "message": f"metadata.name must be at most {NAME_MAX} characters: it names the Service and is a label "
        "value on every pod",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a "
        "letter and ending with a letter or digit (it names the Service)",
    },
]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a ModelDeployment's children (the CRD's NAME_RULES, for older CRDs), or None."""
    if len(name) > NAME_MAX:
        return f"metadata.name {name[:20]}... has {len(name)} characters; at most {NAME_MAX} make a valid label value"
    if not re.match(NAME_PATTERN, name):
        return (
            f"metadata.name {name} is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter)"
        )
    return None


# A Kubernetes quantity without a sign (requests and limits are never negative), as the API server parses it.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)]
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")


def _node_affinity_problem(affinity: dict[str, Any]) -> str | None:
    """What is malformed in the required node affinity the planner reads (the API server checks the rest)."""
    node = affinity.get("nodeAffinity")
    if node is None:
        return None
    if not isinstance(node, dict):
        return "nodeAffinity must be an object"
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    where = "nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    if not isinstance(required, dict):
        return f"{where} must be an object with nodeSelectorTerms"
    terms = required.get("nodeSelectorTerms")
    if not isinstance(terms, list) or not terms:
        return f"{where}.nodeSelectorTerms must be a non-empty list"
    for i, term in enumerate(terms):
        if not isinstance(term, dict):
            return f"{where}.nodeSelectorTerms[{i}] must be an object"
        for part in ("matchExpressions", "matchFields"):
            exprs = term.get(part)
            if exprs is None:
                continue
            if not isinstance(exprs, list):
                return f"{where}.nodeSelectorTerms[{i}].{part} must be a list"
            for j, e in enumerate(exprs):
                at = f"{where}.nodeSelectorTerms[{i}].{part}[{j}]"
                if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"]:
                    return f"{at} must be an object with a key"
                if e.get("operator") not in _SELECTOR_OPERATORS:
                    return f"{at}.operator must be one of {', '.join(_SELECTOR_OPERATORS)}"
                values = e.get("values")
                if values is not None and not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
                    return f"{at}.values must be a list of strings"
    return None


# A model name as OpenAI clients send it ("qwen3.5-0.8b", "org/model:q4_0"): the gateway matches it exactly.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
ModelAlias = Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class HuggingFaceSource(_Model):
    """A GGUF file in a Hugging Face repository, downloaded over HTTPS."""

    repo: str = Field(min_length=3, max_length=256, description="Repository, e.g. unsloth/Qwen3.5-0.8B-GGUF.")
    file: str = Field(min_length=1, max_length=512, description="GGUF file name inside the repository.")
    revision: str = Field(default="main", max_length=128, description="Branch, tag or commit (default main).")


class PvcSource(_Model):
    """A GGUF file already on a PersistentVolumeClaim in the same namespace (mounted read-only)."""

    claim_name: str = Field(min_length=1, max_length=253, description="Name of the PersistentVolumeClaim.")
    path: str = Field(min_length=1, max_length=1024, description="Path of the .gguf file inside the volume.")


class TokenSecretRef(_Model):
    """A key in a Secret of the same namespace holding a Hugging Face (or any Bearer) token."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key inside the Secret.")


class ModelSource(_Model):
    """Where the GGUF model comes from: exactly one of catalog (with quant), url, huggingFace or pvc."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.catalog), has(self.url), has(self.huggingFace), has(self.pvc)]"
                    ".filter(x, x).size() == 1",
                    "message": "exactly one of catalog, url, huggingFace or pvc must be set",
                },
                {"rule": "!has(self.catalog) || has(self.quant)", "message": "catalog requires quant"},
                {"rule": "!has(self.quant) || has(self.catalog)", "message": "quant applies to catalog models only"},
                {
                    "rule": "!has(self.tokenSecretRef) || !has(self.pvc)",
                    "message": "tokenSecretRef applies to downloaded models (catalog, url, huggingFace), not pvc",
                },
            ]
        }
    )

    catalog: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Name of a model in modelfit's catalog, e.g. qwen3.5-0.8b.",
    )
    quant: Quant | None = Field(
        default=None,
        description="Quantization of a catalog model: Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0 or F16 (any case).",
    )
    url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://", description="HTTP(S) URL of a .gguf file."
    )
    hugging_face: HuggingFaceSource | None = Field(default=None, description="A file in a Hugging Face repository.")
    pvc: PvcSource | None = Field(default=None, description="A file on an existing PersistentVolumeClaim.")
    sha256: str | None = Field(
        default=None, pattern=r"^[a-f0-9]{64}$", description="Expected SHA-256 of the file; the download is verified."
    )
    token_secret_ref: TokenSecretRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face token, sent as 'Authorization: Bearer' by the download "
        "(env HF_TOKEN of the fetch-model init container) and by the operator's header read.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        n = sum(x is not None for x in (self.catalog, self.url, self.hugging_face, self.pvc))
        if n != 1:
            raise ValueError("exactly one of catalog, url, huggingFace or pvc must be set")
        if self.catalog is not None and self.quant is None:
            raise ValueError("catalog requires quant")
        if self.quant is not None and self.catalog is None:
            raise ValueError("quant applies to catalog models only")
        if self.token_secret_ref is not None and self.pvc is not None:
            raise ValueError("tokenSecretRef applies to downloaded models (catalog, url, huggingFace), not pvc")
        return self


class ImageOverrides(_Model):
    """Container image per backend; unset backends use the pinned official llama.cpp server images."""

    cpu: str | None = Field(default=None, max_length=512, description="Image for the CPU backend.")
    cuda: str | None = Field(default=None, max_length=512, description="Image for the CUDA backend.")
    rocm: str | None = Field(default=None, max_length=512, description="Image for the ROCm backend.")
    vulkan: str | None = Field(default=None, max_length=512, description="Image for the Vulkan backend.")


class SecretKeyRef(_Model):
    """A key in a Secret of the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="api-key", min_length=1, max_length=253, description="Key inside the Secret.")


class EmptyDirCache(_Model):
    """Download into an emptyDir on every new pod (sized from the model file)."""

    medium: Literal["", "Memory"] = Field(default="", description="emptyDir medium; Memory counts against the pod.")


class PvcCache(_Model):
    """Download once into a PersistentVolumeClaim the operator creates."""

    storage_class: str | None = Field(
        default=None, max_length=253, description="StorageClass (cluster default when unset)."
    )
    size: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description="Requested size; by default the model file size plus 10% and 1Gi.",
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        default="ReadWriteOnce", description="Access mode; use ReadWriteMany for replicas on several nodes."
    )


class HostPathCache(_Model):
    """Keep models in a directory on the node (not allowed by the restricted Pod Security Standard)."""

    path: str = Field(min_length=1, max_length=1024, pattern=r"^/", description="Absolute directory on the node.")


class ModelCache(_Model):
    """Where the downloaded model lives: at most one of emptyDir (default), pvc or hostPath."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.emptyDir), has(self.pvc), has(self.hostPath)].filter(x, x).size() <= 1",
                    "message": "set at most one of emptyDir, pvc or hostPath",
                }
            ]
        }
    )

    empty_dir: EmptyDirCache | None = Field(default=None, description="Cache in an emptyDir (default).")
    pvc: PvcCache | None = Field(default=None, description="Cache in a PersistentVolumeClaim created for this model.")
    host_path: HostPathCache | None = Field(default=None, description="Cache in a node directory.")

    @model_validator(mode="after")
    def _at_most_one(self) -> ModelCache:
        if sum(x is not None for x in (self.empty_dir, self.pvc, self.host_path)) > 1:
            raise ValueError("set at most one of emptyDir, pvc or hostPath")
        return self


class ServiceSpec(_Model):
    """The Service in front of llama-server."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")
    port: int = Field(default=8080, ge=1, le=65535, description="Service port (llama-server listens on 8080).")


class ResourceOverride(_Model):
    """Requests and limits that replace the planned ones key by key (use with care: the plan is sized to fit)."""

    requests: dict[str, Quantity] | None = Field(default=None, description="Resource requests, e.g. cpu: '4'.")
    limits: dict[str, Quantity] | None = Field(default=None, description="Resource limits, e.g. memory: 8Gi.")


class Autoscaling(_Model):
    """Load-based scaling by a HorizontalPodAutoscaler on the ModelDeployment's /scale subresource.

    The operator renders an autoscaling/v2 HPA with one per-pod metric (requests in flight plus
    requests waiting for a slot, served by any custom-metrics adapter) whose target is the plan's
    ``parallel`` slots times ``targetUtilization``. The HPA writes spec.replicas through /scale;
    the operator places every replica the way it places the first.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}
            ]
        }
    )

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest pods. 0: an idle model goes to zero pods and frees its memory (needs routing.mode "
        "InferencePool: the picker holds a request for a model at zero while one pod starts).",
    )
    max_replicas: int = Field(ge=1, le=1000, description="Most pods.")
    target_utilization: int = Field(
        default=80,
        ge=1,
        le=100,
        description="Percent of a pod's parallel slots busy (requests in flight plus deferred, averaged over "
        "pods) that the HPA keeps; above it a pod is added. With parallel 4 and 80 the target is 3.2 per pod. "
        "With parallel 1 any steady request is above 80: use 100 to add a pod only when requests wait.",
    )
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="How long a higher recommendation must hold before scaling out."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=3600, description="How long load must stay low before a pod is removed."
    )
    idle_seconds: int = Field(
        default=600,
        ge=10,
        le=86400,
        description="With minReplicas 0: how long the model must see no request (none arriving, running or held) "
        "before it goes to zero pods. A pod still pending, downloading or loading is never scaled down.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class Rebalance(_Model):
    """When a running plan moves to a better node class (no churn).

    WhenBetter (default): a plan whose pods run keeps its node class while its spec is unchanged; it
    moves only when the new plan is materially better: the spec's own terms fit again after adapt bent
    them, a share of the model on GPU larger by minImprovement percentage points (CPU to full GPU is
    100), or a context longer by minImprovement percent. Never: it moves only when its pods cannot run (unschedulable, OOM-killed) or the spec
    changes. Always: every re-plan that changes the node class, backend, offload, context or KV type
    rolls the pods. A move surges (the new pod starts before the old one stops) when there is room.
    """

    policy: Literal["WhenBetter", "Never", "Always"] = Field(default="WhenBetter", description="When to move.")
    min_improvement: int = Field(
        default=25, ge=1, le=1000, description="Percent (points of GPU share, or context growth) a move must gain."
    )


ZERO_NEEDS_PICKER = (
    "autoscaling.minReplicas 0 needs routing.mode InferencePool: a model at zero has no pod to answer, and only the "
    "endpoint picker holds a request while one starts (a Service would refuse it)"
)
ROUTING_EXTERNAL_KEY = (
    "routing.gateway External with apiKeySecretRef: behind a picker the pods run without a key (the picker must "
    "scrape them), so the key is checked at the edge; an External Gateway checks its own. Remove apiKeySecretRef, "
    "or use gateway Standalone (its Envoy checks the key)"
)


class Routing(_Model):
    """How requests reach the pods: a plain Service, or the Gateway API Inference Extension's standard.

    InferencePool: the operator renders an InferencePool v1 (inference.networking.k8s.io) for the pods and
    its endpoint picker, configured with a llama.cpp profile whose parameters come from the plan (slots,
    prompt-cache tokens, prompt speed, cold start). The picker sends each request to the pod with the
    shortest queue and the most of its prompt cached: a conversation's next turn lands where its prefix is.
    Needs the InferencePool CRD in the cluster; without it the Service keeps serving and Degraded says why.
    """

    mode: Literal["Service", "InferencePool"] = Field(
        default="Service",
        description="Service (default): the Service balances the pods. InferencePool: an endpoint picker with a "
        "llama.cpp profile picks the pod for each request.",
    )
    gateway: Literal["Standalone", "External"] = Field(
        default="Standalone",
        description="Standalone (default): an Envoy beside the picker is the edge; the ModelDeployment's Service "
        "(same name and port) leads to it and it checks apiKeySecretRef. External: a Gateway of your own "
        "(Istio, kgateway, NGINX Gateway Fabric, agentgateway, GKE) routes an HTTPRoute to the InferencePool "
        "and checks keys itself; apiKeySecretRef is refused then.",
    )
    failure_mode: Literal["FailClose", "FailOpen"] = Field(
        default="FailClose",
        description="When the picker cannot answer: FailClose (default) fails the request; FailOpen sends it "
        "through the pods' own Service (kube-proxy's choice).",
    )


class ModelDeploymentSpec(_Model):
    """A GGUF model served by llama-server, sized by modelfit for the nodes of the cluster."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minContext) || !has(self.context) || type(self.context) == string "
                    "|| self.minContext <= int(self.context)",
                    "message": "minContext must not exceed context",
                },
                {
                    "rule": "!has(self.autoscaling) || !has(self.autoscaling.minReplicas) || "
                    "self.autoscaling.minReplicas > 0 || (has(self.routing) && has(self.routing.mode) && "
                    "self.routing.mode == 'InferencePool')",
                    "message": ZERO_NEEDS_PICKER,
                },
                {
                    "rule": "!has(self.apiKeySecretRef) || !has(self.routing) || !has(self.routing.mode) || "
                    "self.routing.mode != 'InferencePool' || !has(self.routing.gateway) || "
                    "self.routing.gateway != 'External'",
                    "message": ROUTING_EXTERNAL_KEY,
                },
            ]
        }
    )

    model: ModelSource = Field(description="The GGUF model to serve.")
    context: Annotated[int, Field(ge=256, le=16777216)] | Literal["max"] = Field(
        default="max",
        description="Context size in tokens, or max for the model's trained context.",
        json_schema_extra={
            **INT_OR_STRING,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self == 'max' : (int(self) >= 256 && int(self) <= 16777216)",
                    "message": "context must be max or a number between 256 and 16777216",
                }
            ],
        },
    )
    min_context: int | None = Field(
        default=None,
        ge=256,
        le=16777216,
        description="Smallest acceptable context when adapt may shrink it (default 4096).",
    )
    parallel: int = Field(default=1, ge=1, le=256, description="Parallel sequences (slots) llama-server serves.")
    kv_cache_type: Literal["auto", "f16", "q8_0", "q4_0"] = Field(
        default="auto",
        description="KV cache type. auto keeps f16 when the context fits, else q8_0 (little quality cost); "
        "q4_0 measurably degrades answers and is used only when set here, never chosen by auto or adapt.",
    )
    load_mode: Literal["auto", "mmap", "none", "mlock"] = Field(
        default="auto", description="How weights are loaded; auto picks the lower resident memory."
    )
    prompt_cache: Annotated[int, Field(ge=0, le=1048576)] | Literal["auto"] = Field(
        default="auto",
        description="llama-server's prompt cache (--cache-ram) in MiB: host RAM that keeps the state of prompts "
        "whose slot is reused, so a conversation resumes without reprocessing its history. auto: two saved "
        "8192-token conversations, at most a quarter of the plan's own memory and of the node memory it leaves "
        "free, 0 when memory is short; a number of MiB sets more. 0 turns it off. Counted in the memory request "
        "and limit.",
        json_schema_extra={
            **INT_OR_STRING,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self == 'auto' : (int(self) >= 0 && int(self) <= 1048576)",
                    "message": "promptCache must be auto or a number of MiB between 0 and 1048576",
                }
            ],
        },
    )
    flash_attention: Literal["auto", "on", "off"] = Field(default="auto", description="Flash attention.")
    backend: Backend = Field(
        default="auto", description="Compute backend; auto uses the GPU of the chosen node, else the CPU."
    )
    gpu_layers: Annotated[int, Field(ge=0, le=1000)] | Literal["auto"] = Field(
        default="auto",
        description="Layers offloaded to the GPU, or auto for as many as fit.",
        json_schema_extra={
            **INT_OR_STRING,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self == 'auto' : (int(self) >= 0 && int(self) <= 1000)",
                    "message": "gpuLayers must be auto or a number between 0 and 1000",
                }
            ],
        },
    )
    threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="llama-server threads (-t) and the pod's CPU request in cores; auto: the fewest threads that "
        "reach the node's memory-bandwidth bound for decoding (see the plan's reasons).",
        json_schema_extra={
            **INT_OR_STRING,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self == 'auto' : (int(self) >= 1 && int(self) <= 1024)",
                    "message": "threads must be auto or a number between 1 and 1024",
                }
            ],
        },
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Number of llama-server pods; with autoscaling the HPA sets it through the /scale subresource.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale on load with a HorizontalPodAutoscaler (replicas is then the HPA's)."
    )
    rebalance: Rebalance | None = Field(
        default=None, description="When a running plan moves to a better node class (default WhenBetter, 25%)."
    )
    resources: ResourceOverride | None = Field(default=None, description="Override the planned requests/limits.")
    node_selector: dict[str, str] | None = Field(default=None, description="Only consider nodes with these labels.")
    tolerations: list[dict[str, Any]] | None = Field(
        default=None,
        description="Pod tolerations (core/v1 Toleration); tainted nodes are considered only if tolerated.",
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity (core/v1 Affinity); required node affinity limits the nodes planned for.",
    )
    image: ImageOverrides | None = Field(default=None, description="Container image override per backend.")
    server_args: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Extra llama-server arguments appended to the plan's. Refused: flags the plan owns, and flags "
        "that carry secrets, load memory the plan does not count, fetch from the network, expose the pod's files "
        "or break its probes.",
        json_schema_extra={"x-kubernetes-validations": [OWNED_FLAGS_RULE, *REFUSED_FLAGS_RULES]},
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key (LLAMA_API_KEY)."
    )
    model_cache: ModelCache | None = Field(default=None, description="Where the downloaded model is kept.")
    service: ServiceSpec | None = Field(default=None, description="The Service in front of the pods.")
    routing: Routing | None = Field(default=None, description="How requests reach the pods (Service or InferencePool).")
    aliases: list[ModelAlias] | None = Field(
        default=None,
        max_length=8,
        description="More names the shared gateway routes to this model (the body's model field), beside the "
        "ModelDeployment's own name; a name or alias another model already serves there is not taken over.",
    )
    adapt: bool = Field(
        default=False,
        description="May the operator shrink the context, quantize the KV cache or change backend to fit a node.",
    )

    @field_validator("affinity")
    @classmethod
    def _affinity_shape(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        why = _node_affinity_problem(value) if value is not None else None
        if why is not None:
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _edge_checks_keys(self) -> ModelDeploymentSpec:
        if self.routing is not None and self.routing.mode == "InferencePool" and self.routing.gateway == "External":
            if self.api_key_secret_ref is not None:
                raise ValueError(ROUTING_EXTERNAL_KEY)
        return self

    @model_validator(mode="after")
    def _zero_needs_picker(self) -> ModelDeploymentSpec:
        a = self.autoscaling
        if a is not None and a.min_replicas == 0 and (self.routing is None or self.routing.mode != "InferencePool"):
            raise ValueError(ZERO_NEEDS_PICKER)
        return self

    def owned_flags_in_server_args(self) -> list[str]:
        """The flags in serverArgs the plan owns, as llama-server reads them (``flags.flag_of``)."""
        return [f for f in map(flag_of, self.server_args or []) if f in OWNED_FLAGS]

    def server_args_problem(self) -> str | None:
        """Why serverArgs cannot run (the flags the plan owns, each refused flag and why), or None: the one
        check of the operator (InvalidSpec) and ``modelfit plan -f``; the CRD's rules refuse the same flags."""
        problems = []
        owned = self.owned_flags_in_server_args()
        if owned:
            problems.append(
                f"serverArgs contains flags the plan owns: {', '.join(owned)}; set the matching spec field instead"
            )
        refused = [f for f in map(flag_of, self.server_args or []) if f in REFUSED_FLAGS]
        problems += [f"serverArgs: {f} {REFUSED_FLAGS[f].why}" for f in dict.fromkeys(refused)]
        return "; ".join(problems) or None


# ---- status ------------------------------------------------------------------------------------

ConditionType = Literal["Ready", "Planned", "Progressing", "Degraded", "Unschedulable"]
ConditionStatus = Literal["True", "False", "Unknown"]


class _Status(_Model):
    """The status is read back from the API server: a field another version of the operator writes is ignored,
    not a reason to read the whole status as garbage."""

    model_config = ConfigDict(extra="ignore")


class Condition(_Status):
    """A condition of the ModelDeployment (metav1.Condition)."""

    type: ConditionType = Field(description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    observed_generation: int | None = Field(default=None, ge=0, description="Spec generation this condition is about.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")


# A declared subset of memory.MemoryBreakdown (same names and types; tests/test_status.py holds it to that):
# each is made from the other by model_validate(other.model_dump()). (Docstrings here are the CRD's descriptions.)
class MemoryStatus(_Status):
    """Predicted memory of one llama-server process, in bytes."""

    weights_bytes: int = Field(default=0, description="Weights in host memory.")
    weights_file_bytes: int = Field(default=0, description="Part of the weights backed by the file (page cache).")
    repack_bytes: int = Field(default=0, description="CPU repacked copy of weights.")
    kv_cache_bytes: int = Field(default=0, description="KV cache in host memory.")
    recurrent_bytes: int = Field(default=0, description="Recurrent state in host memory.")
    compute_bytes: int = Field(default=0, description="Host compute buffers.")
    output_bytes: int = Field(default=0, description="Output buffer.")
    cache_ram_bytes: int = Field(default=0, description="Prompt cache (--cache-ram).")
    checkpoint_bytes: int = Field(default=0, description="Context checkpoints.")
    overhead_bytes: int = Field(default=0, description="Runtime and vocabulary.")
    total_bytes: int = Field(default=0, description="Predicted peak RSS.")
    anon_bytes: int = Field(default=0, description="Anonymous memory (total less file-backed pages).")
    vram_bytes: list[int] = Field(default_factory=list, description="Predicted GPU memory per GPU.")
    vram_weights_bytes: int = Field(default=0, description="Weights in GPU memory.")
    vram_kv_bytes: int = Field(default=0, description="KV cache in GPU memory.")
    vram_compute_bytes: int = Field(default=0, description="GPU compute buffers.")
    kv_cells: int = Field(default=0, description="KV cells of full-attention layers.")
    kv_cells_swa: int = Field(default=0, description="KV cells of sliding-window layers.")


# Fields named as in sizing.Plan and sizing.PlanResult record those: a plan is copied in and out by name
# (status.plan_status, status.placement_from_status).
class PlanStatus(_Status):
    """The planner's output for the node class this ModelDeployment targets."""

    model: str = Field(default="", description="Model name (for printer columns).")
    quant: str = Field(default="", description="Quantization of the weights.")
    model_bytes: int = Field(default=0, description="Size of the GGUF file.")
    node_class: str = Field(default="", description="The node (class) the plan targets.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods are pinned to.")
    backend: str = Field(default="", description="Backend: cpu, cuda, rocm or vulkan.")
    gpu_layers: int = Field(default=0, description="Layers offloaded to the GPU.")
    total_layers: int = Field(default=0, description="Offloadable layers (blocks plus output).")
    context: int = Field(default=0, description="Context size in tokens.")
    parallel: int = Field(default=1, description="Parallel slots.")
    kv_cache_type: str = Field(default="", description="KV cache type.")
    load_mode: str = Field(default="", description="Weight load mode.")
    flash_attention: bool = Field(default=False, description="Flash attention on.")
    threads: int = Field(default=0, description="CPU threads.")
    ubatch: int = Field(default=0, description="Micro-batch size.")
    cache_ram_mib: int = Field(default=0, description="Prompt cache budget in MiB.")
    ctx_checkpoints: int = Field(default=0, description="Context checkpoints per slot.")
    args: list[str] = Field(default_factory=list, description="llama-server arguments of the plan.")
    memory: MemoryStatus = Field(default_factory=MemoryStatus, description="Predicted memory breakdown.")
    memory_request: str = Field(default="", description="Memory request and limit of each pod.")
    memory_request_bytes: int = Field(default=0, description="Memory request in bytes.")
    resources: dict[str, dict[str, str]] = Field(default_factory=dict, description="Requests and limits of each pod.")
    fits: bool = Field(default=False, description="Whether the plan fits the node.")
    shortfall_bytes: int = Field(default=0, description="Memory missing when it does not fit.")
    adapted: bool = Field(default=False, description="The plan deviates from the spec because adapt is true.")
    headroom_boost: float = Field(default=0.0, ge=0, description="Extra memory headroom added after OOM kills.")
    hash: str = Field(
        default="",
        description="Hash of the rendered workload (replica count excluded); changes when a rollout is needed.",
    )
    spec_hash: str = Field(default="", description="Hash of the spec the plan was made for (replicas excluded).")
    rollout: Literal["", "Surge", "Replace"] = Field(
        default="",
        description="How pods move to this plan: Surge (the new pod starts first; serving never stops) or Replace "
        "(the old pod stops first, when the node class has no room for both).",
    )
    reasons: list[str] = Field(default_factory=list, description="Why each choice was made.")
    warnings: list[str] = Field(default_factory=list, description="Planner warnings.")
    facts_source: str = Field(
        default="",
        description="Where the model facts came from: 'header: URL' (the file's own GGUF header) or "
        "'catalog (...)' (built-in facts, and why the header was not used).",
    )


# A field left None is not written (dump): a planning failure, say, writes no endpoint and leaves the last one.
class ModelDigestStatus(_Status):
    """The sha256 of each file of the model, as the first verified download got it (trust on first use)."""

    url: str = Field(description="The URL the digests are for (a new URL starts over).")
    sha256: list[str] = Field(description="One digest per file (the shards of a split model in order).")
    pod: str = Field(default="", description="The pod whose download reported them.")


class RoutingStatus(_Status):
    """Where the InferencePool and its endpoint picker are (spec.routing.mode InferencePool)."""

    pool: str = Field(description="The InferencePool (inference.networking.k8s.io/v1) of the pods.")
    picker: str = Field(description="The endpoint picker's Service and gRPC port (ext_proc).")
    edge: str = Field(
        default="",
        description="Standalone: the in-cluster URL of the Envoy beside the picker (the endpoint). External: empty; "
        "route an HTTPRoute of your Gateway to the InferencePool.",
    )


class ColdStartStages(_Status):
    """Seconds of each stage of a new pod's start (see ``coldstart``)."""

    scheduling: float = Field(default=0.0, description="Bound to a present node, sandbox and containers started.")
    image: float = Field(default=0.0, description="Image pulls: 0, the images are taken to be on the node already.")
    fetch: float = Field(default=0.0, description="The model's download: 0 when the node (hostPath, PVC) holds it.")
    verify: float = Field(default=0.0, description="The downloader's sha256 of the file (every start).")
    load: float = Field(default=0.0, description="llama-server reads the weights (and repacks them).")
    warmup: float = Field(default=0.0, description="llama-server's context and warm-up run, until it listens.")
    probe: float = Field(
        default=0.0,
        description="Until the probe next looks while it loads (its period): readiness for a model that may go to zero, else startup.",
    )


class ColdStartStatus(_Status):
    """How long a new pod takes from creation to Ready: predicted from the model's size and where its file is,
    and measured on the newest Ready pod."""

    predicted_seconds: float = Field(default=0.0, description="Predicted, the file read from disk (page cache cold).")
    predicted_warm_seconds: float = Field(
        default=0.0, description="Predicted with the file already in the node's page cache."
    )
    stages: ColdStartStages = Field(default_factory=ColdStartStages, description="The predicted stages (cold).")
    reasons: list[str] = Field(default_factory=list, description="What the prediction takes as given.")
    last_measured_seconds: float | None = Field(
        default=None,
        description="The newest Ready pod's creation to its Ready condition (whole seconds: the API's timestamps).",
    )
    last_measured_pod: str | None = Field(default=None, description="The pod that was measured.")
    last_measured_at: str | None = Field(default=None, description="When that pod became Ready (RFC 3339).")


class ScaleToZeroStatus(_Status):
    """Where a model that may go to zero (autoscaling.minReplicas 0) stands: serving, or at zero and why."""

    state: Literal["Active", "Zero"] = Field(description="Active: it has pods. Zero: none; a request wakes it.")
    since: str = Field(description="When it went to that state (RFC 3339).")
    message: str = Field(default="", description="Why: the idle period that ended, or the held requests that woke it.")
    wakes: int = Field(default=0, description="Times a held request woke it.")


class ModelDeploymentStatus(_Status):
    """What the operator planned and observed."""

    plan: PlanStatus | None = Field(default=None, description="The current plan.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Planned, Progressing, Degraded, Unschedulable."
    )
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible API.")
    replicas: int | None = Field(default=None, description="Pods of the current Deployment.")
    ready_replicas: int | None = Field(default=None, description="Pods ready to serve.")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    observed_generation: int | None = Field(default=None, description="Spec generation last reconciled.")
    oom_kills: int | None = Field(default=None, description="OOM kills observed (each raises the memory headroom).")
    memory_override_rejected: int | None = Field(
        default=None,
        description="A spec.resources memory (bytes) that was OOM-killed; the plan's memory is used while it is set.",
    )
    routing: RoutingStatus | None = Field(
        default=None, description="The InferencePool and endpoint picker, when spec.routing.mode is InferencePool."
    )
    model_digest: ModelDigestStatus | None = Field(
        default=None,
        description="The digests every later download is held to: spec.model.sha256, else what the first verified "
        "download reported.",
    )
    scale_to_zero: ScaleToZeroStatus | None = Field(
        default=None, description="autoscaling.minReplicas 0: serving, or at zero since when and why."
    )
    cold_start: ColdStartStatus | None = Field(
        default=None, description="A new pod's start, predicted by stage and last measured."
    )

    def dump(self) -> dict[str, Any]:
        """The status as written to the API server: camelCase, JSON types, None fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelDeployment(_Model):
    """A GGUF model served by llama-server, right-sized for the cluster's nodes."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["modelfit.io/v1alpha1"] = Field(
        default="modelfit.io/v1alpha1", description="modelfit.io/v1alpha1"
    )
    kind: Literal["ModelDeployment"] = Field(default="ModelDeployment", description="ModelDeployment")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(description="What to serve and how.")
    status: ModelDeploymentStatus | None = Field(default=None, description="What the operator planned and observed.")
