"""The shared gateway: one OpenAI endpoint for every ModelDeployment it serves. Pure: no I/O.

The data path is Envoy with the Gateway API Inference Extension's body-based router (BBR, ext_proc) beside it:
BBR copies the body's ``model`` into ``x-gateway-model-name`` and Envoy routes on that header to the model's
own Service endpoints (the llama-server pods, or the model's edge when a picker fronts them: its picker holds a
request while the model is at zero). Nothing hand-written sits on the steady-state path; two Lua filters only
check keys, answer what no model serves, and shape plain-text errors as OpenAI's.

``table`` reads ModelDeployments and EndpointSlices into who serves which name; ``clusters``,
``route_configuration`` and ``bootstrap`` render Envoy's configuration from it (file-based xDS: ``gatewaysync`` writes the files, Envoy
takes them without a restart). A gateway never reads a tenant's Secret: a model with its own apiKeySecretRef
checks its key itself (the request's key passes through); the gateway's own key guards the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from .api import ModelDeploymentSpec
from .routing import address, grpc_cluster, hcm_base, overload_manager, router_filter, stdout_access_log

GATEWAY_PORT = 8088  # Envoy's listener (the gateway Service's port)
GATEWAY_ADMIN_PORT = 19001  # loopback only
BBR_GRPC_PORT = 9104  # BBR's ext_proc, loopback
BBR_HEALTH_PORT = 9105
BBR_METRICS_PORT = 9106
MODEL_HEADER = "x-gateway-model-name"  # what BBR writes (X-Gateway-Model-Name)
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
INFERENCE_REGEX = "^/v1/(chat/completions|completions|embeddings)$"
MAX_BODY_BYTES = 8 * 2**20  # a request body BBR reads whole (BUFFERED); larger gets 413
CANNOT_RUN_RETRY_S = 60  # Retry-After of a model that cannot run: the cluster has to change first
MAX_LISTING_BYTES = 2**20  # /v1/models, an inline answer (Envoy's default of 4 KiB holds about 30 names)
XDS_DIR = "/xds"
CDS_FILE = "cds.json"  # JSON: Envoy reads it as fast, and Python writes it 50x faster than YAML
RDS_FILE = "rds.json"
BOOTSTRAP_FILE = "envoy.yaml"
ROUTE_CONFIG = "gateway"
LUA_FRONT = "modelfit.gateway.front"
LUA_CHECK = "modelfit.gateway.check"
KEY_ENV = "MODELFIT_GATEWAY_API_KEY"
JSON_TYPE = "application/json; charset=utf-8"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Only the Service's own slices, as Kubernetes' controller writes them from the pods it selects: a slice someone
# wrote by hand could send a model's requests anywhere the gateway's pod can reach
SLICE_MANAGER_LABEL = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER = "endpointslice-controller.k8s.io"
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=modelfit"


@dataclass(frozen=True)
class Served:
    """One ModelDeployment the gateway routes to: the names it answers to, its state, its Service's endpoints."""

    namespace: str
    name: str
    ids: tuple[str, ...]  # its own name first, then each alias it holds
    state: str  # Ready, Zero (scaled to zero: a request wakes it), NotReady or CannotRun (see ``_cannot_run``)
    own_key: bool  # apiKeySecretRef set: the model checks the key itself
    endpoints: tuple[tuple[str, int], ...]
    created: int  # seconds since the epoch
    why: str = ""  # CannotRun: the operator's message

    @property
    def cluster(self) -> str:
        return f"md_{self.namespace}_{self.name}"


@dataclass(frozen=True)
class Refused:
    """A name the gateway does not route to this model, and why (another model holds it; a spec it cannot read)."""

    namespace: str
    name: str
    model: str
    why: str


@dataclass(frozen=True)
class Table:
    models: tuple[Served, ...] = ()
    refused: tuple[Refused, ...] = field(default=())

    def owner(self, model: str) -> Served | None:
        return next((s for s in self.models if model in s.ids), None)


def _epoch(ts: str | None) -> int:
    if not ts:
        return 0
    try:
        return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


NO_NODE = ("NoNodeFits", "NoEligibleNodes", "NoNodes")  # Unschedulable reasons no autoscaler's node would end


