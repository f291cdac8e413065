#!/usr/bin/env bash
# The one command for a lent GPU:   bash bench/gpu_suite.sh OUTDIR [--quick]
#
# Works from a plain checkout or a copied tree (PYTHONPATH, no pip install; the native op is JIT-built with ninja),
# with no internet. Without .git (a copied tree) pass the commit: MF_SOURCE_COMMIT=<sha> bash bench/gpu_suite.sh OUT;
# every result file also records a digest of the source files, which `python -m bench.common digest --commit <sha>`
# checks against the commit later (bench/report.py does it).
#
# Stages in order of importance, each in its own process with its own time limit (seconds), none stopping the next:
#   env             provenance: commit, versions, GPU, nvidia-smi clocks                    -> OUTDIR/env.json
#   native          JIT build of the C++/CUDA extension
#   tests           the `gpu`-marked tests on CUDA, autotuning off (one config each)        -> OUTDIR/gpu_tests.log
#   step            training steps at the README's shapes (DiT-B/2 b64, DiT-XL/2 b32 and b64): flow matching,
#                   autograd, explicit, fused, finite difference; eager and graphed; tangent errors -> OUTDIR/step.json
#   step_graphed_autograd  autograd under CUDA graphs, DiT-B/2 b64, its own process  -> OUTDIR/step_run_graphed_autograd.json
#   tests_autotune  the kernels at the benchmarks' shapes with MFKERNELS_AUTOTUNE=1 (the configs the benchmarks
#                   run), against references                                       -> OUTDIR/gpu_tests_autotune.log
#   attention       fused forward+JVP / backward vs SDPA backends and math JVP          -> OUTDIR/attention.json
#   host            (helper stage) host overhead, eager / compiled / graphed            -> OUTDIR/host.json
#   step_compiled   the step rows under torch.compile (DiT-B/2 b64)                 -> OUTDIR/step_run_compiled.json
#   target          native target/loss op vs the eager chain, a copy and a read        -> OUTDIR/target.json
# Not run unless named in SUITE_EXTRA="block_ops block profile" (they do not fit in a 15-minute allowance with the above):
#   block_ops, block, profile (host overhead per op, forward passes, torch.profiler tables)
#
# Time: the default limits sum to 680 s and SUITE_BUDGET (default 700 s) caps the whole run: a stage never gets more
# than what is left, so the suite ends within ~12 minutes on one H100 / H200 whatever happens, leaving room for the
# machine's start in a 15-minute device allowance. A device command may last 10 minutes at most: run it as two calls,
# SUITE_ONLY="env native tests step step_graphed_autograd", then SUITE_ONLY="tests_autotune attention host
# step_compiled target", each with its own SUITE_BUDGET (bench/NOTES.md: the exact commands, measured stage times). Every benchmark writes
# its JSON as it goes (rows not reached are marked so), so a stage cut short keeps what it measured. At the end every
# JSON is stamped with this checkout's provenance if it has none.
# Without CUDA the suite runs the benchmark stages in Triton interpreter mode at tiny sizes: a dry run on CPU that CI
# does (the test stages are skipped there: the ordinary test suite runs the same tests on CPU).
# Knobs: SUITE_LIMIT_<STAGE>=seconds, SUITE_ONLY="a b", SUITE_SKIP="a b", SUITE_EXTRA="block_ops block profile tvm",
# SUITE_BUDGET=seconds, SUITE_STEP_ARGS, SUITE_COMPILED_ARGS, SUITE_ATTENTION_ARGS, SUITE_TEST_ARGS, SUITE_TEST_WORKERS.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: bash bench/gpu_suite.sh OUTDIR [--quick]}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
quick="${2:-}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo"

if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" = 1 ]; then
  device=cuda
else
  device=cpu
  export TRITON_INTERPRET=1
  quick=--quick
fi
budget="${SUITE_BUDGET:-700}"
slow=1  # the CPU dry run on a shared 2-core machine: twice every stage limit (the budget is not the constraint there)
[ "$device" = cpu ] && slow=2
export SUITE_BUDGET="$budget" SUITE_COMMAND="bash bench/gpu_suite.sh $*"  # recorded in every result file's meta
suite_start=$(date +%s)
failed=()
timings=()

