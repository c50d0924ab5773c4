#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) once per machine, in its
# own virtual environment outside the repository, for the remote-provider tests and benchmarks.
#
# Why here and not in the test venv:
# - it compiles llama.cpp (~10-15 minutes on 2 cores); a per-machine build survives fresh clones
#   and `make clean`, and several clones share it;
# - the build is PORTABLE (-DGGML_NATIVE=OFF: AVX2/FMA/F16C, no -march=native). The default build
#   tunes for the building CPU and died with a general protection fault in libggml-cpu.so on its
#   first completion on a machine of this kind; pip's wheel cache could also hand back such a
#   native wheel built earlier, so the wheel is always built from source here (--no-binary,
#   --no-cache-dir);
# - its web stack (fastapi, starlette, sse-starlette, uvicorn, ...) is pinned by
#   .ci/llama-server-constraints.txt and cannot disturb the test venv's pins.
#
# Usage: .ci/build-llama-server.sh [DIR]   (default: $KERNEL_EXT_LLAMA_HOME or
#        ${XDG_CACHE_HOME:-~/.cache}/kernel_ext/llama-server-<version>-portable)
# Prints the server's Python interpreter on success. Idempotent: a finished build whose stamp
# matches the constraints file is reused at once.
set -euo pipefail
cd "$(dirname "$0")/.."

CONSTRAINTS=.ci/llama-server-constraints.txt
VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==//p' "$CONSTRAINTS")
DEFAULT_HOME="${XDG_CACHE_HOME:-$HOME/.cache}/kernel_ext/llama-server-${VERSION}-portable"
HOME_DIR="${1:-${KERNEL_EXT_LLAMA_HOME:-$DEFAULT_HOME}}"
PY="${PY:-python3}"
STAMP="$HOME_DIR/.built-$(sha256sum "$CONSTRAINTS" | cut -c1-16)"

mkdir -p "$(dirname "$HOME_DIR")"
exec 9>"$HOME_DIR.lock"
flock 9  # two clones building at once: the second waits and reuses the first's build

if [ -f "$STAMP" ] && "$HOME_DIR/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "$HOME_DIR/bin/python"
    exit 0
fi

echo "building llama.cpp's server (llama-cpp-python $VERSION, portable) into $HOME_DIR;" \
     "this compiles llama.cpp once per machine (~10-15 minutes on 2 cores)" >&2
start=$(date +%s)
rm -rf "$HOME_DIR"
"$PY" -m venv "$HOME_DIR"
"$HOME_DIR/bin/python" -m pip install -q -c "$CONSTRAINTS" pip
CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$HOME_DIR/bin/python" -m pip install -q --no-cache-dir --no-binary llama-cpp-python \
    -c "$CONSTRAINTS" "llama-cpp-python[server]==$VERSION" >&2
"$HOME_DIR/bin/python" -c "import llama_cpp.server" >&2
touch "$STAMP"
echo "llama.cpp server built in $(( $(date +%s) - start )) s" >&2
echo "$HOME_DIR/bin/python"
