#!/usr/bin/env bash
# The main job: a real local control plane (etcd, kube-apiserver, controller-manager,
# scheduler, kwok) on 127.0.0.1, one real node (kubelet + containerd + runc, e2e/node.sh),
# the modelfit operator, and the seed's ModelDeployment (Qwen3.5 0.8B at Q4_0 on CPU nodes).
# Shows the plan the operator chose, then a real answer: the same model shape (generated
# weights: no downloads here) served by the operator on the real node, asked a question.
#
#   bash scripts/demo.sh          # build (cached), start, apply, show; leaves it running
#   bash scripts/demo.sh down     # stop the operator and the control plane
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}"  # modelfit_dev (the model generator) is not installed
export MODELFIT_CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
STATE="${MODELFIT_STATE:-/tmp/modelfit-cluster}"
OPLOG="$STATE/operator.log"

if [[ "${1:-up}" == "down" ]]; then
  for p in operator modelserver; do
    [[ -f "$STATE/$p.pid" ]] && kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true
  done
  bash e2e/cluster.sh down   # takes the real node down first
  exit 0
fi

T0=$(date +%s)
# How long the one-time builds take on a fresh 2-core machine of this kind (measured; see the README).
K8S_USUAL="15-20 minutes"  # k8s 967 s, etcd 64 s, kwok 191 s measured beside other builds
LLAMA_USUAL="11-19 minutes"  # 658 s alone, 1123 s beside other builds
say() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# long WHAT USUAL LOG CMD...: a long build, run with a line every 30 s saying how long it has run, how long it
# usually takes on a 2-core machine, and how far it is (ninja's [n/m] or the build's last log line). Cached
# builds return at once and say so.
long() {
  local what=$1 usual=$2 log=$3; shift 3
  mkdir -p "$(dirname "$log")"
  "$@" >"$log" 2>&1 &
  local pid=$! start=$SECONDS next=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS >= next)); then
      next=$((SECONDS + 30))
      local where
      where=$(grep -ho '^\[[0-9]*/[0-9]*\]' "$log" "${LONG_PROGRESS:-/dev/null}" 2>/dev/null | tail -1 || true)
      [[ -n "$where" ]] && where="step ${where//[\[\]]/} of the compile" || where=$(tail -1 "$log" | cut -c1-100)
      printf '    %s: %ss so far (usually %s on 2 cores, once; cached after): %s\n' \
        "$what" "$((SECONDS - start))" "$usual" "$where"
    fi
  done
  if ! wait "$pid"; then
    tail -30 "$log"
    return 1
  fi
  if ((SECONDS - start < 5)); then echo "    $what: cached"; else echo "    $what: done in $((SECONDS - start))s"; fi
}

say "python package"
if ! python3 -c "import modelfit.handlers" 2>/dev/null; then
  python3 -m pip install -q -e .
fi

say "the seed case, planned before any cluster exists (modelfit plan reads the model's shape, no weights)"
python3 -m modelfit.cli plan qwen3.5-0.8b --quant q4_0 --node cpu --context 262144
say "the same seed, as the operator will plan it (modelfit plan -f examples/qwen3.5-0.8b-q4_0-cpu.yaml)"
python3 -m modelfit.cli plan -f examples/qwen3.5-0.8b-q4_0-cpu.yaml --node cpu-small --node cpu-large
echo
echo "Next, once per machine: Kubernetes and llama.cpp are compiled from source (nothing prebuilt can be"
echo "downloaded here), about 30 minutes on 2 cores in all; every later run reuses the cache in $MODELFIT_CACHE."

say "Debian packages (only the missing ones; the real node needs root)"
bash scripts/install-deps.sh || echo "continuing without them: no real node"

LOGS="$MODELFIT_CACHE/logs"
say "control plane binaries (etcd, kube-apiserver, controller-manager, scheduler, kubelet, kwok from Go modules)"
long "Kubernetes, etcd and kwok" "$K8S_USUAL" "$LOGS/build-k8s.log" bash e2e/build.sh k8s etcd kwok
source e2e/env.sh
REAL=0
if [[ $(id -u) == 0 ]] && command -v containerd >/dev/null && command -v runc >/dev/null; then REAL=1; fi
if ((REAL)); then
  say "llama-server (llama.cpp's CPU build, the binary the memory model is calibrated on) and the node's images"
  LONG_PROGRESS="$MODELFIT_CACHE/llama/11434.0.0/build.log" \
    long "llama.cpp" "$LLAMA_USUAL" "$LOGS/build-llama.log" bash scripts/build-llama-server.sh
  long "node images (pause, curl, llama-server)" "1 minute" "$LOGS/images.log" \
    bash e2e/images.sh "$MODELFIT_CACHE/images" pause curl llama
