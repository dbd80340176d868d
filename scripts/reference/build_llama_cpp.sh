#!/usr/bin/env bash
# Build llama.cpp (as vendored by the llama-cpp-python sdist) as an independent
# CPU reference implementation. Nothing from llama.cpp is copied into this repo;
# only outputs (fixtures) generated with it are.
#
# Usage: scripts/reference/build_llama_cpp.sh [TARGET_DIR] [LLAMA_CPP_PYTHON_VERSION]
#   TARGET_DIR                 default /work/ref
#   LLAMA_CPP_PYTHON_VERSION   default 0.3.36 (vendors ggml-org/llama.cpp@0c1e57098)
#
# Result:
#   $TARGET_DIR/llama_cpp_python-$VER/               extracted sdist (python package llama_cpp/)
#   $TARGET_DIR/llama_cpp_python-$VER/vendor/llama.cpp   llama.cpp sources
#   $TARGET_DIR/build/bin/                            llama-tokenize, llama-bench, llama-completion,
#                                                     llama-simple, llama-cvector-generator
#                                                     and libllama.so, libggml*.so
# Requirements: python3 + pip, cmake >= 3.14, a C/C++ compiler (gcc/g++), make or ninja.
#   (Debian: apt-get update && apt-get install -y cmake build-essential)
set -euo pipefail

TARGET_DIR="${1:-/work/ref}"
VER="${2:-0.3.36}"
JOBS="${JOBS:-2}"

mkdir -p "$TARGET_DIR"
cd "$TARGET_DIR"

SDIST="llama_cpp_python-${VER}.tar.gz"
if [ ! -f "$SDIST" ]; then
    pip download --no-binary :all: --no-deps "llama-cpp-python==${VER}" -d "$TARGET_DIR"
fi
SRC="$TARGET_DIR/llama_cpp_python-${VER}"
if [ ! -d "$SRC" ]; then
    tar xzf "$SDIST"
fi
LLAMA_SRC="$SRC/vendor/llama.cpp"

cmake -S "$LLAMA_SRC" -B "$TARGET_DIR/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF

# Note: in this llama.cpp version `llama-cli` is only defined when LLAMA_BUILD_SERVER=ON
# (it shares the server/web-UI code); `llama-completion` is the classic text-completion CLI.
nice -n 10 cmake --build "$TARGET_DIR/build" --config Release -j"$JOBS" --target \
    llama llama-tokenize llama-bench llama-completion llama-simple llama-cvector-generator

ls -la "$TARGET_DIR/build/bin"
