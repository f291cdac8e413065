"""The RMSNorm, SwiGLU and RoPE / QK-norm kernels (the tangent backward ones included) compile for the H100 (sm_90) without register spills
(tests/_sm90_aot)."""
import pytest

from tests._sm90_aot import HOPPER_SHARED_MEMORY, compile_for_sm90

pytestmark = pytest.mark.full  # long: runs with --full (CI runs it)

BODY = r'''
from mfkernels import rmsnorm, rope, swiglu

# bf16 and fp32: fp16 compiles like bf16 (same widths), fp64 is a test dtype only. Head dim 64 (iMF) for every variant,
# 128 for the full one; both pairings for the full one (the pairing changes addressing only).
for dtype in (torch.bfloat16, torch.float32):
    B, N, kt = 2, 3, 1
    f32 = torch.float32
    for c in (768, 1152):  # the residual stream: BLOCK_D 1024 (iMF-B/M 768, L/XL 1024) and 2048 (DiT-XL 1152)
        x = torch.randn(B, N, c, dtype=dtype)
        w = torch.randn(c, dtype=f32)
        y, y_dot, rstd = rmsnorm.rmsnorm_jvp_fwd(x, w, x[:kt], 1e-6)
        rmsnorm.rmsnorm_bwd(y, x, w, rstd, True, True)
        rmsnorm.rmsnorm_bwd(y, x, None, rstd, True, False)
        rmsnorm.rmsnorm_tangent_bwd(y, y_dot, x, x[:kt], w, rstd, True, True, True)
    for c, hidden in ((768, 2048), (1024, 2730)):  # int(C * 8 / 3) of iMF
        x = torch.randn(B, N, c, dtype=dtype)
        w13, w2 = torch.randn(2 * hidden, c, dtype=dtype), torch.randn(c, hidden, dtype=dtype)
        y, _, ab = swiglu.swiglu_jvp_fwd(x, w13, None, w2, None, x[:kt], True)
        swiglu.swiglu_bwd(y, x, ab, w13, None, w2, False, True, True)
    H = 4
    for d, variants in ((64, [("w", "rope", True), ("w", "rope", False), ("w", None, True), (None, "rope", True)]),
                        (128, [("w", "rope", True)])):
        qkv = torch.randn(B, N, 3, H, d, dtype=dtype)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        cos, w = torch.randn(N, d // 2, dtype=f32), torch.randn(d, dtype=f32)
        for has_w, has_rope, interleaved in variants:
            weights = [w, w] if has_w else None
            angles = (cos, cos) if has_rope else (None, None)
            (qo, ko), _, rstd = rope.rope_fwd_launch([q, k], [q[:kt], k[:kt]], weights, *angles, eps=1e-6, norm=True,
                                                     interleaved=interleaved)
            rope.rope_bwd_launch([qo, ko], [q, k], weights, *angles, rstd, norm=True, interleaved=interleaved,
                                 compute_dx=True, compute_dw=weights is not None)
            rope.norm_rope_tangent_bwd_launch([qo, ko], [qo[:kt], ko[:kt]], [q, k], [q[:kt], k[:kt]], weights,
                                              *angles, rstd, interleaved=interleaved, compute_dx=True,
                                              compute_dx_dot=True, compute_dw=weights is not None)
        if d == 64:  # RoPE alone
            (y,), _, _ = rope.rope_fwd_launch([q], [q[:kt]], None, cos, cos, eps=0.0, norm=False, interleaved=True)
            rope.rope_bwd_launch([y], None, None, cos, cos, torch.empty(0), norm=False, interleaved=True,
                                 compute_dx=True, compute_dw=False)
print(json.dumps(out))
'''


def test_modern_kernels_compile_for_sm90_without_spills():
    compiled = compile_for_sm90(BODY)
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_rmsnorm_jvp_fwd_kernel", "_rmsnorm_bwd_kernel", "_swiglu_jvp_fwd_kernel",
                       "_swiglu_bwd_kernel", "_rope_jvp_fwd_kernel", "_rope_bwd_kernel",
                       "_rmsnorm_tangent_bwd_kernel", "_norm_rope_tangent_bwd_kernel"}
    spilling = [r for r in compiled if r["spill"]]
    assert not spilling, f"register spills on sm_90: {spilling}"
    too_big = [r for r in compiled if r["shared"] > HOPPER_SHARED_MEMORY]
    assert not too_big, f"more shared memory than sm_90 has: {too_big}"
