#!/usr/bin/env bash
# Install meanflow-engine and everything it needs into a fresh virtual environment, without ever pulling a second torch.
#
#   bash scripts/setup.sh                  # makes ./.venv (once) and installs into it; then use .venv/bin/python
#   PYTHON=python bash scripts/setup.sh    # installs into that Python instead (your own venv / conda env, or a GPU
#                                          # machine's Python whose CUDA build of torch must be kept)
#   SETUP_FORCE=1 bash scripts/setup.sh    # reinstall the package and rebuild the native op anyway
#
# A second run only re-checks (a few seconds).
# - the environment: ./.venv, made with `python3 -m venv` (SETUP_PYTHON picks the interpreter that makes it; Python
#   >= 3.10) and isolated from the machine's packages, so what the tests see is what this script installed.
# - torch: kept if one is installed (your CUDA build on a GPU machine); otherwise torch==2.13.0 (the CPU build).
#   An unpinned `torch` would pull a multi-GB CUDA build, so it is never asked for.
# - triton 3.6.0 when no triton is importable, and numpy < 2.4 (numpy 2.4 breaks the Triton 3.6 interpreter that
#   the CPU tests use).
# - the package itself, editable, built with --no-build-isolation so the C++/CUDA extension compiles against the
#   torch that is installed (on a CPU-only torch: the CPU kernel; with CUDA: both).
# - a second run skips the pip steps when THIS checkout is already installed editable, every requirement of
#   pyproject.toml (with the test extra) is satisfied, and the native op mfkernels._C is built, imports against the
#   installed torch, and is newer than csrc/, setup.py and pyproject.toml; otherwise it installs as on a first run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  maker="${SETUP_PYTHON:-python3}"
  if ! "$maker" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: $maker is not Python >= 3.10 (set SETUP_PYTHON=/path/to/python3.X)" >&2
    exit 2
  fi
  if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating the virtual environment .venv ($("$maker" --version 2>&1))"
    "$maker" -m venv .venv
  fi
  PY=.venv/bin/python
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# One line: 'install: WHY' when an install is needed, else 'ok: VERSIONS' (one Python start, one torch import).
install_needed() {
  MFKERNELS_NATIVE=prebuilt "$PY" - <<'PY' 2>/dev/null || echo "install: the check itself failed"
import importlib.metadata as md
import json
import sys
from pathlib import Path

here = Path.cwd().resolve()


def need(why: str) -> None:
    print(f"install: {why}")
    sys.exit(0)


try:
    dist = md.distribution("meanflow-engine")
except md.PackageNotFoundError:
    need("meanflow-engine is not installed")
direct = json.loads(dist.read_text("direct_url.json") or "{}")
if not direct.get("dir_info", {}).get("editable"):
    need("meanflow-engine is installed, but not editable")
if Path(direct.get("url", "").removeprefix("file://")).resolve() != here:
    need(f"meanflow-engine is installed from another checkout ({direct.get('url')})")
try:
    import tomllib  # Python >= 3.11: read the requirements this checkout asks for now
    project = tomllib.loads((here / "pyproject.toml").read_text())["project"]
    requires = project["dependencies"] + project["optional-dependencies"]["test"]
except ImportError:  # Python 3.10: the ones recorded at install time
    requires = [r for r in dist.requires or [] if "extra ==" not in r or "test" in r]
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for text in requires:
    req = Requirement(text.split(";")[0])
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        need(f"{req.name} is not installed")
    if not req.specifier.contains(version, prereleases=True):
        need(f"{req.name} {version} does not satisfy {req}")
built = sorted((here / "mfkernels").glob("_C*.so")) + sorted((here / "mfkernels").glob("_C*.pyd"))
if not built:
    need("the native op mfkernels._C is not built")
sources = [here / "setup.py", here / "pyproject.toml", *(p for p in (here / "csrc").rglob("*") if p.is_file())]
if max(p.stat().st_mtime for p in sources) > min(p.stat().st_mtime for p in built):
    need("csrc/, setup.py or pyproject.toml changed since the native op was built")
import mfkernels.target  # noqa: E402

if not mfkernels.target.native_available():
    need("the native op mfkernels._C does not load against the installed torch")
import torch  # noqa: E402  (already imported by mfkernels)

print(f"ok: torch {torch.__version__}, triton {md.version('triton')}, numpy {md.version('numpy')}, native op built")
PY
}

check="$(install_needed)"
if [[ "$check" == ok:* && -z "${SETUP_FORCE:-}" ]]; then
  echo "setup: this checkout is already installed (editable, requirements met, native op built): nothing to install"
  echo "setup: ok  ${check#ok: }"
  exit 0
fi
if [[ "$check" == ok:* ]]; then why="SETUP_FORCE is set"; else why="${check#install: }"; fi
echo "setup: installing ($why)"
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
