#!/usr/bin/env bash
# The custom-metrics pipeline of an e2e/cluster.sh cluster, as host processes on 127.0.0.1:
# Prometheus (scrapes file_sd targets) + prometheus-adapter (serves custom.metrics.k8s.io
# through the aggregation layer), so that a real HPA (the KCM's controller) scales on
# llama-server's own gauges. Binaries from `e2e/build.sh prometheus prometheus-adapter`.
#
#   e2e/metrics.sh up|down|status
#
# Targets: JSON file_sd files in $MODELFIT_METRICS_DIR/targets/*.json (written by the caller,
# e.g. e2e/_metrics.py from the real node's pods), each target labelled namespace and pod:
#   [{"targets": ["10.88.0.12:8080"], "labels": {"namespace": "ns", "pod": "chat-abc"}}]
# In a real cluster kubernetes_sd_configs (or a PodMonitor) does this; see
# examples/prometheus-adapter-values.yaml for the same rules in the upstream chart.
#
# Metrics served per pod (custom.metrics.k8s.io v1beta2 and v1beta1):
#   llamacpp_requests_inflight    sum(llamacpp:requests_processing + llamacpp:requests_deferred) by (pod)
#   llamacpp_requests_processing  llamacpp:requests_processing
#   llamacpp_requests_deferred    llamacpp:requests_deferred
#   llamacpp_tokens_predicted_per_second  rate(llamacpp:tokens_predicted_total[1m])
#
# The aggregator reaches the adapter through a Service of type ExternalName (localhost): there is
# no kube-proxy, and Endpoints reject loopback addresses. TLS is verified: the adapter's serving
# certificate (SAN <svc>.<ns>.svc) is signed by the cluster CA, which is the APIService's caBundle.
#
# Env: MODELFIT_STATE (cluster state dir, as e2e/cluster.sh; its kubeconfig and pki/ca.*),
# MODELFIT_KUBECONFIG (default $MODELFIT_STATE/kubeconfig), MODELFIT_METRICS_CA (CA cert/key
# prefix, default $MODELFIT_STATE/pki/ca), MODELFIT_METRICS_DIR (default $MODELFIT_STATE/metrics),
# MODELFIT_PROMETHEUS_PORT (39090), MODELFIT_ADAPTER_PORT (39443),
# MODELFIT_SCRAPE_INTERVAL (5s), MODELFIT_ADAPTER_RELIST (10s: how soon a new pod's series is
# known to the adapter), MODELFIT_METRICS_NAMESPACE (monitoring), MODELFIT_CACHE (binaries).
set -euo pipefail

CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
BIN="$CACHE/bin"
STATE="${MODELFIT_STATE:-/tmp/modelfit-cluster}"
KUBECONFIG_FILE="${MODELFIT_KUBECONFIG:-$STATE/kubeconfig}"
CA="${MODELFIT_METRICS_CA:-$STATE/pki/ca}"
DIR="${MODELFIT_METRICS_DIR:-$STATE/metrics}"
PROM_PORT="${MODELFIT_PROMETHEUS_PORT:-39090}"
ADAPTER_PORT="${MODELFIT_ADAPTER_PORT:-39443}"
SCRAPE="${MODELFIT_SCRAPE_INTERVAL:-5s}"
RELIST="${MODELFIT_ADAPTER_RELIST:-10s}"
NS="${MODELFIT_METRICS_NAMESPACE:-monitoring}"
SVC=prometheus-adapter
HOST=127.0.0.1
PIDS="$DIR/pids"
LOGS="$DIR/logs"
VERSIONS=(v1beta2 v1beta1)

