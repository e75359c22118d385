#!/usr/bin/env bash
# The GPU measurements (tools/bench_imatrix.py, i.e. `qroar-gguf bench`, with llama.cpp's tools built with CUDA) on a machine that
# has an NVIDIA GPU, nvcc, CMake, ninja and Python 3 with numpy, but no network and none of our cache,
# reached by copying at most ~64 MiB at a time. So the work is packed here and run there in two steps:
#
#   here:  bash tools/gpu_session.sh pack      # .gpu/ (first copy) and .gpu2/ (second copy) from the cache
#   there: bash tools/gpu_session.sh start     # with .gpu/: unpack, start the CUDA build in the background
#   there: bash tools/gpu_session.sh bench     # with .gpu2/: finish the model, measure, results in $OUT
#
# The model (llama.cpp's published Q4_1 GGUF of SmolLM2, from which the checkpoint is rebuilt) is too
# large for one copy and travels in two halves. The CPU build of this machine travels too: Python's
# libllama quantizes with it (the measurements need no CUDA libllama in Python).
# GRID_ARGS is added to the benchmark's options and CUDA_CMAKE_ARGS replaces the CUDA options (a smaller
# run and no CUDA for a rehearsal on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/qroar-gpu
out=${OUT:-tools/results}
cache=${QROAR_CACHE:-$HOME/.cache/qroar-gguf}
model=SmolLM2-135M-Instruct.Q4_1.gguf
# the pinned llama-cpp-python, read where it is written (as tools/setup.sh does)
lcp=$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$/\1/p' qroar_gguf/llama_tools.py)

case ${1:-} in
pack)
    rm -rf .gpu .gpu2 && mkdir -p .gpu/wheels .gpu2
    cp "$cache"/wheels/llama-cpp-python-$lcp-bindings/*.whl .gpu/wheels/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
        gguf==0.19.0 rdata==1.1.0 diskcache==5.6.3
    tar -czf .gpu/austen.tgz -C "$cache" austen
    # llama.cpp's source without its docs, vocabularies and media (the build needs none of them), with
    # patches/ applied here (that machine may have no `patch`)
    tmp=$(mktemp -d) && tar -xzf "$cache"/sdist/llama_cpp_python-$lcp.tar.gz -C "$tmp"
    for p in patches/*.patch; do patch -p1 --forward --batch --silent -d "$tmp"/llama_cpp_python-$lcp/vendor/llama.cpp -i "$PWD/$p"; done
    tar -czf .gpu/llama.cpp-src.tar.gz -C "$tmp" --exclude='*/llama.cpp/models' --exclude='*/llama.cpp/docs' \
        --exclude='*/llama.cpp/media' --exclude='*/llama.cpp/benches' \
        llama_cpp_python-$lcp/vendor/llama.cpp
    rm -rf "$tmp"
    head -c 49000000 "$cache/$model" > .gpu/model.part1
    tail -c +49000001 "$cache/$model" > .gpu2/model.part2
    sha256sum "$cache/$model" | cut -d' ' -f1 > .gpu2/model.sha256
    build=$(PYTHONPATH=. python3 -c 'from qroar_gguf.llama_tools import current_build; print(current_build().bin.parent)')
    tar -cJf .gpu2/cpubin.tar.xz -C "$build" bin
    du -sh .gpu .gpu2
    ;;
start)
    rm -rf "$work" && mkdir -p "$work"/site "$work"/cache "$work"/src "$work"/applied
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work"/site .gpu/wheels/*.whl
    tar -xzf .gpu/austen.tgz -C "$work"/cache
    cp .gpu/model.part1 .gpu/llama.cpp-src.tar.gz "$work"/
    cp -r CMakeLists.txt patches tools "$work"/src/
    setsid nohup bash "$work"/src/tools/gpu_session.sh build >"$work"/build.log 2>&1 </dev/null &
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    python3 -V
    (command -v nvcc || echo /usr/local/cuda/bin/nvcc) && nproc
    ;;