def _cannot_run(status: Mapping[str, Any]) -> str | None:
    """Why the operator says no pod of the model can run now (no plan, or no node that fits and no node shape an
    autoscaler could add: WaitingForNode is not this), or None."""
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    planned, unschedulable = conds.get("Planned") or {}, conds.get("Unschedulable") or {}
    if planned.get("status") == "False":
        return str(planned.get("message") or planned.get("reason") or "no plan")
    if unschedulable.get("status") == "True" and unschedulable.get("reason") in NO_NODE:
        return str(unschedulable.get("message") or unschedulable.get("reason"))
    return None


def _state(status: Mapping[str, Any], endpoints: tuple[tuple[str, int], ...]) -> tuple[str, str]:
    """The model's state and, when it cannot run and nothing serves it (at zero, or no ready endpoint), why: a
    request for it is answered at once instead of held until the picker's TTL."""
    at_zero = (status.get("scaleToZero") or {}).get("state") == "Zero"
    why = _cannot_run(status)
    if why is not None and (at_zero or not endpoints):
        return "CannotRun", why
    if at_zero:
        return "Zero", ""
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ("Ready" if ready else "NotReady"), ""


def _endpoints(slices: Iterable[Mapping[str, Any]], namespace: str, name: str) -> tuple[tuple[str, int], ...]:
    """The ready addresses of the Service ``name``'s EndpointSlices (those Kubernetes' controller wrote), at their
    port named http (else the first)."""
    out: set[tuple[str, int]] = set()
    for s in slices:
        meta = s.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("namespace") != namespace or labels.get(SERVICE_NAME_LABEL) != name:
            continue
        if labels.get(SLICE_MANAGER_LABEL) != SLICE_MANAGER:
            continue
        ports = [p for p in s.get("ports") or [] if isinstance(p.get("port"), int)]
        port = next((p for p in ports if p.get("name") == "http"), ports[0] if ports else None)
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            out.update((a, port["port"]) for a in ep.get("addresses") or [] if isinstance(a, str))
    return tuple(sorted(out))


def table(
    mds: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    namespaces: frozenset[str] | None = None,
) -> Table:
    """Who serves which model name. A name goes to the oldest ModelDeployment that claims it (its own name
    before any alias, then creation time, namespace, name): a newer model, in any namespace, cannot take over a
    name clients already use. Models routed by an External gateway (no Service) and deleting ones are left out."""
    slices = list(slices)
    found: list[tuple[tuple[int, str, str], Mapping[str, Any], ModelDeploymentSpec]] = []
    refused: list[Refused] = []
    for md in mds:
        meta = md.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta.get("name") or ""
        if not name or meta.get("deletionTimestamp") or (namespaces is not None and ns not in namespaces):
            continue
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            refused.append(Refused(ns, name, name, f"its spec is invalid: {where}: {first['msg']}"))
            continue
        if spec.routing is not None and spec.routing.mode == "InferencePool" and spec.routing.gateway == "External":
            continue
        found.append(((_epoch(meta.get("creationTimestamp")), ns, name), md, spec))
    found.sort(key=lambda f: f[0])
    holder: dict[str, tuple[str, str]] = {}
    ids: dict[tuple[str, str], list[str]] = {}
    for aliases in (False, True):
        for (_, ns, name), _md, spec in found:
            for model in spec.aliases or [] if aliases else [name]:
                if model in holder:
                    if holder[model] != (ns, name):
                        other = "/".join(holder[model])
                        refused.append(Refused(ns, name, model, f"the name {model!r} is served by {other}"))
                    continue
                holder[model] = (ns, name)
                ids.setdefault((ns, name), []).append(model)
    models = []
    for (created, ns, name), md, spec in found:
        if (ns, name) not in ids:
            continue
        endpoints = _endpoints(slices, ns, name)
        state, why = _state(md.get("status") or {}, endpoints)
        own_key = spec.api_key_secret_ref is not None
        models.append(Served(ns, name, tuple(ids[(ns, name)]), state, own_key, endpoints, created, why))
    return Table(models=tuple(models), refused=tuple(refused))


