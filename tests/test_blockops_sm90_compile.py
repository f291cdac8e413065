"""Every block-op kernel specialisation compiles for the H100 (sm_90) without register spills (see tests/_sm90_aot)."""
import pytest

from tests._sm90_aot import HOPPER_SHARED_MEMORY, compile_for_sm90

pytestmark = pytest.mark.full  # long: runs with --full (CI runs it)

BODY = r'''
from mfkernels import activations, mlp, norm, residual
from mfkernels._triton import ACT_GELU_TANH, ACT_SILU

for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for c in (24, 768, 1152):
        B, N, kt = 2, 3, 1
        x = torch.randn(B, N, c, dtype=dtype)
        mod = torch.randn(B, c, dtype=dtype)
        norm.layernorm_modulate_jvp_fwd(x, mod, mod, x[:kt], mod[:kt], mod[:kt], 1e-6, True)
        stats = torch.zeros(B * N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        norm.layernorm_modulate_bwd(x, x, mod, stats, stats, True, True)
        norm.layernorm_modulate_tangent_bwd(x, x[:kt], x, x[:kt], mod, mod[:kt], stats, stats, True, True, True)
        residual.gated_residual_jvp_fwd(x, mod, x, x[:kt], mod[:kt], x[:kt])
        for act in (ACT_GELU_TANH, ACT_SILU):
            activations.act_jvp_fwd(x, x[:kt], act)
            activations.act_bwd(x, x, act, write_da=True, write_g=act == ACT_GELU_TANH)
        w1, w2 = torch.randn(4 * c, c, dtype=dtype), torch.randn(c, 4 * c, dtype=dtype)
        b1 = torch.randn(4 * c, dtype=dtype)
        mlp.mlp_jvp_fwd(x, w1, b1, w2, None, x[:kt], True)
        activations.act_bwd(x.new_empty(B * N, 4 * c), x.new_empty(B * N, 4 * c), ACT_GELU_TANH, bias=b1,
                            write_g=True, in_place=True)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90_without_spills():
    compiled = compile_for_sm90(BODY)
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_layernorm_modulate_jvp_fwd_kernel", "_layernorm_modulate_bwd_kernel",
                       "_layernorm_modulate_tangent_bwd_kernel",
                       "_gated_residual_jvp_fwd_kernel",
                       "_act_jvp_fwd_kernel", "_act_bwd_kernel"}
    # fp64 is a test dtype (the exact CPU tests run it in the interpreter); the widest fp64 build of the LayerNorm
    # tangent backward (C 1152: 16 warps, at most 128 registers a thread) keeps more row vectors than fit and spills a
    # few dozen bytes (bench/results/sm90-aot-2026-12-07-tangent/NOTES.md): allowed, and bounded
    fp64_tangent = lambda r: (r["kernel"] == "_layernorm_modulate_tangent_bwd_kernel"  # noqa: E731
                              and r["dtypes"] == ["*fp64"] and r["spill"] <= 128)
    spilling = [r for r in compiled if r["spill"] and not fp64_tangent(r)]
    assert not spilling, f"register spills on sm_90: {spilling}"
    too_big = [r for r in compiled if r["shared"] > HOPPER_SHARED_MEMORY]
    assert not too_big, f"more shared memory than sm_90 has: {too_big}"
