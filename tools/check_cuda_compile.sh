#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with `nvcc -c` for sm_90 against the installed torch's headers: a syntax / template
# check that runs without a GPU and on the CPU torch wheel (see docs/design.md, 'Triton interpreter and CPU testing').
# Exits non-zero on any compile error.
# Without arguments it also compiles csrc/*.cpp as the CUDA build does (-DWITH_CUDA, host compiler) and checks that
# every mfkernels::cuda_impl function those objects call is defined by the .cu objects (what the link would need).
#
# The CPU wheel ships c10/cuda headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stub
# in a temporary include dir stands in for it (only when the installed torch lacks the file: a CUDA wheel's own wins).
#
# Usage: tools/check_cuda_compile.sh [file.cu ...]     env: NVCC (default: nvcc on PATH), PYTHON (default: python),
#        CUDA_ARCH (default: 90), NVCC_STD (default: c++17 and c++20, both are checked), NVCC_EXTRA (extra flags),
#        CXX (default: g++, for the host-side part)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python}"
arch="${CUDA_ARCH:-90}"
stds="${NVCC_STD:-c++17 c++20}"

if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
torch_include="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
if [ ! -d "$torch_include/c10/cuda" ]; then
  echo "check_cuda_compile: $torch_include has no c10/cuda headers" >&2
  exit 2
fi

host_check=0
if [ "$#" -gt 0 ]; then
  sources=("$@")
else
  host_check=1
  shopt -s nullglob
  sources=("$here"/csrc/cuda/*.cu)
  shopt -u nullglob
fi
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files to check" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stub=()
if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$work/stub/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
  stub=(-I "$work/stub")
fi

# The flags torch.utils.cpp_extension gives nvcc for a CUDA extension (the half/bfloat16 operator guards matter:
# they are what the JIT build on the GPU machine compiles with).
flags=(
  -c -O3 -Xcompiler -fPIC
  -gencode "arch=compute_${arch},code=sm_${arch}"
  -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" "${stub[@]}"
  -DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Werror all-warnings
)
# shellcheck disable=SC2206
extra=(${NVCC_EXTRA:-})

status=0
for src in "${sources[@]}"; do
  for std in $stds; do
    obj="$work/$(basename "$src").$std.o"
    if "$nvcc" "${flags[@]}" "${extra[@]}" -std="$std" "$src" -o "$obj"; then
      echo "ok    $src (sm_$arch, -std=$std)"
    else
      echo "FAIL  $src (sm_$arch, -std=$std)" >&2
      status=1
    fi
  done
done

if [ "$host_check" = 1 ] && [ "$status" = 0 ]; then
  cxx="${CXX:-g++}"
  first_std="${stds%% *}"
  for cpp in "$here"/csrc/*.cpp; do
    obj="$work/$(basename "$cpp").o"
    if "$cxx" -c -O1 -fPIC -std="$first_std" -DWITH_CUDA -isystem "$torch_include" \
        -isystem "$torch_include/torch/csrc/api/include" "$cpp" -o "$obj"; then
      echo "ok    $cpp (host, -DWITH_CUDA, -std=$first_std)"
    else
      echo "FAIL  $cpp (host, -DWITH_CUDA)" >&2
      status=1
    fi
  done
  if [ "$status" = 0 ]; then
    needed="$(nm -C --undefined-only "$work"/*.cpp.o | sed -n 's/^ *U \(mfkernels::cuda_impl::.*\)$/\1/p' | sort -u)"
    defined="$(nm -C --defined-only "$work"/*."$first_std".o | sed -n 's/^[0-9a-f]* T \(mfkernels::cuda_impl::.*\)$/\1/p' | sort -u)"
    missing="$(comm -23 <(echo "$needed") <(echo "$defined") | sed '/^$/d')"
    if [ -n "$missing" ]; then
      echo "FAIL  csrc/*.cpp call CUDA entry points that no .cu defines:" >&2
      echo "$missing" >&2
      status=1
    else
      echo "ok    every CUDA entry point the C++ calls is defined ($(echo "$needed" | sed '/^$/d' | wc -l))"
    fi
  fi
fi
exit $status
