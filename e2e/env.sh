# Source me:  . e2e/env.sh
# Puts the e2e toolchain (built by e2e/build.sh) on PATH and points helm at the
# cached plugin dir (helm-diff) so `helmfile apply` works offline.
MODELFIT_CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
MODELFIT_STATE="${MODELFIT_STATE:-/tmp/modelfit-cluster}"
export MODELFIT_CACHE MODELFIT_STATE
case ":$PATH:" in *":$MODELFIT_CACHE/bin:"*) ;; *) export PATH="$MODELFIT_CACHE/bin:$PATH" ;; esac
export HELM_PLUGINS="$MODELFIT_CACHE/helm-plugins"
export HELM_CACHE_HOME="${HELM_CACHE_HOME:-$MODELFIT_CACHE/helm/cache}"
export HELM_CONFIG_HOME="${HELM_CONFIG_HOME:-$MODELFIT_CACHE/helm/config}"
export HELM_DATA_HOME="${HELM_DATA_HOME:-$MODELFIT_CACHE/helm/data}"
# kubeconfig of the cluster started by e2e/cluster.sh (unless already set)
export KUBECONFIG="${MODELFIT_KUBECONFIG:-${KUBECONFIG_OVERRIDE:-$MODELFIT_STATE/kubeconfig}}"
