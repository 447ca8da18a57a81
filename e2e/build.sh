#!/usr/bin/env bash
# Build the e2e toolchain (Kubernetes control plane, etcd, kwok, helm, helmfile,
# helm-diff, and the metrics pipeline of e2e/metrics.sh: prometheus, prometheus-adapter)
# from Go modules into a cache outside the repo.
#
#   e2e/build.sh [component...]     components: k8s etcd kwok helm helmfile helm-diff
#                                               prometheus prometheus-adapter
#                                   optional (named only): epp bbr lwepp
#
# Idempotent: each component writes $CACHE/stamps/<component> holding its
# version + build flags; a rerun skips components whose stamp matches and
# whose binaries exist.  FORCE=1 rebuilds.
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
BIN="$CACHE/bin"
STAMPS="$CACHE/stamps"
PLUGINS="$CACHE/helm-plugins"
mkdir -p "$BIN" "$STAMPS" "$PLUGINS"

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
HELMFILE_VERSION="${HELMFILE_VERSION:-v1.8.0}"
HELM_DIFF_VERSION="${HELM_DIFF_VERSION:-v3.9.11}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"   # Prometheus 3.16.0 (3.x is published as v0.3xx.y)
PROMETHEUS_TAGS="${PROMETHEUS_TAGS:-remove_all_sd}"    # keeps static, file_sd and http_sd only
PROMETHEUS_ADAPTER_VERSION="${PROMETHEUS_ADAPTER_VERSION:-v0.12.0}"
GIE_VERSION="${GIE_VERSION:-v1.5.0}"                   # Gateway API Inference Extension: epp, bbr
GIE_LWEPP_VERSION="${GIE_LWEPP_VERSION:-v1.6.0}"       # its round-robin picker appears in v1.6.0

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:--mod=mod}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
GOBUILD=(go build -p "${BUILD_P:-2}" -trimpath)

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# stamp_ok <component> <stamp-content> <binaries...>
stamp_ok() {
  local c="$1" want="$2"; shift 2
  [[ "${FORCE:-0}" == 1 ]] && return 1
  [[ -f "$STAMPS/$c" && "$(cat "$STAMPS/$c")" == "$want" ]] || return 1
  local b; for b in "$@"; do [[ -x "$b" ]] || return 1; done
}