else
  echo "no real node here (needs root, containerd and runc: apt-get install containerd runc containernetworking-plugins umoci skopeo busybox-static)"
fi

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

if ((REAL)); then
  say "one real node (kubelet + containerd + runc)"
  # tainted: only ModelDeployments that tolerate it (the real-answer one below) run real pods
  NODE_TAINT=modelfit.io/real-node=true:NoSchedule bash e2e/node.sh up
fi

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
# (no `| head`: with pipefail a writer cut short by SIGPIPE would end the script)
kubectl get modeldeployment qwen3-5-0-8b -o jsonpath='{.status.plan}' >"$STATE/plan.json"
python3 - "$STATE/plan.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
keys = ("model", "quant", "nodeClass", "backend", "context", "kvCacheType", "loadMode", "threads",
        "cacheRamMib", "memoryRequest", "factsSource")
for k in keys:
    print(f"{k:>14}: {p.get(k)}")
print(f"{'args':>14}: llama-server {' '.join(p.get('args', []))}")
for r in p.get("reasons", []):
    print(f"{'reason':>14}: {r}")
PY
say "children"
kubectl get deployments,services,pods -o wide
[[ "$ready" == "True" ]] || { echo "the seed ModelDeployment did not become Ready; operator log: $OPLOG"; exit 1; }

if ((REAL)); then
  say "a real answer: the seed's model shape served by the operator on the real node"
  model=$(python3 -m modelfit_dev.synth qwen35-0.8b --quant Q4_0)
  mkdir -p "$STATE/models" && ln -sf "$model" "$STATE/models/Qwen3.5-0.8B-Q4_0.gguf"
  if ! [[ -f "$STATE/modelserver.pid" ]] || ! kill -0 "$(cat "$STATE/modelserver.pid")" 2>/dev/null; then
    # the harness's own bridge address: pods reach it, nothing leaves the machine
    nohup python3 -m http.server 18080 --bind 10.88.0.1 --directory "$STATE/models" >"$STATE/modelserver.log" 2>&1 &
    echo $! >"$STATE/modelserver.pid"
  fi
  for _ in $(seq 1 50); do
    curl -sf --noproxy '*' -r 0-0 -o /dev/null http://10.88.0.1:18080/Qwen3.5-0.8B-Q4_0.gguf && break
    sleep 0.2
  done
  kubectl apply -f - <<MD
apiVersion: modelfit.io/v1alpha1
kind: ModelDeployment
metadata:
  name: qwen3-5-0-8b-real
spec:
  model:
    url: http://10.88.0.1:18080/Qwen3.5-0.8B-Q4_0.gguf
  context: 8192
  nodeSelector:
    kubernetes.io/hostname: real-0
  tolerations:
    - {key: modelfit.io/real-node, operator: Exists, effect: NoSchedule}
MD
  for _ in $(seq 1 60); do
    ready=$(kubectl get modeldeployment qwen3-5-0-8b-real -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
    [[ "$ready" == "True" ]] && break
    sleep 2
  done
  kubectl get modeldeployment qwen3-5-0-8b-real -o wide
  ip=$(kubectl get pods -l app.kubernetes.io/instance=qwen3-5-0-8b-real -o jsonpath='{.items[0].status.podIP}')
  prompt="What is the capital of France?"
  echo "prompt: $prompt"
  curl -sS --noproxy '*' "http://$ip:8080/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}],\"max_tokens\":24}" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("completion:", repr(r["choices"][0]["message"]["content"])); print("tokens:", r["usage"]); print("speed:", r.get("timings", {}).get("predicted_per_second"), "tokens/s")'
  echo "(random weights of the real architecture and shapes: the words are noise, the memory and speed are real)"
  [[ "$ready" == "True" ]] || exit 1
fi
echo
echo "Done in $(( $(date +%s) - T0 ))s. Stop everything with: bash scripts/demo.sh down"