log() { printf '[metrics %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
KUBECTL() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
alive() { local f="$PIDS/$1.pid"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }
port_free() { ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_for() {  # <desc> <timeout-s> <cmd...>
  local desc="$1" t="$2"; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || die "timed out waiting for $desc (logs: $LOGS)"
    sleep 0.2
  done
}

start() {  # <name> <cmd...>
  local name="$1"; shift
  nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! > "$PIDS/$name.pid"
}

write_configs() {
  mkdir -p "$DIR/targets" "$DIR/prometheus-data" "$PIDS" "$LOGS"
  cat > "$DIR/prometheus.yml" <<YAML
global: {scrape_interval: $SCRAPE, scrape_timeout: $SCRAPE, evaluation_interval: $SCRAPE}
scrape_configs:
- job_name: llama-server
  file_sd_configs: [{files: ["$DIR/targets/*.json"], refresh_interval: 5s}]
YAML
  # The same rules as examples/prometheus-adapter-values.yaml.
  cat > "$DIR/adapter.yaml" <<'YAML'
rules:
- seriesQuery: 'llamacpp:requests_processing{namespace!="",pod!=""}'
  resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
  name: {matches: "^llamacpp:requests_processing$", as: "llamacpp_requests_inflight"}
  metricsQuery: 'sum(llamacpp:requests_processing{<<.LabelMatchers>>} + llamacpp:requests_deferred{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
- seriesQuery: '{__name__=~"llamacpp:requests_(processing|deferred)",namespace!="",pod!=""}'
  resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
  name: {matches: "^llamacpp:(.*)$", as: "llamacpp_${1}"}
  metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
- seriesQuery: 'llamacpp:tokens_predicted_total{namespace!="",pod!=""}'
  resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
  name: {matches: "^llamacpp:(.*)_total$", as: "llamacpp_${1}_per_second"}
  metricsQuery: 'sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)'
YAML
}

serving_cert() {  # the adapter's serving certificate, signed by the cluster CA
  local ext="$DIR/adapter.ext"
  printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
    "subjectAltName=DNS:$SVC.$NS.svc,DNS:$SVC.$NS.svc.cluster.local,DNS:localhost,IP:$HOST" > "$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$DIR/adapter.key" \
    -out "$DIR/adapter.csr" -subj "/CN=$SVC.$NS.svc" 2>/dev/null
  openssl x509 -req -in "$DIR/adapter.csr" -CA "$CA.crt" -CAkey "$CA.key" -CAcreateserial \
    -CAserial "$DIR/ca.srl" -out "$DIR/adapter.crt" -days 365 -extfile "$ext" 2>/dev/null
  rm -f "$DIR/adapter.csr"; chmod 600 "$DIR/adapter.key"
}

register() {  # ExternalName Service + APIServices (aggregator -> https://localhost:$ADAPTER_PORT)
  local ca_b64 v; ca_b64=$(base64 -w0 < "$CA.crt")
  {
    cat <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NS}
---
apiVersion: v1
kind: Service
metadata: {name: $SVC, namespace: $NS, labels: {app.kubernetes.io/managed-by: modelfit-e2e-metrics}}
spec: {type: ExternalName, externalName: localhost}
YAML
    for v in "${VERSIONS[@]}"; do
      cat <<YAML
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: $v.custom.metrics.k8s.io, labels: {app.kubernetes.io/managed-by: modelfit-e2e-metrics}}
spec:
  group: custom.metrics.k8s.io
  version: $v
  groupPriorityMinimum: 100
  versionPriority: $([[ $v == v1beta2 ]] && echo 200 || echo 100)
  caBundle: $ca_b64
  service: {name: $SVC, namespace: $NS, port: $ADAPTER_PORT}
YAML
    done
  } | KUBECTL apply -f - >/dev/null
}

