"""Build script: only the native extension lives here; metadata is in pyproject.toml.

The extension (csrc/) is optional at install time: when it cannot be built, mfkernels falls back to a JIT build
with ninja on first use, then to the pure-torch reference (with one warning).
"""
from setuptools import setup


def _extensions():
    return [], {}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