build)  # run by start, in the background; the tools the measurements use, for this GPU only
    export PATH=/usr/local/cuda/bin:$PATH
    begun=$(date +%s)
    if cmake -S "$work"/src -B "$work"/build -G Ninja -DQROAR_LLAMA_SDIST="$work"/llama.cpp-src.tar.gz \
            -DQROAR_PATCHES_DIR="$work"/applied ${CUDA_CMAKE_ARGS:--DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90} &&
        cmake --build "$work"/build --target llama llama-perplexity llama-imatrix llama-quantize -j "$(nproc)"; then
        echo $(($(date +%s) - begun)) >"$work"/build.done
    else
        echo $(($(date +%s) - begun)) >"$work"/build.failed
    fi
    ;;
bench)  # BUDGET: seconds this step may take in all (jobs still running then are cut off)
    end=$(($(date +%s) + ${BUDGET:-540}))
    mkdir -p "$out"
    cat "$work"/model.part1 .gpu2/model.part2 >"$work/cache/$model"
    [ "$(sha256sum "$work/cache/$model" | cut -d' ' -f1)" = "$(cat .gpu2/model.sha256)" ] || { echo "model damaged"; exit 1; }
    mkdir -p "$work"/cpu && tar -xJf .gpu2/cpubin.tar.xz -C "$work"/cpu
    export QROAR_CACHE="$work"/cache PYTHONPATH="$work/site:$PWD" PYTHONUNBUFFERED=1
    # Python runs libllama on the CPU only (quantizing); llama.cpp's own tools run on the GPU
    export LLAMA_CPP_LIB_PATH="$work"/cpu/bin
    # the searched plans first: what a run cut short by its budget keeps
    grid=(--workdir "$work"/grid --scales 4,2 --plans searched,yarn --qtypes Q4_0,Q4_K_M,Q3_K_M
          --attn-types q8_0,f16 --attn-plans searched,yarn --imatrix-tokens 32768 --evaluator llama-perplexity
          --gpu-tools --threads 2 --workers 8)
    while [ ! -e "$work"/build.done ] && [ ! -e "$work"/build.failed ]; do
        pgrep -f "gpu_session.sh build" >/dev/null || [ -e "$work"/build.done ] || [ -e "$work"/build.failed ] ||
            { echo "the CUDA build stopped"; tail -n 20 "$work"/build.log; exit 1; }
        sleep 2
    done
    tail -n 3 "$work"/build.log && cp "$work"/build.log "$out"/cuda_build.log
    [ -e "$work"/build.done ] || exit 1
    echo "CUDA build: $(cat "$work"/build.done) s"
    # no job starts later than a job's length before the end
    QROAR_LLAMA_BIN="$work"/build/bin python3 tools/bench_imatrix.py "${grid[@]}" \
        --deadline $((end - $(date +%s) - ${JOB_SECONDS:-30})) --out "$out"/imatrix_gpu.json ${GRID_ARGS:-}
    # With time left: whether the Python bindings load a model from the CUDA libllama (a backtrace
    # when gdb is there, else Python's fault handler)
    left=$((end - $(date +%s)))
    model=$(find "$work"/grid -name '*.gguf' 2>/dev/null | head -n 1 || true)
    if [ "$left" -gt 40 ] && [ -n "$model" ]; then
        probe=(python3 -X faulthandler -c "import sys; from qroar_gguf.evaluate.runtime import Runtime
with Runtime(sys.argv[1], n_ctx=512, n_gpu_layers=999, threads=2, verbose=True) as rt: print('loaded', rt.tokenize('The pass key')[:8])"
               "$model")
        command -v gdb >/dev/null && probe=(gdb -q -batch -ex 'set print thread-events off' -ex run -ex bt -ex 'info sharedlibrary' --args "${probe[@]}")
        LLAMA_CPP_LIB_PATH="$work"/build/bin timeout $((left > 70 ? 60 : left - 10)) "${probe[@]}" >"$out"/cuda_probe.log 2>&1 ||
            echo "probe exit status $?" >>"$out"/cuda_probe.log
        tail -n 40 "$out"/cuda_probe.log
    fi
    ;;
*)
    echo "usage: $0 pack|start|bench" >&2
    exit 2
    ;;
esac