cmd_up() {
  local b; for b in prometheus prometheus-adapter kubectl; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b missing; run e2e/build.sh prometheus prometheus-adapter"
  done
  [[ -f "$KUBECONFIG_FILE" ]] || die "no kubeconfig at $KUBECONFIG_FILE (e2e/cluster.sh up; MODELFIT_STATE)"
  [[ -f "$CA.crt" && -f "$CA.key" ]] || die "cluster CA $CA.{crt,key} missing (MODELFIT_METRICS_CA)"
  if alive prometheus && alive prometheus-adapter; then
    [[ "$(cat "$DIR/ports" 2>/dev/null)" == "$PROM_PORT $ADAPTER_PORT" ]] \
      || die "already running in $DIR on other ports ($(cat "$DIR/ports" 2>/dev/null)); e2e/metrics.sh down first"
    log "already running ($DIR)"; cmd_status; return 0
  fi
  cmd_down >/dev/null 2>&1 || true
  local p; for p in "$PROM_PORT" "$ADAPTER_PORT"; do
    port_free "$p" || die "port $HOST:$p already in use (MODELFIT_PROMETHEUS_PORT / MODELFIT_ADAPTER_PORT)"
  done
  local t0=$SECONDS
  write_configs
  echo "$PROM_PORT $ADAPTER_PORT" > "$DIR/ports"
  serving_cert
  log "starting prometheus on http://$HOST:$PROM_PORT (scrape every $SCRAPE, targets $DIR/targets/*.json)"
  start prometheus "$BIN/prometheus" --config.file="$DIR/prometheus.yml" \
    --web.listen-address="$HOST:$PROM_PORT" --storage.tsdb.path="$DIR/prometheus-data" \
    --storage.tsdb.retention.time=2h
  log "starting prometheus-adapter on https://$HOST:$ADAPTER_PORT (relist every $RELIST)"
  (cd "$DIR" && start prometheus-adapter "$BIN/prometheus-adapter" \
    --prometheus-url="http://$HOST:$PROM_PORT" --config="$DIR/adapter.yaml" \
    --metrics-relist-interval="$RELIST" \
    --secure-port="$ADAPTER_PORT" --bind-address=$HOST \
    --tls-cert-file="$DIR/adapter.crt" --tls-private-key-file="$DIR/adapter.key" \
    --lister-kubeconfig="$KUBECONFIG_FILE" --authentication-kubeconfig="$KUBECONFIG_FILE" \
    --authorization-kubeconfig="$KUBECONFIG_FILE")
  wait_for "prometheus /-/ready" 30 curl -fsS --noproxy '*' "http://$HOST:$PROM_PORT/-/ready"
  wait_for "prometheus-adapter /healthz" 30 curl -fsS --noproxy '*' --cacert "$CA.crt" \
    --resolve "$SVC.$NS.svc:$ADAPTER_PORT:$HOST" "https://$SVC.$NS.svc:$ADAPTER_PORT/healthz"
  register
  local v; for v in "${VERSIONS[@]}"; do
    KUBECTL wait --for=condition=Available "apiservice/$v.custom.metrics.k8s.io" --timeout=60s >/dev/null \
      || die "APIService $v.custom.metrics.k8s.io not Available: $(KUBECTL get apiservice "$v.custom.metrics.k8s.io" -o jsonpath='{.status.conditions}')"
  done
  alive prometheus || die "prometheus exited; see $LOGS/prometheus.log"
  alive prometheus-adapter || die "prometheus-adapter exited; see $LOGS/prometheus-adapter.log"
  log "up in $((SECONDS - t0))s: custom.metrics.k8s.io Available; targets dir $DIR/targets"
}

cmd_down() {
  # APIServices first: an unavailable aggregated API breaks discovery (and namespace deletion).
  if [[ -f "$KUBECONFIG_FILE" ]]; then
    local v; for v in "${VERSIONS[@]}"; do
      KUBECTL delete apiservice "$v.custom.metrics.k8s.io" --ignore-not-found --wait=false --request-timeout=10s >/dev/null 2>&1 || true
    done
    KUBECTL -n "$NS" delete service "$SVC" --ignore-not-found --wait=false --request-timeout=10s >/dev/null 2>&1 || true
  fi
  local c pid
  for c in prometheus-adapter prometheus; do
    [[ -f "$PIDS/$c.pid" ]] || continue
    pid=$(cat "$PIDS/$c.pid")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $c ($pid)"; kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$c.pid"
  done
  if [[ -d "$DIR" ]]; then
    [[ -f "$DIR/prometheus.yml" || -d "$PIDS" ]] || die "refusing to remove $DIR: not a metrics state dir"
    rm -rf "$DIR"; log "removed $DIR"
  fi
}

cmd_status() {
  local c rc=0
  for c in prometheus prometheus-adapter; do
    if alive "$c"; then echo "$c: running (pid $(cat "$PIDS/$c.pid"))"; else echo "$c: stopped"; rc=1; fi
  done
  if (( rc == 0 )); then
    local v; for v in "${VERSIONS[@]}"; do
      echo "apiservice $v.custom.metrics.k8s.io: $(KUBECTL get apiservice "$v.custom.metrics.k8s.io" \
        -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null || echo missing)"
    done
    echo "prometheus: http://$HOST:$PROM_PORT; targets: $DIR/targets"
  fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
