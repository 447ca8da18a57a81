"""Routing by the standard (``spec.routing.mode: InferencePool``): an InferencePool v1 for a ModelDeployment's pods,
its endpoint picker (the Gateway API Inference Extension's EPP, v1.5.0) with a llama.cpp profile whose parameters
come from the plan, and, in the upstream standalone topology, an Envoy beside the picker as the edge. Pure: no I/O.

Why a profile of our own: the picker's built-in engines are vLLM, SGLang, TensorRT-LLM and Triton. llama-server
names its gauges ``llamacpp:requests_deferred`` (queued) and ``llamacpp:requests_processing`` (running) and has no
KV-usage gauge, so KV scoring does not apply; the prefix-cache scorer does, sized from the tokens a pod keeps.

The edge (Envoy, standalone): checks the API key (the pods run without one: the picker's scrape of /metrics has no
auth option), drops a client's own ``x-gateway-destination-endpoint`` (else, failing open, a client would pick any
address), asks the picker for each request (ext_proc) and connects where it says (ORIGINAL_DST). The picker and
Envoy share a pod: Envoy reaches the picker on loopback, so the gRPC stays plaintext inside the pod.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from . import coldstart, scaletozero
from .api import ModelDeploymentSpec
from .facts import ModelFacts
from .memory import MiB
from .sizing import PlanResult

POOL_API_VERSION = "inference.networking.k8s.io/v1"
POOL_KIND = "InferencePool"
PICKER_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
EDGE_IMAGE = "docker.io/envoyproxy/envoy:v1.40.0"
GRPC_PORT = 9002  # ext_proc
HEALTH_PORT = 9003  # gRPC health
PICKER_METRICS_PORT = 9090
EDGE_PORT = 8081  # Envoy's listener (the Service's http port leads here)
EDGE_ADMIN_PORT = 19000  # loopback only
# The shared gateway's pods (the chart's gateway.yaml labels them so): the models' NetworkPolicies admit them
GATEWAY_LABELS = {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/part-of": "modelfit"}
PICKER_UID = 65532
DESTINATION_HEADER = "x-gateway-destination-endpoint"

BLOCK_TOKENS = 16  # the prefix producer's block: 16 tokens hashed per block (upstream default)
# Scrape period of each pod's /metrics. llama-server answers /metrics from its decode loop; measured on CPU
# (bench/routing_smoke.py): a 50 ms scrape (upstream default) costs 8-13% of a long prefill, 250 ms under 3%.
REFRESH_SECONDS = 0.25
# Prompt processing on CPU is compute-bound: about 2 FLOPs per active weight per token. What one thread
# delivers on quantized weights (Q4_0/Q8_0 repacked, AVX2/AVX-512), measured with bench/routing_multiturn.py.
THREAD_PROMPT_FLOPS = 40 * 10**9
GPU_PROMPT_TOKENS_PER_S = 2000.0  # a plan with every layer on a GPU: prefill is not what bounds staleness
MIN_STALENESS_S, MAX_STALENESS_S = 2.0, 60.0
MIN_QUEUE_TTL_S, MAX_QUEUE_TTL_S = 30, 900


@dataclass(frozen=True)
class PickerProfile:
    """The picker's parameters, each from the plan, with the reasons the plan shows."""

    max_concurrency: int  # the concurrency detector's requests per pod before the pool counts as saturated
    prefix_blocks: int  # prefix-cache scorer: LRU blocks per pod
    staleness_s: float  # --metrics-staleness-threshold
    queue_ttl_s: int  # flow control: how long a request waits for a slot (a new pod's cold start, with margin)
    max_queued: int  # flow control: requests held at most
    prompt_tokens_per_s: float  # the predicted prompt speed the staleness comes from
    cold_start_s: float
    reasons: tuple[str, ...]
    busy_filter: bool = True  # a pod with every slot busy is no candidate (not for a model that may go to zero)