# run_component <component> <stamp-content> <function> <binaries...>
run_component() {
  local c="$1" want="$2" fn="$3"; shift 3
  if stamp_ok "$c" "$want" "$@"; then
    log "$c: up to date ($want)"; return 0
  fi
  log "$c: building $want ..."
  local t0=$SECONDS
  "$fn"
  printf '%s\n' "$want" > "$STAMPS/$c"
  log "$c: built in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- kubernetes
build_k8s() {
  local mod="$E2E_DIR/tools/k8s"
  if [[ "$(cat "$mod/VERSION" 2>/dev/null)" != "$K8S_VERSION" ]]; then
    log "k8s: generating wrapper go.mod for $K8S_VERSION"
    "$mod/generate.sh" "$K8S_VERSION"
  fi
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local date; date=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' "k8s.io/kubernetes@$K8S_VERSION")
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  (cd "$mod" && "${GOBUILD[@]}" -tags selinux,notest -ldflags "$ld" -o "$BIN/" \
     k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
     k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet)
}

# ---------------------------------------------------------------- etcd
build_etcd() {
  local mod="$E2E_DIR/tools/etcd"
  (cd "$mod"
   if [[ "$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)" != "$ETCD_VERSION" ]]; then
     go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy
   fi
   "${GOBUILD[@]}" -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
}

# ---------------------------------------------------------------- kwok
build_kwok() {
  # pkg/consts.Version is a constant matching the module version; only KubeVersion
  # (kwokctl's default cluster version) is aligned with the Kubernetes we build.
  local ld="-s -w -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION#v}"
  GOBIN="$BIN" go install -p "${BUILD_P:-2}" -trimpath -ldflags "$ld" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

# ---------------------------------------------------------------- helm
build_helm() {
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  GOBIN="$BIN" go install -p "${BUILD_P:-2}" -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# ---------------------------------------------------------------- helmfile
build_helmfile() {
  # helmfile v1.4.4 (no replaces) cannot be built here: its dependency
  # github.com/helmfile/vals@v0.43.8 is not served by the module proxy (403).
  # Newer helmfile carries replace lines, hence the wrapper module tools/helmfile.
  local mod="$E2E_DIR/tools/helmfile"
  local ld="-s -w -X go.szostok.io/version.version=${HELMFILE_VERSION#v}"
  (cd "$mod"
   if [[ "$(go list -m -f '{{.Version}}' github.com/helmfile/helmfile)" != "$HELMFILE_VERSION" ]]; then
     go mod edit -require="github.com/helmfile/helmfile@$HELMFILE_VERSION" && go mod tidy
   fi
   "${GOBUILD[@]}" -ldflags "$ld" -o "$BIN/helmfile" github.com/helmfile/helmfile)
}

# ---------------------------------------------------------------- helm-diff
build_helm_diff() {
  local pd="$PLUGINS/diff" mv="github.com/databus23/helm-diff/v3@$HELM_DIFF_VERSION"
  rm -rf "$pd"; mkdir -p "$pd/bin"
  local mod="$E2E_DIR/tools/helm-diff"
  local ld="-s -w -X github.com/databus23/helm-diff/v3/cmd.Version=${HELM_DIFF_VERSION#v}"
  (cd "$mod"
   if [[ "$(go list -m -f '{{.Version}}' github.com/databus23/helm-diff/v3)" != "$HELM_DIFF_VERSION" ]]; then
     go mod edit -require="$mv" && go mod tidy
   fi
   "${GOBUILD[@]}" -ldflags "$ld" -o "$pd/bin/diff" github.com/databus23/helm-diff/v3)
  local src; src=$(cd "$mod" && go list -m -f '{{.Dir}}' github.com/databus23/helm-diff/v3)
  # plugin.yaml from the module, minus the install/update hooks (they download from GitHub).
  python3 - "$src/plugin.yaml" "$pd/plugin.yaml" <<'PY'
import sys, re
src, dst = sys.argv[1:]
out, skip = [], False
for line in open(src):
    if re.match(r'^hooks:', line):
        skip = True; continue
    if skip and (line.startswith((' ', '\t')) or not line.strip()):
        continue
    skip = False
    out.append(line)
open(dst, 'w').write(''.join(out))
PY
}

# ---------------------------------------------------------------- prometheus
build_prometheus() {
  # No wrapper module needed (no replace lines). Module builds carry no web UI (needs
  # -tags builtinassets and generated assets); the server, scraping, TSDB and /api/v1 work.
  local ld="-s -w"
  if [[ "$PROMETHEUS_VERSION" =~ ^v0\.([0-9])([0-9]{2})\.([0-9]+)$ ]]; then   # v0.316.0 -> 3.16.0
    ld+=" -X github.com/prometheus/common/version.Version=${BASH_REMATCH[1]}.$((10#${BASH_REMATCH[2]})).${BASH_REMATCH[3]}"
  fi
  GOBIN="$BIN" go install -p "${BUILD_P:-2}" -trimpath -tags "$PROMETHEUS_TAGS" -ldflags "$ld" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
}

# ---------------------------------------------------------------- prometheus-adapter
build_prometheus_adapter() {
  # Wrapper module: the proxy serves no version list for sigs.k8s.io/prometheus-adapter (403),
  # so `go install ...@version` fails. Test infrastructure only (the project is being deprecated
  # upstream; v0.12.0 is its last release and the only version the proxy serves).
  local mod="$E2E_DIR/tools/prometheus-adapter"
  (cd "$mod"
   if [[ "$(go list -m -f '{{.Version}}' sigs.k8s.io/prometheus-adapter)" != "$PROMETHEUS_ADAPTER_VERSION" ]]; then
     go mod edit -require="sigs.k8s.io/prometheus-adapter@$PROMETHEUS_ADAPTER_VERSION" && go mod tidy
   fi
   "${GOBUILD[@]}" -ldflags "-s -w" -o "$BIN/prometheus-adapter" sigs.k8s.io/prometheus-adapter/cmd/adapter)
}

# ---------------------------------------------------------------- gateway-api-inference-extension
# Wrapper modules (the proxy answers 403 for the module's version list): tools/gie pins the
# endpoint picker and body-based router at GIE_VERSION, tools/gie-lwepp the round-robin picker
# at GIE_LWEPP_VERSION (one module graph holds one version of the extension).
# build_gie <wrapper-dir> <version> <cmd> <binary-name>
build_gie() {
  local mod="$E2E_DIR/tools/$1" ver="$2" m=sigs.k8s.io/gateway-api-inference-extension
  local ld="-s -w -X $m/version.BuildRef=$ver"
  (cd "$mod"
   if [[ "$(go list -m -f '{{.Version}}' "$m")" != "$ver" ]]; then
     go mod edit -require="$m@$ver" && go mod tidy
   fi
   "${GOBUILD[@]}" -ldflags "$ld" -o "$BIN/$4" "$m/cmd/$3")
}
build_epp() { build_gie gie "$GIE_VERSION" epp epp; }
build_bbr() { build_gie gie "$GIE_VERSION" bbr bbr; }
build_lwepp() { build_gie gie-lwepp "$GIE_LWEPP_VERSION" lwepp lwepp; }

ALL=(k8s etcd kwok helm helmfile helm-diff prometheus prometheus-adapter)
OPTIONAL=(epp bbr lwepp)   # not in the default list: each adds minutes to a cold CI run
want=("$@"); [[ ${#want[@]} -eq 0 ]] && want=("${ALL[@]}")
T0=$SECONDS
for c in "${want[@]}"; do
  case "$c" in
    k8s) run_component k8s "$K8S_VERSION +kubelet tags=selinux,notest go=$(go env GOVERSION)" build_k8s \
           "$BIN/kube-apiserver" "$BIN/kube-controller-manager" "$BIN/kube-scheduler" "$BIN/kubectl" "$BIN/kubelet" ;;
    etcd) run_component etcd "$ETCD_VERSION go=$(go env GOVERSION)" build_etcd "$BIN/etcd" ;;
    kwok) run_component kwok "$KWOK_VERSION go=$(go env GOVERSION)" build_kwok "$BIN/kwok" "$BIN/kwokctl" ;;
    helm) run_component helm "$HELM_VERSION go=$(go env GOVERSION)" build_helm "$BIN/helm" ;;
    helmfile) run_component helmfile "$HELMFILE_VERSION go=$(go env GOVERSION)" build_helmfile "$BIN/helmfile" ;;
    helm-diff) run_component helm-diff "$HELM_DIFF_VERSION go=$(go env GOVERSION)" build_helm_diff "$PLUGINS/diff/bin/diff" ;;
    prometheus) run_component prometheus "$PROMETHEUS_VERSION tags=$PROMETHEUS_TAGS go=$(go env GOVERSION)" build_prometheus "$BIN/prometheus" ;;
    prometheus-adapter) run_component prometheus-adapter "$PROMETHEUS_ADAPTER_VERSION go=$(go env GOVERSION)" \
           build_prometheus_adapter "$BIN/prometheus-adapter" ;;
    epp) run_component epp "$GIE_VERSION go=$(go env GOVERSION)" build_epp "$BIN/epp" ;;
    bbr) run_component bbr "$GIE_VERSION go=$(go env GOVERSION)" build_bbr "$BIN/bbr" ;;
    lwepp) run_component lwepp "$GIE_LWEPP_VERSION go=$(go env GOVERSION)" build_lwepp "$BIN/lwepp" ;;
    *) echo "unknown component: $c (known: ${ALL[*]} ${OPTIONAL[*]})" >&2; exit 2 ;;
  esac
done
log "done in $((SECONDS - T0))s; binaries in $BIN"
