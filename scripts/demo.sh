#!/usr/bin/env bash
# The main job: a real local control plane (etcd, kube-apiserver, controller-manager,
# scheduler, kwok) on 127.0.0.1, the modelfit operator, and the seed's ModelDeployment
# (Qwen3.5 0.8B at Q4_0 on CPU nodes). Shows the plan the operator chose.
#
#   bash scripts/demo.sh          # build (cached), start, apply, show; leaves it running
#   bash scripts/demo.sh down     # stop the operator and the control plane
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export MODELFIT_CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
STATE="${MODELFIT_STATE:-/tmp/modelfit-cluster}"
OPLOG="$STATE/operator.log"

if [[ "${1:-up}" == "down" ]]; then
  [[ -f "$STATE/operator.pid" ]] && kill "$(cat "$STATE/operator.pid")" 2>/dev/null || true
  bash e2e/cluster.sh down
  exit 0
fi

say() { printf '\n==> %s\n' "$*"; }

say "python package"
if ! python3 -c "import modelfit.handlers" 2>/dev/null; then
  python3 -m pip install -q -e .
fi

say "control plane binaries (built once from Go modules, cached in $MODELFIT_CACHE)"
bash e2e/build.sh
source e2e/env.sh

say "control plane on 127.0.0.1"
bash e2e/cluster.sh up
export KUBECONFIG="$STATE/kubeconfig"

say "simulated nodes (kwok): two CPU nodes of different sizes"
for spec in "cpu-small 2 4Gi" "cpu-large 16 64Gi"; do
  set -- $spec
  kubectl apply -f - >/dev/null <<NODE
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations: {kwok.x-k8s.io/node: fake}
  labels:
    type: kwok
    kubernetes.io/hostname: $1
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    node.kubernetes.io/instance-type: $1
    feature.node.kubernetes.io/cpu-cpuid.AVX2: "true"
spec: {}
status:
  allocatable: {cpu: "$2", memory: $3, pods: "110"}
  capacity: {cpu: "$2", memory: $3, pods: "110"}
NODE
done

say "CRD and operator"
kubectl apply -f crds/modelfit.io_modeldeployments.yaml >/dev/null
kubectl wait --for=condition=Established crd/modeldeployments.modelfit.io --timeout=60s >/dev/null
if [[ -f "$STATE/operator.pid" ]] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; then
  echo "operator already running (pid $(cat "$STATE/operator.pid"))"
else
  nohup modelfit run --all-namespaces --log-format plain --liveness "" --metrics-port 0 >"$OPLOG" 2>&1 &
  echo $! >"$STATE/operator.pid"
  echo "operator pid $(cat "$STATE/operator.pid"), log $OPLOG"
fi

say "the seed's ModelDeployment"
kubectl apply -f examples/qwen3.5-0.8b-q4_0-cpu.yaml
for _ in $(seq 1 90); do
  ready=$(kubectl get modeldeployment qwen3-5-0-8b -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
  [[ "$ready" == "True" ]] && break
  sleep 2
done

say "kubectl get modeldeployments -o wide"
kubectl get modeldeployments -o wide
say "the plan"
kubectl get modeldeployment qwen3-5-0-8b -o jsonpath='{.status.plan}' | python3 -m json.tool | head -60
say "children"
kubectl get deployments,services,pods -o wide
echo
echo "Stop everything with: bash scripts/demo.sh down"
[[ "$ready" == "True" ]]