def active_weights(facts: ModelFacts) -> int:
    """Weights one token's forward pass multiplies: every block's and the output's, one row of an untied embedding
    (a lookup, no FLOPs), the routed share of experts."""
    total = 0
    for t in facts.tensors:
        if t.layer is not None and t.layer >= facts.n_layer:  # MTP/nextn blocks are not run
            continue
        if t.name.startswith("token_embd.") or not t.shape:
            continue
        n = math.prod(t.shape)
        if "_exps." in t.name and facts.n_expert > 0:
            n = n * facts.n_expert_used // facts.n_expert
        total += n
    if facts.tied_embeddings:
        total += math.prod(next((t.shape for t in facts.tensors if t.name.startswith("token_embd.")), (0,)))
    return total


def prompt_tokens_per_s(facts: ModelFacts, result: PlanResult) -> float:
    """Predicted prompt (prefill) speed of one pod: threads x THREAD_PROMPT_FLOPS / (2 x active weights); a plan
    that holds every layer on a GPU is not bounded by it."""
    p = result.plan
    if p.backend != "cpu" and p.gpu_layers >= p.total_layers > 0:
        return GPU_PROMPT_TOKENS_PER_S
    weights = max(active_weights(facts), 1)
    return max(p.threads, 1) * THREAD_PROMPT_FLOPS / (2.0 * weights)


def cold_start_s(model_bytes: int, spec: ModelDeploymentSpec, result: PlanResult | None = None) -> float:
    """Predicted seconds from a new pod's creation to Ready, page cache cold: ``coldstart.predict``, the one
    prediction ``status.coldStart`` shows too, to the same tenth of a second (the flow-control queue's TTL and the
    edge's Retry-After come from it)."""
    load_mode = result.plan.load_mode if result is not None else "none"
    kv = result.memory.kv_cache_bytes if result is not None else 0
    return round(coldstart.predict(model_bytes, spec, load_mode, kv).seconds, 1)


def _prefix_tokens(result: PlanResult) -> tuple[int, int]:
    """(KV tokens, prompt-cache tokens) one pod keeps: its context, and --cache-ram at the KV's bytes per token."""
    m = result.memory
    kv = max(result.plan.context, 0)
    cells = max(m.kv_cells, 1)
    per_token = (m.kv_cache_bytes + m.recurrent_bytes // max(result.plan.parallel, 1)) / cells
    cached = int(result.plan.cache_ram_mib * MiB / per_token) if per_token > 0 else 0
    return kv, cached


def profile(facts: ModelFacts, result: PlanResult, model_bytes: int, spec: ModelDeploymentSpec) -> PickerProfile:
    """The llama.cpp profile of this plan (see the module docstring)."""
    p = result.plan
    kv_tokens, cached_tokens = _prefix_tokens(result)
    blocks = max(1, math.ceil((kv_tokens + cached_tokens) / BLOCK_TOKENS))
    speed = prompt_tokens_per_s(facts, result)
    staleness = min(MAX_STALENESS_S, max(MIN_STALENESS_S, round(2 * p.ubatch / speed, 1)))
    cache = spec.model_cache
    node_cached = cache is not None and (cache.host_path is not None or cache.pvc is not None)
    cold = cold_start_s(model_bytes, spec, result)
    ttl = int(min(MAX_QUEUE_TTL_S, max(MIN_QUEUE_TTL_S, math.ceil(cold * 1.5))))
    pods = spec.autoscaling.max_replicas if spec.autoscaling is not None else max(spec.replicas, 1)
    queued = max(64, 16 * p.parallel * pods)
    reasons = (
        f"routing: the picker sends a pod at most {p.parallel} requests at once (its parallel slots, counted by the "
        "picker itself: a scrape lags); more wait at the picker for the first free slot of any pod",
        f"routing: prefix-cache scorer keeps {blocks} blocks of {BLOCK_TOKENS} tokens per pod "
        f"({kv_tokens} KV tokens + {cached_tokens} prompt-cache tokens, --cache-ram {p.cache_ram_mib} MiB)",
        f"routing: metrics count as fresh for {staleness:g} s: two ubatches of {p.ubatch} tokens at the predicted "
        f"{speed:.0f} prompt tokens/s (a CPU pod answers /metrics between ubatches); scraped every "
        f"{int(REFRESH_SECONDS * 1000)} ms",
        f"routing: requests wait at most {ttl} s for a slot (1.5 x the predicted cold start of {cold:.0f} s: "
        f"{'model on the node' if node_cached else 'download'} and load of {model_bytes / 1e9:.2f} GB, probe, "
        f"warm-up), {queued} at most; past the wait 503, past the count 429, each with Retry-After "
        f"{math.ceil(cold)} s from the edge",
    )
    busy_filter = not scaletozero.applies(spec)
    if not busy_filter:
        reasons = (
            f"routing: the pool is full at {p.parallel} requests per pod (counted by the picker itself); more wait at "
            "the picker until a slot frees. A busy pod stays a candidate: the requests held while the model wakes "
            "from zero are released at once to its first pod, faster than the picker counts them, and a busy-pod "
            "filter would refuse all but the first (429)",
            *reasons[1:],
        )
    return PickerProfile(p.parallel, blocks, staleness, ttl, queued, speed, cold, reasons, busy_filter)


# ---- objects -------------------------------------------------------------------------------------


def picker_name(name: str) -> str:
    return f"{name}-epp"


def pods_service_name(name: str) -> str:
    """The headless Service of the model's pods: where Envoy sends a request the picker did not place (FailOpen)."""
    return f"{name}-pods"


def picker_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "endpoint-picker", "app.kubernetes.io/instance": picker_name(name)}


