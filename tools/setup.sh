#!/usr/bin/env bash
# Set up qroar-gguf in ./.venv: the package, its dependencies, llama.cpp's own tools and the Python
# bindings, all running one llama.cpp.
#
#   bash tools/setup.sh          # the tool: everything qroar_gguf/ imports, the demo included
#   bash tools/setup.sh test     # plus the test dependencies
#
# llama.cpp is built once from the source vendored in the pinned llama-cpp-python sdist, portable
# (GGML_NATIVE=OFF: the native build crashes on quantized models on some CPUs), with patches/ applied,
# by CMakeLists.txt (`python -m qroar_gguf.llama_tools build`, the same as `qroar-gguf tools build`).
# The build is cached under $QROAR_CACHE (default ~/.cache/qroar-gguf) by the digests of what goes
# into it; later runs take seconds. The bindings are installed without a library of their own and
# load the build's libllama. Extra CMake options for the build (GPU back-ends) pass through:
#   QROAR_CMAKE_ARGS="-DGGML_CUDA=ON" bash tools/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$/\1/p' qroar_gguf/llama_tools.py)
CACHE=${QROAR_CACHE:-$HOME/.cache/qroar-gguf}
WHEELS="$CACHE/wheels/llama-cpp-python-$VERSION-bindings"
PYTHON=${PYTHON:-python3}
EXTRAS=${1:+[$1]}
read -r -a CMAKE_EXTRA <<< "${QROAR_CMAKE_ARGS:-}"

# A step's own output (pip's, setuptools' editable-install banner) is kept in a log and shown only when
# the step fails; the set-up prints one line per step instead.
LOG=$(mktemp)
TMP_WHEELS=
trap 'rm -f "$LOG"; [ -z "$TMP_WHEELS" ] || rm -rf "$TMP_WHEELS"' EXIT
quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup: failed: $*" >&2
        return 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    quietly "$PYTHON" -m venv .venv
fi
echo "setup: installing pip, CMake and Ninja into .venv"
quietly .venv/bin/python -m pip install --upgrade pip
quietly .venv/bin/python -m pip install "cmake>=3.21" ninja  # to build llama.cpp

# llama.cpp's tools and shared libraries (once: several minutes; cached afterwards)
PYTHONPATH=. .venv/bin/python -m qroar_gguf.llama_tools build "${CMAKE_EXTRA[@]}"

# the bindings without a llama.cpp of their own (seconds), then the build's libllama put beside them
wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "setup: building llama-cpp-python $VERSION's Python bindings (without their own llama.cpp; once)"
    mkdir -p "$WHEELS"
    TMP_WHEELS=$(mktemp -d)
    quietly env CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" .venv/bin/python -m pip wheel --no-deps \
        "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -w "$TMP_WHEELS"
    mv "$TMP_WHEELS"/llama_cpp_python-*.whl "$WHEELS"/
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
echo "setup: installing the Python bindings"
quietly .venv/bin/python -m pip install --no-deps --force-reinstall "$wheel"
quietly env PYTHONPATH=. .venv/bin/python -m qroar_gguf.llama_tools link-bindings "${CMAKE_EXTRA[@]}"
if [ -n "$EXTRAS" ]; then
    echo "setup: installing qroar-gguf and its dependencies, with the $1 extra (minutes the first time)"
else
    echo "setup: installing qroar-gguf and its dependencies"
fi
quietly .venv/bin/python -m pip install -e ".$EXTRAS"
echo "setup: ready ($(.venv/bin/qroar-gguf --version)); llama.cpp's tools: .venv/bin/qroar-gguf tools"