def models_body(t: Table) -> dict[str, Any]:
    """``GET /v1/models``: every name served (aliases too, ``root`` naming the ModelDeployment), with its state."""
    data = [
        {
            "id": model,
            "object": "model",
            "created": s.created,
            "owned_by": s.namespace,
            "root": s.name,
            "state": s.state,
            **({"message": s.why} if s.why else {}),
        }
        for s in t.models
        for model in s.ids
    ]
    return {"object": "list", "data": data}


def _error(status: int, message: str, kind: str, code: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code or status}})


def _json_headers() -> list[dict[str, Any]]:
    return [{"header": {"key": "content-type", "value": JSON_TYPE}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


_NO_BBR = {
    "envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "disabled": True,
    }
}


def _meta(kind: str, **more: Any) -> dict[str, Any]:
    return {"filter_metadata": {LUA_CHECK: {"kind": kind, **more}}}


def route_configuration(t: Table) -> dict[str, Any]:
    """The gateway's routes: /v1/models answered from the table; an inference path to the model named by BBR's
    header; one no model serves, or without a model, answered by the check filter (404, 400); anything else 404."""
    infer = {"safe_regex": {"regex": INFERENCE_REGEX}}
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": "/v1/models", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "direct_response": {"status": 200, "body": {"inline_string": json.dumps(models_body(t))}},
            "response_headers_to_add": _json_headers(),
            "metadata": _meta("models"),
            "typed_per_filter_config": _NO_BBR,
        },
        {
            "match": {"path": "/health"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"ok"}'}},
            "response_headers_to_add": _json_headers(),
            "typed_per_filter_config": _NO_BBR,
        },
    ]
    for s in t.models:
        for model in s.ids:
            if s.state == "CannotRun":
                why = f"The model {model} cannot run now: {s.why}"
                routes.append(
                    {
                        "match": {**infer, "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model}}]},
                        "direct_response": {
                            "status": 503,
                            "body": {"inline_string": _error(503, why, "unavailable_error")},
                        },
                        "response_headers_to_add": [
                            *_json_headers(),
                            {"header": {"key": "retry-after", "value": str(CANNOT_RUN_RETRY_S)}},
                        ],
                        "metadata": _meta("model", ownKey=s.own_key, model=model),
                    }
                )
                continue
            routes.append(
                {
                    "match": {**infer, "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model}}]},
                    "route": {
                        "cluster": s.cluster,
                        "timeout": "0s",  # a generation takes as long as it takes; idle_timeout bounds silence
                        "idle_timeout": "3600s",
                        # a pod that went away before its answer began (deleted, rolled, crashed): another one
                        # gets the request; once the answer has begun nothing is retried
                        "retry_policy": {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2},
                    },
                    "metadata": _meta("model", ownKey=s.own_key, model=model),
                    # the gateway's key stays at the gateway: a tenant's pod never sees what opens the others
                    **({} if s.own_key else {"request_headers_to_remove": ["authorization", "x-api-key"]}),
                }
            )
    unknown = _error(404, "The model does not exist or is not served here", "invalid_request_error", "model_not_found")
    routes += [
        {
            "match": {**infer, "headers": [{"name": MODEL_HEADER, "present_match": True}]},
            "direct_response": {"status": 404, "body": {"inline_string": unknown}},
            "response_headers_to_add": _json_headers(),
            "metadata": _meta("unknown"),
        },
        {
            "match": infer,
            "direct_response": {
                "status": 400,
                "body": {"inline_string": _error(400, "you must provide a model parameter", "invalid_request_error")},
            },
            "response_headers_to_add": _json_headers(),
            "metadata": _meta("missing"),
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {
                    "inline_string": _error(
                        404,
                        f"Unknown path: this gateway serves GET /v1/models and POST {', '.join(INFERENCE_PATHS)}",
                        "invalid_request_error",
                        "unknown_url",
                    )
                },
            },
            "response_headers_to_add": _json_headers(),
            "typed_per_filter_config": _NO_BBR,
        },
    ]
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_CONFIG,
        "max_direct_response_body_size_bytes": MAX_LISTING_BYTES,
        "virtual_hosts": [{"name": "gateway", "domains": ["*"], "routes": routes}],
    }


