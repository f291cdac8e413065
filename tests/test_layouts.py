"""Every fused block op with the layouts users pass: primal contiguous / tangent strided, the reverse, and both strided
with different strides, at kt = 2 (with one tangent row a row stride is never used, so a kernel reading a tangent with
its primal's stride would pass). Modulation vectors are chunks of one adaLN output, as in the DiT: (B, C) views with
row stride 6C. Compared with the float64 reference (outputs, tangents, gradients through the views)."""
import pytest
import torch

from mfkernels import activations, mlp, norm, residual
from mfkernels import reference as R

from tests._blockops_util import assert_close

B, N, C, KT = 3, 4, 40, 2
LAYOUTS = ["tangent_strided", "primal_strided", "both_strided"]


def mods(rows: int, count: int, strided: bool, width: int = 6, grad: bool = False):
    """`count` (rows, C) modulation tensors: chunks of one (rows, width*C) buffer (row stride width*C), or contiguous."""
    if strided:
        buf = torch.randn(rows, width * C, requires_grad=grad)
        return buf, list(buf.chunk(width, dim=1))[1:count + 1]  # not the first chunk: a non-zero storage offset
    bufs = [torch.randn(rows, C, requires_grad=grad) for _ in range(count)]
    return bufs, bufs


def tokens(rows: int, strided: bool, grad: bool = False) -> torch.Tensor:
    """(rows, N, C) activations: a transposed view (strides (N*C, 1, N)) of a leaf, or a contiguous leaf."""
    if strided:
        return torch.randn(rows, C, N, requires_grad=grad).transpose(1, 2)
    return torch.randn(rows, N, C, requires_grad=grad)


def flags(layout: str) -> tuple[bool, bool, int]:
    """(primal strided, tangent strided, tangent chunk width): both strided uses a different width for the tangent."""
    return {"tangent_strided": (False, True, 6), "primal_strided": (True, False, 6),
            "both_strided": (True, True, 3)}[layout]


def leaves(*tensors):
    """The tensors gradients are taken for: the leaf buffers behind the views."""
    out = []
    for t in tensors:
        base = t._base if t._base is not None else t
        if base.requires_grad and not any(base is o for o in out):
            out.append(base)
    return out