stage() {  # stage NAME DEFAULT_LIMIT CMD...   (the limit is clipped to what is left of SUITE_BUDGET)
  local name=$1 limit=$2 var rc t0 left
  shift 2
  var="SUITE_LIMIT_${name^^}"
  limit="${!var:-$(( limit * slow ))}"
  if [[ " ${SUITE_SKIP:-} " == *" $name "* ]]; then echo "=== $name: skipped (SUITE_SKIP)"; return; fi
  if [ -n "${SUITE_ONLY:-}" ] && [[ " $SUITE_ONLY " != *" $name "* ]]; then echo "=== $name: not in SUITE_ONLY"; return; fi
  left=$(( budget - ($(date +%s) - suite_start) - 20 ))  # 20 s kept for the stamp at the end
  if [ "$left" -lt 10 ]; then
    echo "=== $name: not run, the suite's budget of ${budget}s is spent"
    failed+=("$name(no time)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  timings+=("$name $(( $(date +%s) - t0 ))s")
  [ "$rc" = 0 ] || failed+=("$name($rc)")
}

stage env 15 "$PY" -c "import json, os
from bench.common import run_metadata
meta = run_metadata('$device')
meta['command'] = os.environ['SUITE_COMMAND']
json.dump(meta, open('$out/env.json', 'w'), indent=1, default=str)
print({k: meta.get(k) for k in ('commit', 'dirty', 'source_digest', 'device', 'torch', 'triton', 'cuda', 'cudnn')})
print('nvidia-smi:', (meta.get('gpu') or {}).get('nvidia_smi'))
if not meta.get('commit'):
    print('WARNING: commit unknown (no .git here): rerun with MF_SOURCE_COMMIT=<sha>; the source digest is recorded')
"

stage native 45 "$PY" - <<'PY'
import torch
import mfkernels.target as target
device = "cuda" if torch.cuda.is_available() else "cpu"
print("native op available:", target.native_available())
u = torch.randn(4, 3, 8, 8, device=device)
loss, per_sample, weight = target.meanflow_loss(u, torch.randn_like(u), torch.randn(2, 3, 8, 8, device=device),
                                                torch.ones(4, device=device), torch.zeros(4, device=device))
print("native op ran on", device, float(loss))
PY

if [ "$device" = cuda ]; then
  parallel=()  # pytest-xdist, where installed, spreads the Triton compiles over the CPU cores
  "$PY" -c "import xdist" >/dev/null 2>&1 && parallel=(-n "${SUITE_TEST_WORKERS:-8}")
  # shellcheck disable=SC2086
  stage tests 90 env MFKERNELS_AUTOTUNE=0 "$PY" -m pytest --full -m gpu -q -p no:cacheprovider -rfE --tb=short \
    "${parallel[@]}" -o addopts="" ${SUITE_TEST_ARGS:-tests} >"$out/gpu_tests.log" 2>&1
  tail -n 15 "$out/gpu_tests.log"
else
  echo "=== tests: the gpu-marked tests run on CPU in the ordinary test suite (skipped in the dry run)"
fi

# Step rows at the README's shapes, eager and graphed, most important first (rows are written as they finish).
if [ "$device" = cuda ]; then
  step_default="--models DiT-B/2:64 DiT-XL/2:32 DiT-XL/2:64 --modes eager graphed --graph-backends explicit fused"
  step_default+=" --warmup-ms 300 --rep-ms 1200"
else
  step_default="--modes eager"
fi
# shellcheck disable=SC2086
stage step 185 "$PY" bench/bench_step.py --out "$out/step.json" ${SUITE_STEP_ARGS:-$step_default} $quick
# autograd (torch.func.jvp) under CUDA graphs, in a process of its own: a failed capture can leave the CUDA context
# unusable (meanflow/training/cuda_graphs.py), which must not take the other rows with it. Its error is the row.
if [ "$device" = cuda ]; then
  stage step_graphed_autograd 35 "$PY" bench/bench_step.py --out "$out/step_run_graphed_autograd.json" \
    --models DiT-B/2:64 --modes graphed --backends autograd --no-fd --no-error --warmup-ms 300 --rep-ms 1200
fi

if [ "$device" = cuda ]; then
  stage tests_autotune 70 env MFKERNELS_AUTOTUNE=1 "$PY" -m pytest --full -m gpu -q -s -p no:cacheprovider -rfE --tb=short \
    -o addopts="" tests/test_bench_tools.py -k bench_shapes >"$out/gpu_tests_autotune.log" 2>&1
  tail -n 8 "$out/gpu_tests_autotune.log"
fi

# shellcheck disable=SC2086
stage attention 100 "$PY" bench/bench_attention.py --out "$out/attention.json" \
  ${SUITE_ATTENTION_ARGS:---causal off --dtypes bf16 --ns 1024,2048,4096,8192} $quick

# ----------------------------------------------------------------------------------------------------------------
# Stages added by other helpers go here, in order of importance, each with a limit; keep the default limits' sum
# under SUITE_BUDGET (today 680 of 700 s; SUITE_BUDGET clips a stage that would overrun, it never extends the run).
# host: launches per block and host time per step, eager / compiled / graphed.
if [ -f bench/bench_host.py ]; then
  stage host 40 "$PY" bench/bench_host.py --out "$out/host.json" $quick
else
  echo "=== host: skipped (bench/bench_host.py is not in this checkout yet)"
fi
# ----------------------------------------------------------------------------------------------------------------

# torch.compile rows: compile time dominates, so one model; rows not reached are marked in the JSON.
if [ "$device" = cuda ]; then
  compiled_default="--models DiT-B/2:64 --modes compiled --backends fused explicit autograd --no-error --no-fd"
else
  compiled_default="--modes compiled --compile-backend eager --backends explicit --guidance off --no-error --no-fd"
fi
# shellcheck disable=SC2086
stage step_compiled 80 "$PY" bench/bench_step.py --out "$out/step_run_compiled.json" \
  ${SUITE_COMPILED_ARGS:-$compiled_default} $quick

stage target 20 "$PY" bench/bench_target.py --device "$device" --out "$out/target.json" $quick

for extra in ${SUITE_EXTRA:-}; do
  case "$extra" in
    block_ops) stage block_ops 50 "$PY" bench/bench_block_ops.py --out "$out/block_ops.json" $quick ;;
    block) stage block 45 "$PY" bench/bench_block.py --out "$out/block.json" $quick ;;
    profile) stage profile 90 "$PY" bench/profile_step.py --out "$out" $quick ;;
    # gradients through the tangent: the TVM step fused vs autograd (eager and compiled; time, peak memory) and the
    # attention's tangent backward against its forward + JVP, FA2's backward and the math reference (and TVM's own
    # kernel where bench/external/tvm is carried)
    tvm) stage tvm_step 150 "$PY" bench/bench_objectives.py --device "$device" --backends fused autograd --cases tvm \
           --compile both --out "$out/tvm_step.json" $quick
         stage tvm_attention 120 "$PY" bench/bench_attention.py --out "$out/tvm_attention.json" \
           ${SUITE_TVM_ATTENTION_ARGS:---causal off --dtypes bf16 --ns 4096,16384 --dims 128 --batch 1 --heads 24 --cases dense \
           --providers fused_fwd_jvp,fused_bwd,fused_tangent_bwd,sdpa_flash_bwd,math_tangent_bwd,tvm_fwd_jvp,tvm_tangent_bwd} $quick ;;
    *) echo "=== $extra: unknown extra stage (block_ops, block, profile, tvm)"; failed+=("$extra(unknown)") ;;
  esac
done

# Result files written in another format get this checkout's provenance (files that have it are left alone).
"$PY" -m bench.common stamp "$out"/*.json >/dev/null 2>&1 || echo "stamping the result files failed"

echo "stage times: ${timings[*]}"
echo "suite finished in $(( $(date +%s) - suite_start ))s on $device (budget ${budget}s); results in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "stages with a non-zero exit: ${failed[*]}"
  exit 1
fi
