"""Build script: only the native extension lives here; metadata is in pyproject.toml.

The extension (csrc/) is optional at install time: when it cannot be built, mfkernels falls back to a JIT build
with ninja on first use, then to the pure-torch reference (with one warning).

    pip install --no-build-isolation .        # builds mfkernels._C against the torch already installed

It builds a CppExtension (csrc/target.cpp, CPU kernel) on a CPU-only torch and a CUDAExtension (plus csrc/cuda/*.cu)
where torch has CUDA and a CUDA toolkit is found (torch.utils.cpp_extension.CUDA_HOME). pyproject.toml's build
requirements deliberately leave torch out: an isolated build would compile against a second, different torch, so
without --no-build-isolation (torch not importable here) the extension is skipped with a message.

Environment:
    MFKERNELS_BUILD_EXT   auto (default: build, and on failure warn and install the pure-Python parts) |
                          1 (a failed build fails the install) | 0 (do not build the extension)
    MFKERNELS_BUILD_CUDA  auto (default) | 0 (CPU kernel only, even on a CUDA torch)
    TORCH_CUDA_ARCH_LIST  the CUDA architectures to compile for (torch's variable; e.g. "9.0")
"""
import os
import sys

from setuptools import setup


def _say(message):
    print(f"mfkernels setup: {message}", file=sys.stderr)


def _optional(build_ext_class, required):
    """build_ext that turns a failed extension build into a warning (unless required)."""

    class OptionalBuildExt(build_ext_class):
        failed = ()

        def build_extensions(self):  # torch's BuildExtension checks the compiler here, then builds each one
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - compiler errors come in many types
                if required:
                    raise
                self.failed = tuple(ext.name for ext in self.extensions)
                _say(f"WARNING: building the native extension failed ({type(exc).__name__}: {exc}). Installing "
                     "without it: mfkernels will try a JIT build on first use and otherwise fall back to the "
                     "pure-torch reference (set MFKERNELS_BUILD_EXT=1 to make this an error).")

        def _built(self):
            return [ext for ext in self.extensions if ext.name not in self.failed]

        def copy_extensions_to_source(self):  # --inplace / editable installs: skip what failed
            kept, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

        def get_outputs(self):
            return [self.get_ext_fullpath(ext.name) for ext in self._built()]

    return OptionalBuildExt


def _extensions():
    mode = os.environ.get("MFKERNELS_BUILD_EXT", "auto").strip().lower()
    if mode in ("0", "off", "no"):
        _say("MFKERNELS_BUILD_EXT=0: not building the native extension")
        return [], {}
    required = mode in ("1", "on", "yes")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if required:
            raise RuntimeError("MFKERNELS_BUILD_EXT=1 but torch is not importable; install torch first and build "
                               "with `pip install --no-build-isolation .`") from exc
        _say(f"torch is not importable ({exc}): skipping the native extension. Build with "
             "`pip install --no-build-isolation .` so that it compiles against your installed torch.")
        return [], {}

    cxx = ["-O3", "-g0", "-DMFKERNELS_PYTHON_MODULE", "-DPy_LIMITED_API=0x030A0000"]
    sources = ["csrc/target.cpp"]
    want_cuda = os.environ.get("MFKERNELS_BUILD_CUDA", "auto").strip().lower() not in ("0", "off", "no")
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        _say(f"building mfkernels._C with CUDA kernels (torch {torch.__version__}, CUDA_HOME "
             f"{cpp_extension.CUDA_HOME})")
        ext = cpp_extension.CUDAExtension(
            "mfkernels._C", sources + ["csrc/cuda/target.cu"],
            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3"]}, py_limited_api=True)
    else:
        why = ("MFKERNELS_BUILD_CUDA=0" if not want_cuda else
               "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) found")
        _say(f"building mfkernels._C with the CPU kernel only ({why}; torch {torch.__version__})")
        ext = cpp_extension.CppExtension("mfkernels._C", sources, extra_compile_args={"cxx": cxx},
                                         py_limited_api=True)
    return [ext], {"build_ext": _optional(cpp_extension.BuildExtension, required)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