def picker_config(prof: PickerProfile) -> dict[str, Any]:
    """The EndpointPickerConfig (GIE v1.5.0): the llama.cpp engine, queue/running/prefix scorers, the concurrency
    detector (it counts the picker's own in-flight requests, so a slow /metrics on CPU does not mark a pod
    saturated, as the default utilization detector would), and flow control bounded by the profile."""
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "featureGates": ["flowControl"],
        "plugins": [
            {"type": "metrics-data-source", "parameters": {"scheme": "http", "path": "/metrics"}},
            {
                "type": "core-metrics-extractor",
                "parameters": {
                    "defaultEngine": "llamacpp",
                    "engineConfigs": [
                        {
                            "name": "llamacpp",
                            "queuedRequestsSpec": "llamacpp:requests_deferred",
                            "runningRequestsSpec": "llamacpp:requests_processing",
                        }
                    ],
                },
            },
            {"type": "queue-scorer"},
            {"type": "running-requests-size-scorer"},
            {
                "type": "prefix-cache-scorer",
                "parameters": {
                    "autoTune": False,  # llama-server exports no cache-config metric to tune from
                    "blockSizeTokens": BLOCK_TOKENS,
                    "lruCapacityPerServer": prof.prefix_blocks,
                },
            },
            {"type": "max-score-picker"},
            # The picker's own count of requests (and estimated tokens) in flight per pod, as they start and end:
            # what the concurrency detector reads (without it every pod counts as idle).
            {"type": "inflight-load-producer"},
            {
                "type": "concurrency-detector",
                "parameters": {"maxConcurrency": prof.max_concurrency, "concurrencyMode": "requests"},
            },
        ],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [
                    # A pod with every slot busy is no candidate: the request waits in flow control for the first
                    # free slot anywhere, instead of in that pod's queue (scraped gauges lag a CPU pod's state).
                    # Not when the model may go to zero: flow control releases the requests held during a wake
                    # faster than the picker counts them, and the filter would answer all but the first with 429.
                    *([{"pluginRef": "concurrency-detector"}] if prof.busy_filter else []),
                    {"pluginRef": "queue-scorer", "weight": 2},
                    {"pluginRef": "running-requests-size-scorer", "weight": 2},
                    {"pluginRef": "prefix-cache-scorer", "weight": 3},
                    {"pluginRef": "max-score-picker"},
                ],
            }
        ],
        "saturationDetector": {"pluginRef": "concurrency-detector"},
        "flowControl": {"maxRequests": str(prof.max_queued), "defaultRequestTTL": f"{prof.queue_ttl_s}s"},
        "dataLayer": {
            "sources": [{"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": "core-metrics-extractor"}]}]
        },
    }


