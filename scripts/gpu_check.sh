#!/usr/bin/env bash
# The one command for the GPU machine (docs/gpu-accuracy.md): build llama-server with CUDA for sm_90 from the
# trimmed pinned tree, then run scripts/gpu_check.py (plan vs engine vs NVML, gpus, up/health/chat/down).
#
#   scripts/gpu_check.sh OUT_DIR [--cpu] [--binary PATH] [--quick] [--budget-s N] [--configure-only]
#
# Needs .gpu-check/llama.cpp and .gpu-check/wheels (scripts/gpu_check_prepare.py; carried, git-ignored) unless
# --binary is given and the Python already has llamactl's dependencies. Builds into .gpu-check/build-cuda
# (or build-cpu with --cpu). --budget-s: the whole command's seconds (default 540: under 9 minutes); the
# matrix stops starting cases when it runs out. Writes OUT_DIR/{gpu-check.json,gpu-check.md,run.log,
# build.log,nvidia-smi.txt,engine-logs.tar.gz}.
set -uo pipefail

STARTED=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREP="$ROOT/.gpu-check"
PY=${PYTHON:-python3}

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
ARGS_SEEN="${*:2}"
OUT=$1; shift
CPU=0; BINARY=""; QUICK=""; BUDGET=540; CONFIGURE_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --binary) BINARY=$2; shift ;;
        --quick) QUICK=--quick ;;
        --budget-s) BUDGET=$2; shift ;;
        --configure-only) CONFIGURE_ONLY=1 ;;
        -h|--help) usage ;;
        *) echo "unknown option $1" >&2; usage ;;
    esac
    shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
say() { echo "[gpu_check $(( $(date +%s) - STARTED ))s] $*"; }

# --- Python: llamactl from the tree; carried wheels for the dependencies the machine's Python lacks -------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEPS="import click, pydantic, msgspec, httpx, psutil, pynvml, gguf, numpy, prometheus_client, uvicorn, starlette, httptools"
if ! "$PY" -c "$DEPS" 2>/dev/null; then
    if ! ls "$PREP"/wheels/*.whl >/dev/null 2>&1; then
        echo "missing Python packages and no wheels in .gpu-check/wheels: run scripts/gpu_check_prepare.py here first" >&2
        exit 3
    fi
    say "installing $(ls "$PREP"/wheels/*.whl | wc -l) carried wheels into .gpu-check/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PREP/site" \
        "$PREP"/wheels/*.whl || exit 3
    export PYTHONPATH="$PYTHONPATH:$PREP/site"
    "$PY" -c "$DEPS" || { echo "llamactl's dependencies still do not import" >&2; exit 3; }
fi
"$PY" -m llamactl --help >/dev/null || { echo "python -m llamactl does not run" >&2; exit 3; }

# --- build: the flags `llamactl engines install` uses, CUDA for sm_90 only -----------------------------------
if [ -z "$BINARY" ]; then
    [ -f "$PREP/llama.cpp/CMakeLists.txt" ] || {
        echo "no .gpu-check/llama.cpp: run scripts/gpu_check_prepare.py here first and carry it" >&2; exit 3; }
    if [ $CPU = 0 ] && ! command -v nvcc >/dev/null; then
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
        if ! command -v nvcc >/dev/null; then  # a pip-installed toolkit, say
            found=$(find /usr/local /opt -name nvcc -type f -perm -u+x -print -quit 2>/dev/null)
            [ -n "$found" ] && export PATH="$(dirname "$found"):$PATH"
        fi
    fi
    [ $CPU = 1 ] || command -v nvcc >/dev/null || { echo "no nvcc found: cannot build with CUDA" >&2; exit 4; }
    [ $CPU = 1 ] || export CUDACXX="$(command -v nvcc)"
    FLAGS=$("$PY" -c 'from llamactl.engines.install import COMMON_CMAKE_ARGS, SOURCES
print(" ".join(COMMON_CMAKE_ARGS + SOURCES["llama.cpp"].cmake_args))') || exit 3
    if [ $CPU = 1 ]; then
        BUILD="$PREP/build-cpu"; FLAGS="$FLAGS -DGGML_CUDA=OFF"
    else
        BUILD="$PREP/build-cuda"; FLAGS="$FLAGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90"
    fi
    # no network there: never try to fetch the web UI's prebuilt assets
    FLAGS="$FLAGS -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF"
    GEN=""; command -v ninja >/dev/null && [ ! -f "$BUILD/Makefile" ] && GEN="-G Ninja"
    say "configure: cmake $GEN $FLAGS (nvcc: $(command -v nvcc || echo none))"
    T0=$(date +%s)
    # shellcheck disable=SC2086
    cmake -S "$PREP/llama.cpp" -B "$BUILD" $GEN $FLAGS >"$OUT/build.log" 2>&1 || {
        tail -30 "$OUT/build.log"; echo "configure failed (log: build.log)" >&2; exit 4; }
    if [ $CONFIGURE_ONLY = 1 ]; then say "configured $BUILD (--configure-only)"; exit 0; fi
    say "build: llama-server on $(nproc) cores"
    cmake --build "$BUILD" --target llama-server -j "$(nproc)" >>"$OUT/build.log" 2>&1 || {
        tail -40 "$OUT/build.log"; echo "build failed (log: build.log)" >&2; exit 4; }
    export GPU_CHECK_BUILD_S=$(( $(date +%s) - T0 ))
    BINARY="$BUILD/bin/llama-server"
    say "built $BINARY in ${GPU_CHECK_BUILD_S}s"
fi
[ -x "$BINARY" ] || { echo "no llama-server at $BINARY" >&2; exit 3; }
# A CUDA build links libcudart / libcublas dynamically: find them if the loader does not.
if command -v ldd >/dev/null && ldd "$BINARY" | grep -q "not found"; then
    for lib in $(ldd "$BINARY" | awk '/not found/ {print $1}'); do
        dir=$(find /usr/local /opt /usr/lib -name "$lib" -print -quit 2>/dev/null | xargs -r dirname)
        [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldd "$BINARY" | grep "not found" && { echo "llama-server misses libraries (above)" >&2; exit 4; }
fi

if command -v nvidia-smi >/dev/null; then
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    nvidia-smi --query-gpu=index,name,memory.total,memory.free,memory.used,pci.bus_id,uuid,driver_version \
        --format=csv >>"$OUT/nvidia-smi.txt" 2>&1
fi

# --- the matrix and the checks, in what is left of the budget ------------------------------------------------
LEFT=$(( BUDGET - ($(date +%s) - STARTED) - 20 ))
[ "$LEFT" -ge 30 ] || LEFT=30  # the gpus and lifecycle checks still run; the matrix starts no case
say "gpu_check.py with ${LEFT}s left"
MODE=""; [ $CPU = 1 ] && MODE=--cpu
# shellcheck disable=SC2086
"$PY" "$ROOT/scripts/gpu_check.py" --binary "$BINARY" --out "$OUT" --budget-s "$LEFT" $MODE $QUICK \
    --command "scripts/gpu_check.sh OUT_DIR${ARGS_SEEN:+ ${ARGS_SEEN//$HOME/\~}}" 2>&1 | tee "$OUT/run.log"
RC=${PIPESTATUS[0]}
say "done (exit $RC)"
exit "$RC"
