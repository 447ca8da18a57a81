#!/usr/bin/env bash
# One REAL node beside the kwok nodes: containerd 1.6 + runc + kubelet v1.35 (cgroup v1,
# cgroupfs driver) joined to the control plane of e2e/cluster.sh (same MODELFIT_STATE and
# port variables), so the operator's own manifests run as real pods with real cgroup limits.
#
#   e2e/node.sh up|down|status
#
# Needs root, `apt-get install containerd runc containernetworking-plugins`, the kubelet from
# e2e/build.sh and image tars from e2e/images.sh (imported with ctr: nothing is ever pulled).
# Everything the node writes lives under MODELFIT_NODE_DIR, except the host paths a kubelet and
# containerd 1.6 use whatever their config says (see `down`), so: one real node per machine.
# Networking stays on this machine: a bridge with 10.88.0.1/16, CNI without gateway, NAT or
# forwarding; pods have no default route. See shared notes real-node.md for the quirks.
#
# Env: MODELFIT_STATE, MODELFIT_APISERVER_PORT (as e2e/cluster.sh), MODELFIT_CACHE,
# MODELFIT_NODE_DIR (default /tmp/modelfit-node), MODELFIT_IMAGES (image tars, default
# $MODELFIT_CACHE/images), NODE_NAME (real-0), NODE_TAINT (e.g. modelfit.io/real-node=true:NoSchedule),
# NODE_LABELS (comma-separated k=v), NODE_BRIDGE (mfbr0).
set -euo pipefail
CACHE=${MODELFIT_CACHE:-$HOME/.cache/modelfit}
STATE=${MODELFIT_STATE:-/tmp/modelfit-cluster}
API_PORT=${MODELFIT_APISERVER_PORT:-36443}
NODE=${NODE_NAME:-real-0}
N=${MODELFIT_NODE_DIR:-/tmp/modelfit-node}   # all node state lives here
IMAGES=${MODELFIT_IMAGES:-$CACHE/images}
KUBELET_BIN=${KUBELET_BIN:-$CACHE/bin/kubelet}
KUBECTL="$CACHE/bin/kubectl --kubeconfig $STATE/kubeconfig"
BR=${NODE_BRIDGE:-mfbr0}; BR_IP=10.88.0.1; SUBNET=10.88.0.0/16
KUBELET_PORT=10350; KUBELET_HEALTHZ=10348
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"
export CONTAINERD_ADDRESS=$N/containerd/containerd.sock
log() { printf '[node %s] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

write_configs() {
  mkdir -p "$N"/{containerd,cni/net.d,cni/ipam,kubelet/pki,kubelet/root,kubelet/pod-logs,runc}
  cat > "$N/containerd/config.toml" <<TOML
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
oom_score = 0
[grpc]
  address = "$N/containerd/containerd.sock"
[ttrpc]
  address = "$N/containerd/containerd.sock.ttrpc"
[debug]
  address = "$N/containerd/debug.sock"
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "$N/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  enable_selinux = false
  disable_apparmor = true
  # no CAP_SYS_RESOURCE in this VM: negative oom_score_adj (-997/-998) would fail
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$N/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$N/cni/net.d"
    max_conf_num = 1
TOML
  cat > "$N/cni/net.d/10-realnode.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "realnode",
  "plugins": [{
    "type": "bridge", "bridge": "$BR", "isGateway": false, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$N/cni/ipam",
             "ranges": [[{"subnet": "$SUBNET", "rangeStart": "10.88.0.10", "rangeEnd": "10.88.255.250"}]]}
  }]
}
JSON
  # kubelet client cert signed by the cluster CA (same style as e2e/cluster.sh gen_pki)
  local P=$N/kubelet/pki
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$P/client.key" -out "$P/client.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$P/client.ext"
  openssl x509 -req -in "$P/client.csr" -CA "$STATE/pki/ca.crt" -CAkey "$STATE/pki/ca.key" -CAcreateserial \
    -out "$P/client.crt" -days 3650 -extfile "$P/client.ext" 2>/dev/null
  rm -f "$P/client.csr"; chmod 600 "$P/client.key"
  cat > "$N/kubelet/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: modelfit-e2e
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: kubelet
  user: {client-certificate: "$P/client.crt", client-key: "$P/client.key"}