def clusters(t: Table) -> list[dict[str, Any]]:
    """One cluster per served model: its Service's ready endpoints (no kube-proxy, no DNS on the path)."""
    return [
        {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": s.cluster,
            "type": "STATIC",
            "connect_timeout": "5s",
            "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": {"thresholds": [{"max_connections": 4096, "max_pending_requests": 4096}]},
            "load_assignment": {
                "cluster_name": s.cluster,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(a, p)}} for a, p in s.endpoints]}],
            },
        }
        for s in t.models
    ]


def _discovery(version: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version_info": version, "resources": resources}


def xds_files(t: Table) -> dict[str, str]:
    """The files Envoy watches: the clusters and the routes, each a DiscoveryResponse whose version is their
    content's digest."""
    cds, rds = clusters(t), [route_configuration(t)]
    version = hashlib.sha256(json.dumps([cds, rds], separators=(",", ":")).encode()).hexdigest()[:16]
    return {
        CDS_FILE: json.dumps(_discovery(version, cds), separators=(",", ":")),
        RDS_FILE: json.dumps(_discovery(version, rds), separators=(",", ":")),
    }


# Before BBR: a client's own model header is dropped (only the body names the model). On the way out, an error
# that is not JSON (BBR's 400 for a body that is not JSON, Envoy's 413 and 503s, a plain-text upstream) is
# answered in OpenAI's error shape; a JSON answer and every success pass untouched, unbuffered.
LUA_FRONT_CODE = r"""local kinds = {["400"] = "invalid_request_error", ["401"] = "authentication_error",
  ["403"] = "permission_error", ["404"] = "invalid_request_error", ["413"] = "invalid_request_error",
  ["429"] = "rate_limit_error"}
local empty = {["400"] = "the gateway could not route this request: its body must be JSON whose model is text "
  .. "without control characters"}
local function quote(s)
  return '"' .. (s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)) .. '"'
end
function envoy_on_request(h)
  h:headers():remove("@MODEL@")
end
function envoy_on_response(h)
  local headers = h:headers()
  local status = headers:get(":status") or "200"
  local code = tonumber(status) or 200
  if code < 400 or (headers:get("content-type") or ""):find("json", 1, true) then return end
  local kind = kinds[status] or (code >= 500 and "server_error" or "invalid_request_error")
  headers:replace("content-type", "@JSON@")
  local body = h:body(true)
  local text = body and body:getBytes(0, body:length()) or ""
  if text == "" then text = empty[status] or ("HTTP " .. status) end
  body:setBytes('{"error":{"message":' .. quote(text) .. ',"type":"' .. kind .. '","param":null,"code":' .. status .. '}}')
end
""".replace("@MODEL@", MODEL_HEADER).replace("@JSON@", JSON_TYPE)

# After BBR (the route now names the model): the gateway's key guards /v1/models, names no model serves, and
# every model without a key of its own (one with its own key checks it itself: the request's key passes, unless
# it is the gateway's, which is refused here rather than shown to a tenant's pod). A name no model serves gets
# OpenAI's 404, a body without a model its 400. Keys as llama-server reads them: Bearer or X-Api-Key, any of the
# comma-separated keys.
LUA_CHECK_CODE = (
    r"""local keys = {}
for k in string.gmatch(os.getenv("@KEYENV@") or "", "[^,]+") do keys[k] = true end
local function quote(s)
  return '"' .. (s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)) .. '"'
end
local function reply(h, status, kind, code, message, extra)
  local headers = {[":status"] = status, ["content-type"] = "@JSON@"}
  for k, v in pairs(extra or {}) do headers[k] = v end
  h:respond(headers, '{"error":{"message":' .. quote(message) .. ',"type":"' .. kind .. '","param":null,"code":' .. code .. '}}')
end
local function given(headers)
  local key = headers:get("x-api-key")
  local auth = headers:get("authorization")
  if key == nil and auth ~= nil and auth:sub(1, 7) == "Bearer " then key = auth:sub(8) end
  return key
end
local function key_ok(headers)
  if next(keys) == nil then return true end
  local key = given(headers)
  return key ~= nil and keys[key] == true
end
function envoy_on_request(h)
  local meta = h:metadata()
  local kind = meta:get("kind")
  if kind == nil then return end
  local headers = h:headers()
  if kind == "model" and meta:get("ownKey") then
    -- the model checks its own key; the gateway's, in either header, is never sent on to a tenant's pod
    local auth = headers:get("authorization") or ""
    if keys[headers:get("x-api-key") or ""] or keys[auth] or keys[auth:sub(8)] then
      return reply(h, "401", "authentication_error", '"invalid_api_key"',
        "This model checks a key of its own: the gateway's key does not open it", {["www-authenticate"] = "Bearer"})
    end
    return
  end
  if not key_ok(headers) then
    return reply(h, "401", "authentication_error", '"invalid_api_key"', "Invalid API Key", {["www-authenticate"] = "Bearer"})
  end
  if kind == "unknown" then
    local model = headers:get("@MODEL@") or ""
    return reply(h, "404", "invalid_request_error", '"model_not_found"',
      "The model " .. model .. " does not exist or is not served here")
  end
  if kind == "missing" then
    return reply(h, "400", "invalid_request_error", "null", "you must provide a model parameter")
  end
end
""".replace("@KEYENV@", KEY_ENV)
    .replace("@MODEL@", MODEL_HEADER)
    .replace("@JSON@", JSON_TYPE)
)


def _lua(name: str, code: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


def _watched(directory: str, name: str) -> dict[str, Any]:
    return {
        "path_config_source": {"path": f"{directory}/{name}", "watched_directory": {"path": directory}},
        "resource_api_version": "V3",
    }


def bootstrap(directory: str = XDS_DIR, port: int = GATEWAY_PORT, bbr_port: int = BBR_GRPC_PORT) -> dict[str, Any]:
    """Envoy's bootstrap: the listener (front filter, BBR's ext_proc reading whole bodies up to MAX_BODY_BYTES,
    the check filter, the router; streamed responses pass unbuffered), the routes and the model clusters from
    files in ``directory`` (replaced by rename: Envoy reloads them on the move), BBR on loopback."""
    hcm = {
        **hcm_base("gateway"),
        "rds": {"route_config_name": ROUTE_CONFIG, "config_source": _watched(directory, RDS_FILE)},
        "http_filters": [
            _lua(LUA_FRONT, LUA_FRONT_CODE),
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "failure_mode_allow": False,
                    # BBR's header from a model that is no header value (control characters) fails the request:
                    # the client's input, so 400 (a BBR that is down fails its container's readiness instead)
                    "status_on_error": {"code": 400},
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "bbr", "authority": f"127.0.0.1:{bbr_port}"},
                        "timeout": "10s",
                    },
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "response_header_mode": "SKIP",
                        "request_body_mode": "BUFFERED",
                        "response_body_mode": "NONE",
                        "request_trailer_mode": "SKIP",
                        "response_trailer_mode": "SKIP",
                    },
                    "message_timeout": "10s",
                },
            },
            _lua(LUA_CHECK, LUA_CHECK_CODE),
            router_filter(),
        ],
        "access_log": stdout_access_log(f"model=%REQ({MODEL_HEADER})% "),
    }
    return {
        "node": {"id": "modelfit-gateway", "cluster": "modelfit-gateway"},
        "admin": {"address": address("127.0.0.1", GATEWAY_ADMIN_PORT)},
        "dynamic_resources": {"cds_config": _watched(directory, CDS_FILE)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": address("0.0.0.0", port),
                    "per_connection_buffer_limit_bytes": MAX_BODY_BYTES,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [grpc_cluster("bbr", bbr_port)],
        },
        "overload_manager": overload_manager(),
    }


def bbr_args(
    port: int = BBR_GRPC_PORT, health_port: int = BBR_HEALTH_PORT, metrics_port: int = BBR_METRICS_PORT
) -> list[str]:
    """BBR's flags: only the model-to-header plugin (the default set adds a ConfigMap-watching LoRA plugin),
    plain gRPC on loopback, no auth-checked metrics, pprof or tracing."""
    plugin = json.dumps({"fieldName": "model", "headerName": "X-Gateway-Model-Name"}, separators=(",", ":"))
    return [
        f"--grpc-port={port}",
        f"--grpc-health-port={health_port}",
        f"--metrics-port={metrics_port}",
        "--secure-serving=false",
        "--metrics-endpoint-auth=false",
        "--enable-pprof=false",
        "--tracing=false",
        "--streaming=false",
        f"--plugin=body-field-to-header:model-header:{plugin}",
    ]
