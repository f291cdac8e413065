#!/usr/bin/env bash
# The compile and host-overhead GPU rows in one call:   bash bench/gpu_compile.sh OUTDIR
#
# bf16, MeanFlow ratio 0.25, fused backend, torch.compile(fullgraph=True), each stage in its own process with its own
# time limit (seconds), most important first, each writing its JSON as it goes (rows not reached are marked):
#   eager_b2       eager fused vs eager flow matching, DiT-B/2 batch 64, guidance off / on    -> OUT/step_eager_b2.json
#   compiled_b2    compiled fused vs compiled flow matching vs compiled explicit, DiT-B/2 b64,
#                  guidance off / on                                                         -> OUT/step_compiled_b2.json
#   compiled_xl2   compiled fused vs compiled flow matching, DiT-XL/2 batch 32, guidance off / on
#                                                                                             -> OUT/step_compiled_xl2.json
#   fsdp           FSDP2 world size 1 on the card, each block compiled then sharded: fused vs flow matching,
#                  DiT-B/2 batch 64, guidance off / on                                       -> OUT/fsdp_ws1.json
#   host           launches per block, host us per op, host time per step (eager / graphed)  -> OUT/host.json
# The default limits sum to 780 s (SUITE-style: GPU_COMPILE_LIMIT_<STAGE>=seconds, GPU_COMPILE_SKIP="a b"), so the run
# ends within ~13.5 minutes on one H100 / H200. A device command may last 10 minutes: run it as two calls,
#   GPU_COMPILE_SKIP="fsdp host compiled_xl2" bash bench/gpu_compile.sh OUT          (eager_b2, compiled_b2: ~6 min)
#   GPU_COMPILE_SKIP="eager_b2 compiled_b2" bash bench/gpu_compile.sh OUT            (compiled_xl2, fsdp, host)
# Inductor's compile cache (TORCHINDUCTOR_CACHE_DIR, default OUT/inductor_cache) is shared by the stages and by a
# second call. Without CUDA it is a dry run: Triton interpreter, tiny sizes, Dynamo's eager backend (CI-sized).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: bash bench/gpu_compile.sh OUTDIR}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$out/inductor_cache}"
export TORCHINDUCTOR_AUTOGRAD_CACHE=0  # keyed on the Dynamo graph only: a stale custom-op backward could replay
cd "$repo"

if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" = 1 ]; then
  device=cuda
  common="--no-fd --no-error --fullgraph --ratio 0.25"
  b2="--models DiT-B/2:64"
  xl2="--models DiT-XL/2:32"
  compile_backend=inductor
  quick=""
else
  device=cpu
  export TRITON_INTERPRET=1
  common="--no-fd --no-error --fullgraph --ratio 0.25 --threads 1"
  b2="--models DiT-Micro/2"
  xl2="--models DiT-Micro/2"
  compile_backend=eager
  quick="--quick"
fi
failed=()
start=$(date +%s)

stage() {  # stage NAME DEFAULT_LIMIT CMD...
  local name=$1 limit=$2 var rc t0
  shift 2
  var="GPU_COMPILE_LIMIT_${name^^}"
  limit="${!var:-$limit}"
  if [[ " ${GPU_COMPILE_SKIP:-} " == *" $name "* ]]; then echo "=== $name: skipped"; return; fi
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  [ "$rc" = 0 ] || failed+=("$name($rc)")
}

# shellcheck disable=SC2086
stage eager_b2 120 "$PY" bench/bench_step.py --out "$out/step_eager_b2.json" $b2 --modes eager --backends fused \
  --guidance off on $common $quick
# shellcheck disable=SC2086
stage compiled_b2 240 "$PY" bench/bench_step.py --out "$out/step_compiled_b2.json" $b2 --modes compiled \
  --backends fused explicit --guidance off on --compile-backend "$compile_backend" $common $quick
# shellcheck disable=SC2086
stage compiled_xl2 240 "$PY" bench/bench_step.py --out "$out/step_compiled_xl2.json" $xl2 --modes compiled \
  --backends fused --guidance off on --compile-backend "$compile_backend" $common $quick
# shellcheck disable=SC2086
stage fsdp 120 "$PY" bench/bench_host.py --parts fsdp --fsdp-modes compiled --fsdp-model DiT-B/2 --fsdp-batch 64 \
  --compile-backend "$compile_backend" --out "$out/fsdp_ws1.json" $quick
# shellcheck disable=SC2086
stage host 60 "$PY" bench/bench_host.py --out "$out/host.json" $quick

"$PY" -m bench.common stamp "$out"/*.json >/dev/null 2>&1 || echo "stamping the result files failed"
echo "gpu_compile finished in $(( $(date +%s) - start ))s on $device; results in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "stages with a non-zero exit: ${failed[*]}"
  exit 1
fi
