"""mfkernels: fused forward + JVP kernels for JVP-based generative models (MeanFlow, sCM, iMF).

Each op computes a layer's output and its tangent (forward-mode derivative) in one pass, with a backward through the
primal output. Pure-torch references live in `mfkernels.reference`.
"""
from . import reference  # noqa: F401
