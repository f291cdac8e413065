"""Every mfkernels custom op's fake (meta) implementation against the op itself, in every dtype it takes: the fake
outputs' dtypes, shapes and strides are what torch.compile plans the graph with, so a fake that says float32 where the
kernel writes bfloat16 (or the reverse) is a wrong graph that no float64 test can see. torch.library.opcheck checks the
same but the op tests run it in one dtype; this runs the fake check in float32, bfloat16 and float16 (and mixed
parameter dtypes where an op takes them), for every op registered in the mfkernels namespace."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mfkernels.activations  # noqa: F401  (each import registers its ops)
import mfkernels.attention.registration  # noqa: F401
import mfkernels.mlp  # noqa: F401
import mfkernels.norm  # noqa: F401
import mfkernels.qk_norm_rope  # noqa: F401
import mfkernels.residual  # noqa: F401
import mfkernels.rmsnorm  # noqa: F401
import mfkernels.rope  # noqa: F401
import mfkernels.swiglu  # noqa: F401

OPS = torch.ops.mfkernels
B, N, C, H, KT = 2, 3, 8, 12, 1
HEADS, D = 2, 8


def rnd(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def cases(dt: torch.dtype, pdt: torch.dtype) -> dict:
    """name -> (op, args) in activation dtype dt with parameters in pdt (the mixed case: fp32 weights, bf16 data)."""
    x, x_dot, mod, mod_dot = rnd(B, N, C, dtype=dt), rnd(KT, N, C, dtype=dt), rnd(B, C, dtype=dt), rnd(KT, C, dtype=dt)
    out = {
        "layernorm_modulate_fwd": (OPS.layernorm_modulate_fwd, (x, mod, mod, x_dot, mod_dot, mod_dot, 1e-6, True)),
        "gelu_tanh_fwd": (OPS.gelu_tanh_fwd, (x, x_dot)),
        "gelu_tanh_bwd": (OPS.gelu_tanh_bwd, (x, x)),
        "silu_fwd": (OPS.silu_fwd, (mod, mod_dot)),
        "silu_bwd": (OPS.silu_bwd, (mod, mod)),
        "mlp_fwd": (OPS.mlp_fwd, (x, rnd(H, C, dtype=dt), rnd(H, dtype=dt), rnd(C, H, dtype=dt), rnd(C, dtype=dt),
                                  x_dot, True)),
        "gelu_tanh_bias_bwd": (OPS.gelu_tanh_bias_bwd, (rnd(B * N, H, dtype=dt), rnd(H, dtype=dt),
                                                         rnd(B * N, H, dtype=dt), True, True)),
        "gated_residual_fwd": (OPS.gated_residual_fwd, (x, mod, x, x_dot, mod_dot, x_dot)),
        "rmsnorm_fwd": (OPS.rmsnorm_fwd, (x, rnd(C, dtype=pdt), x_dot, 1e-6)),
        "swiglu_fwd": (OPS.swiglu_fwd, (x, rnd(2 * H, C, dtype=dt), None, rnd(C, H, dtype=dt), None, x_dot, True)),
    }
    _, _, mean, rstd = OPS.layernorm_modulate_fwd(x, mod, mod, x_dot, mod_dot, mod_dot, 1e-6, True)
    out["layernorm_modulate_bwd"] = (OPS.layernorm_modulate_bwd, (x, x, mod, mean, rstd, True, True))
    w = rnd(C, dtype=pdt)
    _, _, r = OPS.rmsnorm_fwd(x, w, x_dot, 1e-6)
    out["rmsnorm_bwd"] = (OPS.rmsnorm_bwd, (x, x, w, r, True, True))
    w13, w2 = rnd(2 * H, C, dtype=dt), rnd(C, H, dtype=dt)
    _, _, ab = OPS.swiglu_fwd(x, w13, None, w2, None, x_dot, True)
    out["swiglu_bwd"] = (OPS.swiglu_bwd, (x, x, ab, w13, None, w2, False, True, True))

    q, k = rnd(B, HEADS, N, D, dtype=dt), rnd(B, HEADS, N, D, dtype=dt)
    q_dot, k_dot = rnd(KT, HEADS, N, D, dtype=dt), rnd(KT, HEADS, N, D, dtype=dt)
    angles = torch.float64 if dt == torch.float64 else torch.float32
    cos, sin = rnd(N, D // 2, dtype=angles), rnd(N, D // 2, dtype=angles)
    wq, wk = rnd(D, dtype=pdt), rnd(D, dtype=pdt)
    out["rope_fwd"] = (OPS.rope_fwd, (q, cos, sin, q_dot, True))
    out["rope_bwd"] = (OPS.rope_bwd, (q, cos, sin, True))
    out["qk_norm_rope_fwd"] = (OPS.qk_norm_rope_fwd, (q, k, wq, wk, cos, sin, q_dot, k_dot, 1e-6, True))
    *_, qk_rstd = OPS.qk_norm_rope_fwd(q, k, wq, wk, cos, sin, q_dot, k_dot, 1e-6, True)
    out["qk_norm_rope_bwd"] = (OPS.qk_norm_rope_bwd, (q, k, q, k, wq, wk, cos, sin, qk_rstd, True, True, True))

    # the tangent-gradient variants (tests/test_tangent_grad.py) and their backward ops
    out["layernorm_modulate_fwd (tangent_grad)"] = (OPS.layernorm_modulate_fwd, (x, mod, mod, x_dot, mod_dot, mod_dot,
                                                                                 1e-6, True, True))
    out["layernorm_modulate_tangent_bwd"] = (OPS.layernorm_modulate_tangent_bwd,
                                             (x, x_dot, x, x_dot, mod, mod_dot, mean, rstd, True, True, True))
    out["rmsnorm_tangent_bwd"] = (OPS.rmsnorm_tangent_bwd, (x, x_dot, x, x_dot, w, r, True, True, True))
    out["swiglu_tangent_bwd"] = (OPS.swiglu_tangent_bwd, (x, x_dot, x, x_dot, ab, w13, None, w2, False, True, True,
                                                          True))
    out["qk_norm_rope_tangent_bwd"] = (OPS.qk_norm_rope_tangent_bwd, (q, k, q_dot, k_dot, q, k, q_dot, k_dot, wq, wk,
                                                                      cos, sin, qk_rstd, True, True, True, True))

    v, v_dot = rnd(B, HEADS, N, D, dtype=dt), rnd(KT, HEADS, N, D, dtype=dt)
    scale = D ** -0.5
    for tangent_grad in (False, True):
        out[f"attention_jvp_fwd (tangent_grad={tangent_grad})"] = (
            OPS.attention_jvp_fwd, (q, k, v, q_dot, k_dot, v_dot, None, False, scale, tangent_grad))
    o, o_dot, lse, mu = OPS.attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, None, False, scale, True)
    out["attention_bwd"] = (OPS.attention_bwd, (o, q, k, v, o, lse, None, False, scale))
    out["attention_jvp_bwd"] = (OPS.attention_jvp_bwd, (o, o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu,
                                                        None, False, scale))
    return out


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]


def _meta(t):
    return None if t is None else (t.dtype, tuple(t.shape), t.stride() if t.numel() else None)


@pytest.mark.parametrize("dt, pdt", DTYPES, ids=[f"{a}-params-{b}".replace("torch.", "") for a, b in DTYPES])
def test_fake_outputs_match_the_kernels_in_every_dtype(dt, pdt):
    table = cases(dt, pdt)
    wrong = []
    for name, (op, args) in table.items():
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real, fake = (o if isinstance(o, (tuple, list)) else (o,) for o in (real, fake))
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            if _meta(r) != _meta(f):
                wrong.append(f"{name} output {i}: kernel {_meta(r)}, fake {_meta(f)}")
    assert not wrong, "\n".join(wrong)


def test_every_registered_op_has_a_case():
    """A new op must come with a case above (its fake is then checked in every dtype)."""
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mfkernels::")}
    # the C++ target op and its backward: opcheck runs them in fp32, bf16 and fp64 in tests/test_target.py
    registered -= {"meanflow_loss", "meanflow_loss_backward"}
    covered = {name.split(" ")[0] for name in cases(torch.float32, torch.float32)}
    assert registered <= covered, f"ops without a fake-dtype case: {sorted(registered - covered)}"
