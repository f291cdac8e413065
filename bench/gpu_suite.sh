#!/usr/bin/env bash
# The one command for a GPU machine:   bash bench/gpu_suite.sh OUTDIR [--quick]
#
# Works from a plain checkout (PYTHONPATH, no pip install; the native op is JIT-built with ninja), with no internet.
# Stages, each in its own process with its own time limit, none stopping the ones after it:
#   env        device, driver, torch / triton versions                          -> OUTDIR/env.json
#   native     JIT build of the C++/CUDA extension
#   tests      the `gpu`-marked tests on CUDA (autotuning off: one config each)  -> OUTDIR/gpu_tests.log
#   attention  fused forward+JVP / backward vs SDPA flash, cuDNN, math JVP       -> OUTDIR/attention.json
#   target     native target/loss op vs the eager chain and a D2D copy          -> OUTDIR/target.json
#   block_ops  LN-modulate, MLP, GELU, gated residual: fused vs eager vs JVP     -> OUTDIR/block_ops.json
#   block      one DiT block forward + JVP + backward per backend               -> OUTDIR/block.json
#   step       full training steps, DiT-B/2 and DiT-XL/2: FM vs MeanFlow x backend -> OUTDIR/step.json
#   profile    host overhead per op, forward passes, torch.profiler tables (DiT-B/2) -> OUTDIR/{overhead,forward}.json,
#              OUTDIR/profile_<backend>.txt
# Every benchmark writes its JSON as it goes, so a stage cut short keeps what it measured.
# Without CUDA the suite runs the same stages in Triton interpreter mode at tiny sizes: a dry run on CPU (CI does it).
# Stage limits (seconds) can be changed with SUITE_LIMIT_<STAGE>=..., stages skipped with SUITE_SKIP="a b", and the
# arguments of some stages replaced with SUITE_ATTENTION_ARGS, SUITE_STEP_ARGS, SUITE_TEST_ARGS.
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
suite_start=$(date +%s)
failed=()

stage() {  # stage NAME DEFAULT_LIMIT CMD...
  local name=$1 limit=$2 var rc t0
  shift 2
  var="SUITE_LIMIT_${name^^}"
  limit="${!var:-$limit}"
  if [[ " ${SUITE_SKIP:-} " == *" $name "* ]]; then echo "=== $name: skipped"; return; fi
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  [ "$rc" = 0 ] || failed+=("$name($rc)")
}

stage env 30 "$PY" - "$out/env.json" <<'PY'
import json, os, subprocess, sys
import torch, triton
info = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
PY

stage native 120 "$PY" - <<'PY'
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
  stage tests 130 env MFKERNELS_AUTOTUNE=0 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=short \
    "${parallel[@]}" -o addopts="" ${SUITE_TEST_ARGS:-tests} >"$out/gpu_tests.log" 2>&1
  tail -n 25 "$out/gpu_tests.log"
else
  echo "=== tests: the gpu-marked tests run on CPU in the ordinary test suite (skipped in the dry run)"
fi

# shellcheck disable=SC2086
stage attention 90 "$PY" bench/bench_attention.py --out "$out/attention.json" \
  ${SUITE_ATTENTION_ARGS:---causal off --dtypes bf16 --ns 1024,2048,4096,8192} $quick
stage target 40 "$PY" bench/bench_target.py --device "$device" --out "$out/target.json" $quick
stage block_ops 50 "$PY" bench/bench_block_ops.py --out "$out/block_ops.json" $quick
stage block 45 "$PY" bench/bench_block.py --out "$out/block.json" $quick
# shellcheck disable=SC2086
stage step 130 "$PY" bench/bench_step.py --out "$out/step.json" ${SUITE_STEP_ARGS:---batch 64} $quick
stage profile 90 "$PY" bench/profile_step.py --out "$out" $quick

echo "suite finished in $(( $(date +%s) - suite_start ))s on $device; results in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "stages with a non-zero exit: ${failed[*]}"
  exit 1
fi
