#!/usr/bin/env bash
# Time the README's demo as a newcomer meets it: a fresh clone of this repository's HEAD in a temporary folder,
# `bash scripts/setup.sh` there (it makes the clone's own .venv and installs into it; then once more: a second run only
# re-checks), and `.venv/bin/python -m meanflow train --preset mnist` with an empty classifier cache. Prints the setup,
# training and evaluation seconds and writes them, with the demo's printed lines and the machine's load, to
# docs/demo_times.json.
#
#   bash tools/time_demo.sh --readme                  # the real measurement (~15 min on 2 cores): on a QUIET machine
#   bash tools/time_demo.sh --no-write -- --set train.steps=50   # a quick check that the procedure works
#
# Options (before --; everything after -- goes to `meanflow train --preset mnist`):
#   --out FILE      where the JSON goes (default docs/demo_times.json in this checkout)
#   --no-write      print only
#   --readme        also rewrite README.md's demo block and docs/mnist_{1,2}step.png, docs/mnist_loss_curve.png
#                   from this run (python tools/demo_readme.py)
#   --keep          keep the temporary folder
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/docs/demo_times.json" write=1 readme=0 keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --no-write) write=0; shift ;;
    --readme) readme=1; shift ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    *) echo "time_demo: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [[ $# -gt 0 && $readme == 1 ]]; then
  echo "time_demo: --readme takes the full demo only (no extra train arguments)" >&2; exit 2
fi

tmp="$(mktemp -d)"
if [[ $keep == 0 ]]; then trap 'rm -rf "$tmp"' EXIT; else echo "time_demo: keeping $tmp"; fi
now() { date +%s.%N; }
load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo null; }

echo "time_demo: cloning $(git -C "$repo" rev-parse --short HEAD) into $tmp (uncommitted changes are not included)"
git clone -q "$repo" "$tmp/meanflow-engine"
load_before="$(load)"

cd "$tmp/meanflow-engine"
PY="$tmp/meanflow-engine/.venv/bin/python"
t0="$(now)"
env -u PYTHON bash scripts/setup.sh
t1="$(now)"
env -u PYTHON bash scripts/setup.sh | tee "$tmp/setup_again.log"
t2="$(now)"
# a newcomer has no cached digit classifier: evaluation trains it once
MEANFLOW_CACHE="$tmp/cache" "$PY" -m meanflow train --preset mnist "$@" > >(tee "$tmp/demo.log") 2> "$tmp/demo.err"
t3="$(now)"
load_after="$(load)"

TMP="$tmp" REPO="$repo" OUT="$out" WRITE="$write" ARGS="$*" VENV=".venv (scripts/setup.sh)" LOAD0="$load_before" LOAD1="$load_after" \
T0="$t0" T1="$t1" T2="$t2" T3="$t3" "$PY" - <<'PY'
import json, os, platform, subprocess
from pathlib import Path

e = os.environ
tmp, clone = Path(e["TMP"]), Path(e["TMP"]) / "meanflow-engine"
summary = json.loads((clone / "runs" / "mnist" / "summary.json").read_text())
lines = (tmp / "demo.log").read_text().splitlines()
shown = [lines[0], "..."] + lines[next(i for i, l in enumerate(lines) if l.startswith("run directory:")):]
cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
t = [float(e[k]) for k in ("T0", "T1", "T2", "T3")]
result = {
    "command": "bash tools/time_demo.sh" + (f" -- {e['ARGS']}" if e["ARGS"] else ""),
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip(),
    "machine": {"cores": os.cpu_count(), "cpu": cpu, "load_average_before": e["LOAD0"], "load_average_after": e["LOAD1"],
                "venv": e["VENV"], "python": platform.python_version()},
    "setup_s": round(t[1] - t[0], 1),
    "setup_again_s": round(t[2] - t[1], 1),
    "demo_s": round(t[3] - t[2], 1),
    "train_s": summary["wall_s"],
    "eval_s": summary.get("eval_s"),
    "steps": summary["step"],
    "threads": summary["threads"],
    "samples_per_s": summary["samples_per_s"],
    "metrics": summary.get("metrics"),
    "printed": shown,
}
print(f"\ntime_demo: setup {result['setup_s']:.0f} s (again: {result['setup_again_s']:.0f} s), training "
      f"{result['train_s']:.0f} s ({result['steps']} steps, {result['threads']} thread"
      f"{'' if result['threads'] == 1 else 's'}), evaluation "
      f"{result['eval_s'] or 0:.0f} s, demo command {result['demo_s']:.0f} s end to end; load average "
      f"{e['LOAD0']} -> {e['LOAD1']} on {os.cpu_count()} cores")
if e["WRITE"] == "1":
    Path(e["OUT"]).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"time_demo: wrote {e['OUT']}")
PY
if [[ $readme == 1 && $write == 1 ]]; then
  for f in final_1step final_2step loss_curve; do
    name="mnist_${f#final_}"; cp "$tmp/meanflow-engine/runs/mnist/$f.png" "$repo/docs/${name}.png"
  done
  python3 "$repo/tools/demo_readme.py" "$out" "$repo/README.md"
fi
