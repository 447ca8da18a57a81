#!/usr/bin/env bash
# Copy the generated CRD (crds/, from `modelfit crd`) into the operator chart, which
# must carry a byte-identical copy (tests/test_chart.py::test_crd_copy_identical).
#
#   charts/sync-crd.sh           copy
#   charts/sync-crd.sh --check   exit 1 when the chart's copy differs
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/crds/modelfit.io_modeldeployments.yaml"
dst="$root/charts/modelfit/crds/modelfit.io_modeldeployments.yaml"
[[ -f "$src" ]] || { echo "sync-crd: $src is missing (generate it first)" >&2; exit 1; }
if [[ "${1:-}" == "--check" ]]; then
  if cmp -s "$src" "$dst"; then echo "sync-crd: chart CRD is up to date"; exit 0; fi
  echo "sync-crd: $dst differs from $src; run charts/sync-crd.sh" >&2
  exit 1
fi
mkdir -p "$(dirname "$dst")"
cp "$src" "$dst"
echo "sync-crd: copied $src -> $dst"
