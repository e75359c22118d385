#!/usr/bin/env bash
# Set up qroar-gguf in ./.venv: the package, its dependencies, and llama-cpp-python built portable.
#
#   bash tools/setup.sh          # the tool: everything qroar_gguf/ imports, the demo included
#   bash tools/setup.sh test     # plus the test dependencies
#
# llama-cpp-python is source-only on PyPI and its default (native) build crashes on quantized models
# on some CPUs (AMX code path), so we build it once with GGML_NATIVE=OFF and cache the wheel under
# $QROAR_CACHE (default ~/.cache/qroar-gguf): later runs install it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE=${QROAR_CACHE:-$HOME/.cache/qroar-gguf}
WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-portable"
PYTHON=${PYTHON:-python3}
EXTRAS=${1:+[$1]}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "setup: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION portable (once, about 3-5 minutes)"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" .venv/bin/python -m pip wheel -q --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$tmp"
    mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/
    rm -rf "$tmp"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -n 1)
fi
.venv/bin/python -m pip install -q "$wheel"
.venv/bin/python -m pip install -q -e ".$EXTRAS"
echo "setup: ready ($(.venv/bin/qroar-gguf --version))"
