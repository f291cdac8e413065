"""mfkernels: fused forward + JVP kernels for JVP-based generative models (MeanFlow, sCM, iMF).

Each op computes a layer's output and its tangent (forward-mode derivative) in one pass, with a backward through the
primal output. Tangents may cover only the first kt rows of the batch (kt = 0 allowed). Pure-torch references of
every op live in `mfkernels.reference`; modules with `forward_jvp` in `mfkernels.nn`.

    from mfkernels import attention_jvp, scaled_dot_product_attention, layernorm_modulate_jvp, mlp_jvp
"""
import importlib

_EXPORTS = {
    "attention_jvp": "attention",
    "scaled_dot_product_attention": "attention",
    "layernorm_modulate_jvp": "norm",
    "gelu_tanh_jvp": "activations",
    "silu_jvp": "activations",
    "linear_jvp": "mlp",
    "mlp_jvp": "mlp",
    "gated_residual_jvp": "residual",
    "rmsnorm_jvp": "rmsnorm",
    "swiglu_jvp": "swiglu",
    "rope_jvp": "rope",
    "qk_norm_rope_jvp": "qk_norm_rope",
    "meanflow_loss": "target",
    "ops_table": "ops",
    "jvp_attention": "jvp_routing",
}

__all__ = list(_EXPORTS) + ["reference", "nn"]


def __getattr__(name):
    """Import lazily: `import mfkernels` stays cheap (no Triton, no extension build) until an op is used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in ("reference", "nn", "ops"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mfkernels' has no attribute {name!r}")
