#!/usr/bin/env bash
# Debian packages the builds and the real node need, installed only when missing (as root).
# Used by .ci/run and scripts/demo.sh. The real node needs containerd, runc (crun fails on this
# hybrid cgroup layout) and the CNI plugins; umoci/skopeo/busybox-static/mmdebstrap build its images.
set -euo pipefail
declare -A pkg_of=(
  [go]=golang-go [cmake]=cmake [ninja]=ninja-build [g++]=g++ [openssl]=openssl [curl]=curl
  [containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [umoci]=umoci [skopeo]=skopeo [busybox]=busybox-static [mmdebstrap]=mmdebstrap
)
pkgs=()
for cmd in "${!pkg_of[@]}"; do
  if [[ $cmd == /* ]]; then [[ -x $cmd ]] || pkgs+=("${pkg_of[$cmd]}")
  else command -v "$cmd" >/dev/null || pkgs+=("${pkg_of[$cmd]}"); fi
done
((${#pkgs[@]})) || exit 0
if [[ $(id -u) != 0 ]]; then
  echo "missing Debian packages (install them as root): ${pkgs[*]}" >&2
  exit 1
fi
echo "installing: ${pkgs[*]}" >&2
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