DENIED_HEADER = "x-modelfit-denied"
# The edge's filter: drop a client's own routing and denial headers; check the API key (llama-server's rules: Bearer
# or X-Api-Key, any of the comma-separated keys; /health and /v1/health open). A refused request is marked, not
# answered here: a reply from this filter would still pass the picker's filter on its way out (a 500 when the
# picker is down); the marked request's route answers 401 with the picker's filter disabled.
LUA_EDGE = r"""local keys = {}
for k in string.gmatch(os.getenv("MODELFIT_API_KEY") or "", "[^,]+") do keys[k] = true end
local open = {["/health"] = true, ["/v1/health"] = true}
function envoy_on_request(h)
  local headers = h:headers()
  headers:remove("@DEST@")
  headers:remove("@DENIED@")
  h:clearRouteCache()
  if next(keys) == nil or open[((headers:get(":path") or ""):gsub("%?.*", ""))] then return end
  local given = headers:get("x-api-key")
  local auth = headers:get("authorization")
  if given == nil and auth ~= nil and auth:sub(1, 7) == "Bearer " then given = auth:sub(8) end
  if given == nil or not keys[given] then
    headers:add("@DENIED@", "1")
    h:clearRouteCache()
  end
end

-- The picker's own refusals (flow control: 503 when a request waited its TTL, 429 when too many wait; no pod)
-- come as plain text without Retry-After: answered in OpenAI's error shape, with Retry-After the predicted
-- cold start. A JSON answer (llama-server's own errors) is kept; only the header is added.
local retry_after = "@RETRY@"
local kinds = {["429"] = "rate_limit_error", ["503"] = "unavailable_error"}
local function quote(s)
  return '"' .. (s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)) .. '"'
end
function envoy_on_response(h)
  local headers = h:headers()
  local status = headers:get(":status")
  local kind = kinds[status]
  if kind == nil then return end
  if headers:get("retry-after") == nil then headers:add("retry-after", retry_after) end
  if (headers:get("content-type") or ""):find("json", 1, true) then return end
  headers:replace("content-type", "application/json; charset=utf-8")
  local body = h:body(true)
  local text = body:getBytes(0, body:length())
  if text == "" then text = "no model server could take the request" end
  body:setBytes('{"error":{"code":' .. status .. ',"message":' .. quote(text) .. ',"type":"' .. kind .. '"}}')
end
""".replace("@DEST@", DESTINATION_HEADER).replace("@DENIED@", DENIED_HEADER)
DENIED_BODY = {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}