contexts:
- name: modelfit-e2e
  context: {cluster: modelfit-e2e, user: kubelet}
current-context: modelfit-e2e
KC
  : > "$N/kubelet/resolv.conf"
  cat > "$N/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false                 # kubelet >= 1.35 refuses cgroup v1 otherwise
cgroupDriver: cgroupfs
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
containerRuntimeEndpoint: unix://$N/containerd/containerd.sock
imageServiceEndpoint: unix://$N/containerd/containerd.sock
address: $BR_IP                     # apiserver -> kubelet (logs/exec) via InternalIP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: AlwaysAllow}  # only x509 clients of the cluster CA get through
resolvConf: $N/kubelet/resolv.conf
registerNode: true
oomScoreAdj: 0                      # no CAP_SYS_RESOURCE: -999 cannot be set
failSwapOn: false
podLogsDir: $N/kubelet/pod-logs
maxPods: 20
podPidsLimit: 4096
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
nodeStatusUpdateFrequency: 10s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
containerLogMaxSize: 10Mi
YAML
}

cmd_up() {
  [[ $(id -u) == 0 ]] || die "a real node needs root"
  [[ -f "$STATE/pki/ca.key" ]] || die "no cluster at $STATE (run e2e/cluster.sh up)"
  [[ -x "$KUBELET_BIN" ]] || die "no kubelet at $KUBELET_BIN (run e2e/build.sh k8s)"
  local b; for b in /usr/bin/containerd /usr/sbin/runc /usr/lib/cni/bridge /usr/lib/cni/host-local; do
    [[ -x $b ]] || die "$b missing (apt-get install containerd runc containernetworking-plugins)"
  done
  if [[ -f "$N/kubelet.pid" ]] && kill -0 "$(cat "$N/kubelet.pid")" 2>/dev/null; then log "already up"; return 0; fi
  local t0; t0=$(now); mkdir -p "$N"
  [[ -f "$N/sysctl-before" ]] || for k in $SYSCTLS; do echo "$k=$(sysctl -n "$k")"; done > "$N/sysctl-before.tmp"
  rm -rf "$N/cni/ipam"   # leases of a node that went down hard
  write_configs
  [[ -f "$N/sysctl-before" ]] || mv "$N/sysctl-before.tmp" "$N/sysctl-before"
  # host side of the pod network: bridge with the gateway IP, no forwarding, no NAT
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr replace "$BR_IP/16" dev "$BR"; ip link set "$BR" up

  log "starting containerd"
  nohup /usr/bin/containerd --config "$N/containerd/config.toml" >>"$N/containerd/containerd.log" 2>&1 </dev/null &
  echo $! > "$N/containerd.pid"
  for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
  ctr version >/dev/null || die "containerd did not start (see $N/containerd/containerd.log)"
  log "containerd up after $(since "$t0")s"
  local img
  for img in pause curl llama operator epp bbr envoy; do   # what e2e/images.sh builds; nothing is ever pulled
    [[ -f $IMAGES/$img.tar ]] || continue
    ctr -n k8s.io images import "$IMAGES/$img.tar" >/dev/null
  done
  [[ -f $IMAGES/pause.tar ]] || die "no pause image in $IMAGES (run e2e/images.sh $IMAGES)"
  log "images imported after $(since "$t0")s: $(ctr -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"

  log "starting kubelet"
  local tk extra=(); tk=$(now)
  [[ -n ${NODE_TAINT:-} ]] && extra+=(--register-with-taints="$NODE_TAINT")
  [[ -n ${NODE_LABELS:-} ]] && extra+=(--node-labels="$NODE_LABELS")
  nohup "$KUBELET_BIN" "${extra[@]}" --config="$N/kubelet/config.yaml" --kubeconfig="$N/kubelet/kubeconfig" \
    --root-dir="$N/kubelet/root" --cert-dir="$N/kubelet/pki" --hostname-override="$NODE" --node-ip="$BR_IP" \
    --containerd="$N/containerd/containerd.sock" --v=2 >>"$N/kubelet/kubelet.log" 2>&1 </dev/null &
  echo $! > "$N/kubelet.pid"
  echo "$STATE" > "$N/cluster"  # the control plane it joined: only that cluster's `down` stops it
  for _ in $(seq 600); do
    [[ "$($KUBECTL get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]] && break
    kill -0 "$(cat "$N/kubelet.pid")" 2>/dev/null || die "kubelet exited (see $N/kubelet/kubelet.log)"
    sleep 0.1
  done
  [[ "$($KUBECTL get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]] \
    || die "node $NODE not Ready after 60 s (see $N/kubelet/kubelet.log)"
  log "node $NODE Ready $(since "$tk")s after kubelet start ($(since "$t0")s total)"
}

stop_pid() {  # <pidfile> <timeout-s>
  [[ -f "$1" ]] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"; for _ in $(seq $(($2 * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}

cmd_down() {
  [[ -d $N ]] || return 0
  # 1. let the kubelet stop the pods (CNI teardown, volume unmounts)
  if [[ -f "$N/kubelet.pid" ]] && kill -0 "$(cat "$N/kubelet.pid")" 2>/dev/null; then
    $KUBECTL delete pods -A --field-selector "spec.nodeName=$NODE" --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1 || true
    for _ in $(seq 60); do [[ -z "$(ctr -n k8s.io tasks ls -q 2>/dev/null)" ]] && break; sleep 1; done
  fi
  stop_pid "$N/kubelet.pid" 10
  # 2. anything still running: kill tasks, drop containers
  if ctr version >/dev/null 2>&1; then
    local c
    for c in $(ctr -n k8s.io tasks ls -q 2>/dev/null); do ctr -n k8s.io tasks kill -s SIGKILL "$c" || true; done
    sleep 1
    for c in $(ctr -n k8s.io containers ls -q 2>/dev/null); do ctr -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true; ctr -n k8s.io containers rm "$c" >/dev/null 2>&1 || true; done
  fi
  stop_pid "$N/containerd.pid" 10
  # 3. mounts left under the node dir (kubelet root bind mount, tmpfs volumes, overlay, netns)
  local m
  for m in $(awk -v d="$N" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
  # 4. cgroups created by the kubelet / runc (empty by now)
  local sub
  for sub in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
    for m in kubepods k8s.io; do
      [[ -d "$sub$m" ]] && find "$sub$m" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
  done
  ip link del "$BR" 2>/dev/null || true
  # 5. host paths that kubelet/containerd 1.6 use whatever the config says
  local f
  for f in /var/log/containers/*.log; do [[ -L "$f" && "$(readlink "$f")" == "$N"/* ]] && rm -f "$f"; done
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  for d in /var/log/containers /var/lib/kubelet/device-plugins /var/lib/kubelet /var/lib/cni/results /var/lib/cni /run/netns; do
    rmdir "$d" 2>/dev/null || true
  done
  $KUBECTL delete node "$NODE" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  [[ -d /run/containerd ]] && find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
  # 6. kernel tunables the kubelet changed
  if [[ -f "$N/sysctl-before" ]]; then
    while IFS== read -r k v; do sysctl -qw "$k=$v"; done < "$N/sysctl-before"; rm -f "$N/sysctl-before"
  fi
  log "node down"
}

cmd_status() {
  local p rc=0
  for p in containerd kubelet; do
    if [[ -f "$N/$p.pid" ]] && kill -0 "$(cat "$N/$p.pid")" 2>/dev/null; then echo "$p: running (pid $(cat "$N/$p.pid"))"
    else echo "$p: stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
