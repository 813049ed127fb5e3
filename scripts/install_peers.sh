#!/usr/bin/env bash
# Installs the `peers` extra for scripts/peer_llm.py (never needed by the tests):
#
#     flock /tmp/compress-heavy.lock scripts/install_peers.sh    # compiles llama.cpp: ~10-20 min on 2 cores
#
# 1. llama-cpp-python from its sdist with ggml's AMX kernels OFF. The default build uses -march=native, which
#    on a CPU with AMX-INT8/BF16 compiles ggml's AMX matmul path, and that path segfaults on multi-token
#    evaluations (a 512-token window with logits for every position). GGML_AMX_*=OFF alone is not enough:
#    with GGML_NATIVE=ON, -march=native defines __AMX_INT8__ whatever GGML_AMX_INT8 says (see
#    vendor/llama.cpp/ggml/src/ggml-cpu/CMakeLists.txt), so native is off and each ISA extension ggml has an
#    option for is turned on only when /proc/cpuinfo lists it (`isa_flags`). A fixed list is wrong on another
#    CPU: AVX-VNNI (the VEX form) named on an AMD EPYC that has only AVX512-VNNI made Q8_0 die with SIGILL.
#    A llama-cpp-python already installed is uninstalled first, so that a re-run rebuilds it.
# 2. llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) copied from the same
#    sdist to $LLAMA_CPP_SRC, where peer_llm.py finds it: the GGUF rows are written by llama.cpp's own tool.
# (-DLLAVA_BUILD=OFF: the multimodal library is not needed here and is imported lazily by llama_cpp.)
# 3. openvino + nncf only with WITH_OPENVINO=1 (no OpenVINO row in peer_llm.py yet).
#
# `install_peers.sh --print-isa-flags` prints the ISA options only (CPUINFO: a cpuinfo file other than
# /proc/cpuinfo) and installs nothing.
# Environment: PY (python of the venv), LLAMA_CPP_VERSION, LLAMA_CPP_SDIST (a downloaded sdist .tar.gz to
# use instead of downloading), LLAMA_CPP_SRC (where the converter goes).
set -euo pipefail
isa_flags() {  # "-DGGML_X=ON|OFF" for each ggml ISA option, ON when every cpuinfo flag it needs is listed
  local have opt need f on
  have=" $(grep -m1 '^flags' "${CPUINFO:-/proc/cpuinfo}" | cut -d: -f2) "
  for pair in SSE42:sse4_2 AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni \
      AVX512:avx512f,avx512cd,avx512vl,avx512dq,avx512bw AVX512_VBMI:avx512vbmi AVX512_VNNI:avx512_vnni \
      AVX512_BF16:avx512_bf16; do
    opt="${pair%%:*}" need="${pair#*:}" on=ON
    for f in ${need//,/ }; do [[ "$have" == *" $f "* ]] || on=OFF; done
    printf -- "-DGGML_%s=%s " "$opt" "$on"
  done
}
if [ "${1:-}" = --print-isa-flags ]; then isa_flags; echo; exit 0; fi  # what this CPU gets (tests read it)
PY="${PY:-/work/main/.venv/bin/python}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
SRC="${LLAMA_CPP_SRC:-$(dirname "$(dirname "$PY")")/src/llama.cpp-$VERSION}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SDIST="${LLAMA_CPP_SDIST:-}"
if [ -z "$SDIST" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
  SDIST="$(ls "$WORK"/llama_cpp_python-*.tar.gz)"
fi

export CMAKE_ARGS="-DGGML_NATIVE=OFF $(isa_flags)-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAVA_BUILD=OFF"
echo "CMAKE_ARGS=$CMAKE_ARGS"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$PY" -m pip uninstall -y llama-cpp-python >/dev/null 2>&1 || true
"$PY" -m pip install --no-binary llama-cpp-python --no-cache-dir --verbose "$SDIST"
"$PY" -m pip install sentencepiece  # convert_hf_to_gguf.py imports it before it looks for a tokenizer.model

top="$(basename "$SDIST" .tar.gz)"  # the sdist's top folder (not `tar -t | head`: SIGPIPE under pipefail)
tar -xzf "$SDIST" -C "$WORK" "$top/vendor/llama.cpp/convert_hf_to_gguf.py" "$top/vendor/llama.cpp/conversion" \
  "$top/vendor/llama.cpp/gguf-py"
rm -rf "$SRC" && mkdir -p "$(dirname "$SRC")" && mv "$WORK/$top/vendor/llama.cpp" "$SRC"
echo "llama.cpp converter in $SRC"

if [ "${WITH_OPENVINO:-0}" = 1 ]; then "$PY" -m pip install openvino nncf; fi
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