def check(name, fused_out, ref_out, grads, grads_ref):
    (y, y_dot), (y64, y_dot64) = fused_out, ref_out
    assert_close(f"{name} y", y, y64, atol=1e-5, rtol=1e-5)
    assert_close(f"{name} y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
    for i, (g, g64) in enumerate(zip(grads, grads_ref)):
        assert_close(f"{name} grad {i}", g, g64, atol=1e-4, rtol=1e-5)


def f64(*tensors):
    return [t.detach().double() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layernorm_modulate(device, layout):
    torch.set_default_device(device)
    try:
        p_strided, t_strided, width = flags(layout)
        _, (shift, scale) = mods(B, 2, p_strided, grad=True)
        _, (shift_dot, scale_dot) = mods(KT, 2, t_strided, width)
        x = tokens(B, p_strided, grad=True)
        x_dot = tokens(KT, t_strided)
        y, y_dot = norm.layernorm_modulate_jvp(x, shift, scale, x_dot, shift_dot, scale_dot)
        w = torch.randn(B, N, C)
        wrt = leaves(x, shift, scale)
        grads = torch.autograd.grad((y * w).sum(), wrt)
        p64 = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
        y64, y_dot64 = R.layernorm_modulate_jvp_ref(*p64, *f64(x_dot, shift_dot, scale_dot))
        grads64 = torch.autograd.grad((y64 * w.double()).sum(), p64)
        # map the reference gradients onto the leaves (views of one buffer sum into it)
        check("layernorm_modulate", (y, y_dot), (y64, y_dot64), _gather(grads, wrt, (x, shift, scale)), grads64)
    finally:
        torch.set_default_device(None)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gated_residual(device, layout):
    torch.set_default_device(device)
    try:
        p_strided, t_strided, width = flags(layout)
        _, (gate,) = mods(B, 1, p_strided, grad=True)
        _, (gate_dot,) = mods(KT, 1, t_strided, width)
        x, f = tokens(B, p_strided, grad=True), tokens(B, p_strided, grad=True)
        x_dot, f_dot = tokens(KT, t_strided), tokens(KT, t_strided)
        y, y_dot = residual.gated_residual_jvp(x, gate, f, x_dot, gate_dot, f_dot)
        w = torch.randn(B, N, C)
        wrt = leaves(x, gate, f)
        grads = torch.autograd.grad((y * w).sum(), wrt)
        p64 = [t.detach().double().requires_grad_() for t in (x, gate, f)]
        y64, y_dot64 = R.gated_residual_jvp_ref(*p64, *f64(x_dot, gate_dot, f_dot))
        grads64 = torch.autograd.grad((y64 * w.double()).sum(), p64)
        check("gated_residual", (y, y_dot), (y64, y_dot64), _gather(grads, wrt, (x, gate, f)), grads64)
    finally:
        torch.set_default_device(None)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["gelu_tanh", "silu", "linear", "mlp"])
def test_elementwise_and_gemm_ops(device, layout, op):
    torch.set_default_device(device)
    try:
        p_strided, t_strided, _ = flags(layout)
        x = tokens(B, p_strided, grad=True)
        x_dot = tokens(KT, t_strided)
        hidden = 24
        params = [(torch.randn(hidden, C) * C ** -0.5).requires_grad_(), torch.randn(hidden, requires_grad=True),
                  (torch.randn(C, hidden) * hidden ** -0.5).requires_grad_(), torch.randn(C, requires_grad=True)]
        fused, ref = {
            "gelu_tanh": (lambda *a: activations.gelu_tanh_jvp(*a), lambda *a: R.gelu_tanh_jvp_ref(*a)),
            "silu": (lambda *a: activations.silu_jvp(*a), lambda *a: R.silu_jvp_ref(*a)),
            "linear": (lambda x_, xd, *p: mlp.linear_jvp(x_, p[0], p[1], xd),
                       lambda x_, xd, *p: R.linear_jvp_ref(x_, p[0], p[1], xd)),
            "mlp": (lambda x_, xd, *p: mlp.mlp_jvp(x_, *p, xd), lambda x_, xd, *p: R.mlp_jvp_ref(x_, *p, xd)),
        }[op]
        uses_params = op in ("linear", "mlp")
        params = params[:2] if op == "linear" else params
        y, y_dot = fused(x, x_dot, *params) if uses_params else fused(x, x_dot)
        w = torch.randn(y.shape)
        wrt = leaves(x) + (params if uses_params else [])
        grads = torch.autograd.grad((y * w).sum(), wrt)
        x64 = x.detach().double().requires_grad_()
        p64 = [p.detach().double().requires_grad_() for p in params]
        y64, y_dot64 = (ref(x64, x_dot.double(), *p64) if uses_params else ref(x64, x_dot.double()))
        grads64 = torch.autograd.grad((y64 * w.double()).sum(), [x64] + (p64 if uses_params else []))
        check(op, (y, y_dot), (y64, y_dot64), _gather(grads[:1], wrt[:1], (x,)) + list(grads[1:]), grads64)
    finally:
        torch.set_default_device(None)


def _gather(grads, wrt, views):
    """The gradient of each view, read back out of the gradient of the leaf buffer it is a view of."""
    by_leaf = {id(leaf): g for leaf, g in zip(wrt, grads)}
    out = []
    for v in views:
        if v._base is None:
            out.append(by_leaf[id(v)])
        else:
            g = by_leaf[id(v._base)].contiguous()  # the leaves are contiguous: the view's strides address g alike
            out.append(g.as_strided(v.shape, v.stride(), v.storage_offset()))
    return out