def envoy_config(md_meta: dict[str, Any], spec: ModelDeploymentSpec, retry_after_s: int = 5) -> dict[str, Any]:
    """Envoy's bootstrap beside the picker, after the GIE v1.5.0 standalone chart's sidecar: the edge filters
    (LUA_EDGE), ext_proc to the picker on loopback (full-duplex streamed bodies, as the picker expects), the
    ORIGINAL_DST cluster that connects where the picker said; the picker's 503 and 429 answered with Retry-After
    ``retry_after_s`` (the predicted cold start) in OpenAI's error shape; FailOpen adds a route for requests the picker did
    not place, to the pods' headless Service."""
    routing = spec.routing
    fail_open = routing is not None and routing.failure_mode == "FailOpen"
    ns = md_meta.get("namespace") or "default"
    picked: dict[str, Any] = {"cluster": "picked", "timeout": "0s", "idle_timeout": "3600s"}
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": "/", "headers": [{"name": DENIED_HEADER, "present_match": True}]},
            "direct_response": {"status": 401, "body": {"inline_string": json.dumps(DENIED_BODY)}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json; charset=utf-8"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {"header": {"key": "www-authenticate", "value": "Bearer"}},
            ],
            "typed_per_filter_config": {
                "envoy.filters.http.ext_proc": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "disabled": True,
                }
            },
        },
        {
            "match": {"prefix": "/", "headers": [{"name": DESTINATION_HEADER, "present_match": True}]},
            "route": picked,
        },
    ]
    clusters: list[dict[str, Any]] = [
        {
            "name": "picked",
            "type": "ORIGINAL_DST",
            "connect_timeout": "10s",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            "circuit_breakers": {"thresholds": [{"max_connections": 4096, "max_pending_requests": 4096}]},
        },
        grpc_cluster("picker", GRPC_PORT),
    ]
    if fail_open:
        routes.append({"match": {"prefix": "/"}, "route": {**picked, "cluster": "pods"}})
        host = f"{pods_service_name(md_meta['name'])}.{ns}.svc.cluster.local"
        clusters.append(
            {
                "name": "pods",
                "type": "STRICT_DNS",
                "connect_timeout": "10s",
                "lb_policy": "LEAST_REQUEST",
                "load_assignment": {
                    "cluster_name": "pods",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(host, 8080)}}]}],
                },
            }
        )
    else:
        routes.append(
            {
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": 503,
                    "body": {"inline_string": json.dumps(_unavailable())},
                },
            }
        )
    hcm = {
        **hcm_base("edge"),
        "route_config": {
            "name": "edge",
            "virtual_hosts": [{"name": "edge", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": LUA_EDGE.replace("@RETRY@", str(retry_after_s))},
                },
            },
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "failure_mode_allow": fail_open,
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "picker", "authority": f"127.0.0.1:{GRPC_PORT}"},
                        "timeout": "10s",
                    },
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "response_header_mode": "SEND",
                        "request_body_mode": "FULL_DUPLEX_STREAMED",
                        "response_body_mode": "FULL_DUPLEX_STREAMED",
                        "request_trailer_mode": "SEND",
                        "response_trailer_mode": "SEND",
                    },
                    "message_timeout": "1000s",
                },
            },
            router_filter(),
        ],
        "access_log": stdout_access_log(),
    }
    return {
        "admin": {"address": address("127.0.0.1", EDGE_ADMIN_PORT)},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": address("0.0.0.0", EDGE_PORT),
                    "per_connection_buffer_limit_bytes": 32768,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        },
        "overload_manager": overload_manager(),
    }


def hcm_base(stat_prefix: str) -> dict[str, Any]:
    """What every Envoy listener of ours sets on its HTTP connection manager: client addresses and request ids as
    given, paths normalized, headers with underscores refused, no request timeout (a generation takes as long as
    it takes), an hour of silence at most."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "use_remote_address": True,
        "preserve_external_request_id": True,  # a client's x-request-id names its request in both logs
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "stream_idle_timeout": "3600s",
        "request_timeout": "0s",
    }


def router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True,
        },
    }


def stdout_access_log(fields: str = "") -> list[dict[str, Any]]:
    """One line per request on stdout; ``fields`` go after the response flags."""
    line = (
        "%START_TIME% %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% "
        f"%RESPONSE_FLAGS% {fields}upstream=%UPSTREAM_HOST% ms=%DURATION% id=%REQ(X-REQUEST-ID)%\n"
    )
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"text_format_source": {"inline_string": line}},
            },
        }
    ]


def grpc_cluster(name: str, port: int) -> dict[str, Any]:
    """An ext_proc server on loopback (HTTP/2)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address("127.0.0.1", port)}}]}],
        },
    }


def overload_manager() -> dict[str, Any]:
    """At most 10000 client connections."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 10000,
                },
            }
        ]
    }


def address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _unavailable() -> dict[str, Any]:
    return {"error": {"code": 503, "message": "no model server was picked", "type": "unavailable_error"}}


def dump_yaml(obj: dict[str, Any]) -> str:
    return str(yaml.safe_dump(obj, sort_keys=False, width=120))


__all__ = [
    "EDGE_IMAGE",
    "PICKER_IMAGE",
    "POOL_API_VERSION",
    "PickerProfile",
    "cold_start_s",
    "envoy_config",
    "picker_config",
    "profile",
    "prompt_tokens_per_s",
]
