#!/usr/bin/env bash
# Install meanflow-engine and everything it needs into the active Python, without ever pulling a second torch.
#
#   bash scripts/setup.sh            # idempotent: a second run only re-checks
#
# - torch: kept if one is installed (your CUDA build on a GPU machine); otherwise torch==2.13.0 (the CPU build).
#   An unpinned `torch` would pull a multi-GB CUDA build, so it is never asked for.
# - triton 3.6.0 when no triton is importable, and numpy < 2.4 (numpy 2.4 breaks the Triton 3.6 interpreter that
#   the CPU tests use).
# - the package itself, editable, built with --no-build-isolation so the C++/CUDA extension compiles against the
#   torch that is installed (on a CPU-only torch: the CPU kernel; with CUDA: both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  pip_install "torch==2.13.0"
fi
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
  echo "setup: installing triton==3.6.0"
  pip_install "triton==3.6.0"
fi
pip_install "setuptools>=64" wheel "numpy<2.4"
echo "setup: installing meanflow-engine (editable, native extension built against torch $("$PY" -c 'import torch; print(torch.__version__)'))"
pip_install --no-build-isolation -e ".[test]"
"$PY" - <<'PY'
import torch, triton, numpy
import mfkernels.target as target
print(f"setup: ok  torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, "
      f"native op {'built' if target.native_available() else 'NOT built (pure-torch fallback)'}")
PY
