#!/usr/bin/env bash
# Local Kubernetes control plane on 127.0.0.1 from the binaries built by
# e2e/build.sh: etcd, kube-apiserver (RBAC, SA token signing),
# kube-controller-manager, kube-scheduler and kwok (fake nodes/pods).
#
#   e2e/cluster.sh up|down|status|kubeconfig
#
# Env: MODELFIT_CACHE (binaries), MODELFIT_STATE (state dir, default
# /tmp/modelfit-cluster), ports MODELFIT_{ETCD,ETCD_PEER,APISERVER,KCM,SCHEDULER,KWOK}_PORT,
# MODELFIT_HPA_SYNC_PERIOD (the HPA controller's period, default 15s as upstream).
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
BIN="$CACHE/bin"
STATE="${MODELFIT_STATE:-/tmp/modelfit-cluster}"
ETCD_PORT="${MODELFIT_ETCD_PORT:-32379}"
ETCD_PEER_PORT="${MODELFIT_ETCD_PEER_PORT:-32380}"
API_PORT="${MODELFIT_APISERVER_PORT:-36443}"
KCM_PORT="${MODELFIT_KCM_PORT:-40257}"
SCHED_PORT="${MODELFIT_SCHEDULER_PORT:-40259}"
KWOK_PORT="${MODELFIT_KWOK_PORT:-40247}"
HOST=127.0.0.1
PKI="$STATE/pki"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
KUBECONFIG_FILE="$STATE/kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { local f="$PIDS/$1.pid"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

# ------------------------------------------------------------------ certificates
gen_pki() {
  mkdir -p "$PKI"; cd "$PKI"
  local subj=/CN=modelfit-e2e-ca
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "$subj" 2>/dev/null
  # serving cert for kube-apiserver
  cat > apiserver.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EXT
  cert apiserver "/CN=kube-apiserver" apiserver.ext
  # client certs
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > client.ext
  cert admin "/O=system:masters/CN=kubernetes-admin" client.ext
  cert kube-controller-manager "/CN=system:kube-controller-manager" client.ext
  cert kube-scheduler "/CN=system:kube-scheduler" client.ext
  cert kwok "/O=system:masters/CN=kwok-controller" client.ext
  # the apiserver's client identity towards real kubelets (kubectl logs/exec on e2e/node.sh's node)
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client.ext
  # front-proxy (aggregation layer / requestheader authn) CA + client cert
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
    -subj /CN=modelfit-e2e-front-proxy-ca 2>/dev/null
  cert front-proxy-client "/CN=front-proxy-client" client.ext front-proxy-ca
  # service-account token signing key pair
  openssl ecparam -name prime256v1 -genkey -noout -out sa.key 2>/dev/null
  openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
  chmod 600 ./*.key
  cd - >/dev/null
}

cert() {  # <name> <subject> <extfile> [ca-name]
  local ca="${4:-ca}"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -out "$1.crt" -days 3650 -extfile "$3" 2>/dev/null
  rm -f "$1.csr"
}

kubeconfig() {  # <out> <cert-name>
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: modelfit-e2e
  cluster:
    server: https://$HOST:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: modelfit-e2e
  context: {cluster: modelfit-e2e, user: $2}
current-context: modelfit-e2e
KC
}

start() {  # <name> <cmd...>
  local name="$1"; shift
  nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! > "$PIDS/$name.pid"
}

wait_for() {  # <desc> <timeout-s> <cmd...>
  local desc="$1" t="$2"; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= end )); then die "timed out waiting for $desc (logs: $LOGS)"; fi
    sleep 0.2
  done
}

port_free() { ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

KUBECTL() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# ------------------------------------------------------------------ commands
cmd_up() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubectl; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b missing; run e2e/build.sh first"
  done
  if alive kube-apiserver; then log "already running (state $STATE)"; cmd_status; return 0; fi
  [[ -d "$STATE" ]] && cmd_down >/dev/null 2>&1 || true
  local p; for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT" "$KCM_PORT" "$SCHED_PORT" "$KWOK_PORT"; do
    for _ in $(seq 25); do port_free "$p" && break; sleep 0.2; done
    port_free "$p" || die "port $HOST:$p already in use (override with MODELFIT_*_PORT)"
  done
  local t0=$SECONDS
  mkdir -p "$STATE" "$LOGS" "$PIDS"; mkdir -m 700 "$STATE/etcd"
  log "generating certificates"
  gen_pki
  kubeconfig "$KUBECONFIG_FILE" admin
  kubeconfig "$STATE/kcm.kubeconfig" kube-controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" kube-scheduler
  kubeconfig "$STATE/kwok.kubeconfig" kwok

  log "starting etcd on $HOST:$ETCD_PORT"
  local etcd_extra=()
  "$BIN/etcd" --help 2>&1 | grep -q -- '--unsafe-no-fsync' && etcd_extra+=(--unsafe-no-fsync)
  start etcd "$BIN/etcd" --name=e2e --data-dir="$STATE/etcd" \
    --listen-client-urls="http://$HOST:$ETCD_PORT" --advertise-client-urls="http://$HOST:$ETCD_PORT" \
    --listen-peer-urls="http://$HOST:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster="e2e=http://$HOST:$ETCD_PEER_PORT" \
    --auto-compaction-retention=1 --quota-backend-bytes=$((2*1024*1024*1024)) "${etcd_extra[@]}"

  log "starting kube-apiserver on https://$HOST:$API_PORT"
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://$HOST:$ETCD_PORT" \
    --bind-address=$HOST --advertise-address=$HOST --secure-port="$API_PORT" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=true --endpoint-reconciler-type=none \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --profiling=false

  wait_for "etcd health" 30 curl -fsS "http://$HOST:$ETCD_PORT/health"
  wait_for "kube-apiserver /readyz" 60 "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz
  log "kube-apiserver ready after $((SECONDS - t0))s"

  log "starting kube-controller-manager and kube-scheduler"
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$STATE/kcm.kubeconfig" \
    --authentication-kubeconfig="$STATE/kcm.kubeconfig" --authorization-kubeconfig="$STATE/kcm.kubeconfig" \
    --bind-address=$HOST --secure-port="$KCM_PORT" --leader-elect=false \
    --use-service-account-credentials=true \
    --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --horizontal-pod-autoscaler-sync-period="${MODELFIT_HPA_SYNC_PERIOD:-15s}" \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=$HOST --secure-port="$SCHED_PORT" --leader-elect=false \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --profiling=false

  log "starting kwok (manages nodes annotated kwok.x-k8s.io/node=fake)"
  start kwok "$BIN/kwok" \
    --kubeconfig="$STATE/kwok.kubeconfig" \
    --config="$E2E_DIR/kwok-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 \
    --cidr=10.244.0.0/16 --node-ip=10.0.0.1 \
    --server-address="$HOST:$KWOK_PORT"

  wait_for "default/default ServiceAccount" 60 KUBECTL -n default get serviceaccount default
  local c; for c in "${COMPONENTS[@]}"; do alive "$c" || die "$c exited early; see $LOGS/$c.log"; done
  log "cluster up in $((SECONDS - t0))s; KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_down() {
  local c pid pids=()
  # a real node (e2e/node.sh) joined to this control plane goes first, while the apiserver can still delete
  # its pods; one joined to another cluster (its own MODELFIT_STATE) is left alone
  local node_dir="${MODELFIT_NODE_DIR:-/tmp/modelfit-node}" joined=""
  [[ -f "$node_dir/cluster" ]] && joined=$(cat "$node_dir/cluster")
  if [[ -f "$node_dir/kubelet.pid" || -f "$node_dir/containerd.pid" ]]; then
    if [[ -z "$joined" || "$joined" == "$STATE" ]]; then
      "$E2E_DIR/node.sh" down || log "node.sh down failed"
    else
      log "real node in $node_dir belongs to the cluster at $joined; left running"
    fi
  fi
  for c in "${COMPONENTS[@]}"; do
    [[ -f "$PIDS/$c.pid" ]] || continue
    pid=$(cat "$PIDS/$c.pid")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; pids+=("$pid"); log "stopping $c ($pid)"; fi
  done
  # State is discarded anyway: give components 3s to exit on SIGTERM, then SIGKILL.
  for _ in $(seq 30); do
    local left=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    (( left )) || break; sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  if [[ -d "$STATE" ]]; then
    [[ -f "$STATE/kubeconfig" || -d "$PIDS" ]] || die "refusing to remove $STATE: not a cluster state dir"
    rm -rf "$STATE"; log "removed $STATE"
  fi
}

cmd_status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "$c: running (pid $(cat "$PIDS/$c.pid"))"; else echo "$c: stopped"; rc=1; fi
  done
  if (( rc == 0 )); then
    KUBECTL get --raw /readyz >/dev/null 2>&1 && echo "apiserver: ready (https://$HOST:$API_PORT)" || { echo "apiserver: not ready"; rc=1; }
    echo "kubeconfig: $KUBECONFIG_FILE"
  fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) [[ -f "$KUBECONFIG_FILE" ]] || die "no cluster (run: $0 up)"; echo "$KUBECONFIG_FILE" ;;
  *) echo "usage: $0 up|down|status|kubeconfig" >&2; exit 2 ;;
esac
