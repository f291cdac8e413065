"""The native MeanFlow target/loss op (csrc/target.cpp, csrc/cuda/target.cu, mfkernels/target.py).

Checked against the pure-torch reference `meanflow_loss_ref` and an independent float64 formula written here.
On this CPU machine the op comes from the JIT build (cached in mfkernels/_build/; the first run compiles it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mfkernels import _ext
from mfkernels import target as mt
from mfkernels.reference import meanflow_loss_ref

ROOT = Path(__file__).resolve().parent.parent

TOL = {  # (rtol, atol as a fraction of the largest |value|) per input dtype
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-3),  # the saved residual is bf16: grad_u is rounded twice (<= 1 ulp apart)
    torch.float16: (2e-3, 1e-3),
}


@pytest.fixture(scope="module", autouse=True)
def native():
    """Every test here needs the native op on CPU: build/load it once (a failure to build is a test failure)."""
    status = mt.native_status()
    assert status.available, f"native extension not available: {status.reason}"
    return status


def inputs(batch, shape, kt, dtype=torch.float32, device="cpu", time_dtype=torch.float32, requires_grad=True):
    u = torch.randn((batch, *shape), dtype=dtype, device=device).requires_grad_(requires_grad)
    v_g = torch.randn((batch, *shape), dtype=dtype, device=device)
    du_dt = torch.randn((kt, *shape), dtype=dtype, device=device)
    t = torch.rand(batch, device=device)
    if batch:
        t[0] = 1.0  # with r[0] near 0: h near the clip bound
    r = t * torch.rand(batch, device=device)
    r[kt:] = t[kt:]  # rows after kt have r = t, as the trainer lays them out
    return u, v_g, du_dt, t.to(time_dtype), r.to(time_dtype)


def formula_f64(u, v_g, du_dt, t, r, p, eps):
    """The math of docs/design.md ('The native target/loss op') in float64, row by row, with the analytic gradient
    (independent of both kernels)."""
    batch, kt = u.shape[0], du_dt.shape[0]
    u, v_g, du_dt = u.detach().double(), v_g.double(), du_dt.double()
    per_sample, weight, grad = [], [], torch.zeros_like(u)
    for i in range(batch):
        target = v_g[i].clone()
        if i < kt:
            h = min(max(float(t[i].double() - r[i].double()), 0.0), 1.0)
            h = float(torch.tensor(h, dtype=t.dtype))  # t - r rounded to t's dtype, as torch computes it
            target = target - h * du_dt[i]
        diff = u[i] - target
        L = float((diff * diff).sum())
        w = (L + eps) ** (-p)
        per_sample.append(L)
        weight.append(w)
        grad[i] = 2.0 / batch * w * diff
    per_sample, weight = torch.tensor(per_sample, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64)
    return (weight * per_sample).mean(), per_sample, weight, grad


def close(actual, expected, dtype, what):
    rtol, atol_frac = TOL[dtype]
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    atol = atol_frac * float(expected.abs().max()) if expected.numel() else 0.0
    if dtype == torch.float16:
        atol = max(atol, 2.0**-24)  # one fp16 subnormal step (small gradients land there)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run(u, v_g, du_dt, t, r, p=1.0, eps=0.01, backend="native", grad_scale=1.0):
    u = u.detach().clone().requires_grad_(True)
    loss, per_sample, weight = mt.meanflow_loss(u, v_g, du_dt, t, r, p, eps, backend=backend)
    (loss * grad_scale).backward()
    return loss, per_sample, weight, u.grad


# ------------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("kt", ["zero", "one", "all"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 8, 8), (1,), (2, 100, 91)], ids=["3x5x7", "4x8x8", "1", "2x100x91"])
def test_matches_reference_and_formula(kt, shape):
    batch = 6
    kt = {"zero": 0, "one": 1, "all": batch}[kt]
    args = inputs(batch, shape, kt)
    loss, per_sample, weight, grad = run(*args)
    ref_loss, ref_L, ref_w, ref_grad = run(*args, backend="torch")
    f_loss, f_L, f_w, f_grad = formula_f64(*args, 1.0, 0.01)
    for name, a, b, c in (("loss", loss, ref_loss, f_loss), ("per_sample", per_sample, ref_L, f_L),
                          ("weight", weight, ref_w, f_w), ("grad_u", grad, ref_grad, f_grad)):
        close(a, b, torch.float32, f"{name} vs reference")
        close(a, c, torch.float32, f"{name} vs float64 formula")
    assert loss.dtype == per_sample.dtype == weight.dtype == torch.float32 and loss.shape == ()
    assert per_sample.shape == weight.shape == (batch,) and grad.dtype == torch.float32
    assert not per_sample.requires_grad and not weight.requires_grad and loss.requires_grad


@pytest.mark.parametrize("p,eps", [(1.0, 0.01), (0.75, 1e-3), (0.0, 0.01), (0.5, 0.0)])
def test_weighting(p, eps):
    args = inputs(5, (4, 6), 3)
    got = run(*args, p=p, eps=eps)
    want = formula_f64(*args, p, eps)
    for name, a, b in zip(("loss", "per_sample", "weight", "grad_u"), got, want):
        close(a, b, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kt", [0, 1, 4])
def test_dtypes(dtype, kt):
    args = inputs(4, (3, 16, 16), kt, dtype=dtype, time_dtype=dtype if dtype != torch.float16 else torch.float32)
    loss, per_sample, weight, grad = run(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == per_sample.dtype == weight.dtype == acc and grad.dtype == dtype
    f_loss, f_L, f_w, f_grad = formula_f64(*args, 1.0, 0.01)
    # values: accumulated in fp32 (fp64) from the same inputs, so as close as the fp32 (fp64) path
    for name, a, b in (("loss", loss, f_loss), ("per_sample", per_sample, f_L), ("weight", weight, f_w)):
        close(a, b, acc, name)
    close(grad, f_grad, dtype, "grad_u vs float64 formula")
    if dtype != torch.float64:  # the reference computes in fp32 whatever the input (fp64 is ours only)
        ref_loss, ref_L, ref_w, ref_grad = run(*args, backend="torch")
        close(loss, ref_loss, torch.float32, "loss vs reference")
        close(per_sample, ref_L, torch.float32, "per_sample vs reference")
        close(grad, ref_grad, dtype, "grad_u vs reference")


def test_fp32_gradient_is_bitwise_the_formula():
    """grad_u is formed in the reference autograd's order, (g / B) w times 2 d with d = u - (v - h du), so given the
    op's own w it is exact (w itself differs from the reference's in the last bit: another summation order)."""
    u, v_g, du_dt, t, r = inputs(8, (4, 8, 8), 2)
    loss, _, weight, grad = run(u, v_g, du_dt, t, r, grad_scale=3.0)
    target = v_g.clone()
    target[:2] -= (t[:2] - r[:2]).clamp(0, 1).reshape(2, 1, 1, 1) * du_dt
    want = ((torch.tensor(3.0) / 8) * weight).reshape(8, 1, 1, 1) * (2 * (u.detach() - target))
    assert torch.equal(grad, want)


def test_residual_output_and_grad_scaling():
    u, v_g, du_dt, t, r = inputs(5, (7, 9), 2)
    loss, per_sample, weight, residual = torch.ops.mfkernels.meanflow_loss(u.detach(), v_g, du_dt, t, r, 1.0, 0.01)
    h = (t[:2] - r[:2]).clamp(0, 1).reshape(2, 1, 1)
    target = v_g.clone()
    target[:2] -= h * du_dt
    torch.testing.assert_close(residual, u.detach() - target, rtol=0, atol=0)  # every element written, exactly
    got = run(u, v_g, du_dt, t, r, grad_scale=3.5)[3]
    want = run(u, v_g, du_dt, t, r, backend="torch", grad_scale=3.5)[3]
    close(got, want, torch.float32, "grad with grad_out 3.5")


def test_stop_gradient_and_no_grad():
    u, v_g, du_dt, t, r = inputs(4, (3, 4), 2)
    v_g.requires_grad_(True)
    du_dt.requires_grad_(True)
    loss, _, _ = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
    loss.backward()
    assert u.grad is not None and v_g.grad is None and du_dt.grad is None
    with torch.no_grad():
        loss2, per_sample2, _ = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
    assert torch.equal(loss2, loss.detach())
    out = torch.ops.mfkernels.meanflow_loss(u.detach(), v_g.detach(), du_dt.detach(), t, r, 1.0, 0.01, False)
    assert out[3].numel() == 0 and torch.equal(out[1], per_sample2)  # nothing saved when not asked to
    loss3 = torch.ops.mfkernels.meanflow_loss(u, v_g.detach(), du_dt.detach(), t, r, 1.0, 0.01, False)[0]
    with pytest.raises(RuntimeError, match="save_residual=False"):
        loss3.backward()


def test_non_contiguous_inputs():
    batch, kt = 6, 3
    u_full = torch.randn(batch, 8, 5)
    u = u_full.transpose(1, 2).requires_grad_(True)         # (6, 5, 8), transposed
    v_g = torch.randn(batch, 5, 16)[:, :, ::2]               # strided last dim
    du_dt = torch.randn(5, 8, kt).permute(2, 0, 1)           # (3, 5, 8), permuted
    t = torch.rand(2 * batch)[::2]
    r = (t * 0.5).contiguous()
    assert not (u.is_contiguous() or v_g.is_contiguous() or du_dt.is_contiguous() or t.is_contiguous())
    got = run(u, v_g, du_dt, t, r)
    want = run(u.contiguous(), v_g.contiguous(), du_dt.contiguous(), t.contiguous(), r)
    for name, a, b in zip(("loss", "per_sample", "weight", "grad_u"), got, want):
        close(a, b, torch.float32, name)


def test_time_dtypes_round_like_torch():
    """t, r in bf16: t - r is rounded to bf16 before the clip, as the reference's (t - r).float() does."""
    args = inputs(6, (4, 5), 6, time_dtype=torch.bfloat16)
    got = run(*args)
    want = run(*args, backend="torch")
    for name, a, b in zip(("loss", "per_sample", "weight", "grad_u"), got, want):
        close(a, b, torch.float32, name)


@pytest.mark.gpu
def test_empty_and_deterministic(device):
    """B = 0 and empty samples (the CUDA forward's finalize-only path), and bit-identical repeated calls: several
    chunks per sample (CPU: tasks over both threads; CUDA: the last block to finish, whichever it is, finalizes in a
    fixed order), and more samples than the CUDA finalizing block has threads."""
    u, v_g, du_dt, t, r = inputs(0, (3,), 0, device=device)
    loss, per_sample, weight = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
    assert per_sample.shape == (0,) and torch.isnan(loss)  # the mean over no rows (the reference cannot do B = 0)
    u, v_g, du_dt, t, r = inputs(3, (0, 4), 2, device=device)  # empty samples: L = 0, w = eps^-p, loss = 0
    loss, per_sample, weight = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
    assert float(loss.detach()) == 0.0 and torch.equal(per_sample.cpu(), torch.zeros(3))
    assert torch.allclose(weight.cpu(), torch.full((3,), 100.0))
    for batch, shape, kt in ((16, (2, 130, 130), 4), (300, (4, 8, 8), 75)):
        args = inputs(batch, shape, kt, device=device)
        first, second = run(*args), run(*args)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        f_loss, f_L, _, _ = formula_f64(*(a.detach().cpu() for a in args), 1.0, 0.01)
        close(first[0].cpu(), f_loss, torch.float32, "loss")
        close(first[1].cpu(), f_L, torch.float32, "per_sample")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_isa_copies_agree_bitwise(monkeypatch, dtype):
    """The AVX2 copy of the CPU loops (x86-64) and the baseline copy: same lanes, same order, same bits."""
    u, v_g, du_dt, t, r = inputs(5, (3, 40, 41), 2, dtype=dtype)
    out = {}
    for isa in ("baseline", "auto"):
        monkeypatch.setenv("MFKERNELS_CPU_ISA", isa)
        loss, per_sample, weight, residual = torch.ops.mfkernels.meanflow_loss(u.detach(), v_g, du_dt, t, r, 1.0, 0.01)
        grad = torch.ops.mfkernels.meanflow_loss_backward(torch.tensor(0.5, dtype=loss.dtype), residual, weight)
        out[isa] = (loss, per_sample, weight, residual, grad)
    assert all(torch.equal(a, b) for a, b in zip(out["baseline"], out["auto"]))


# --------------------------------------------------------------------------------------- torch.library machinery
@pytest.mark.parametrize("dtype,kt,save", [(torch.float32, 2, True), (torch.bfloat16, 0, True),
                                           (torch.float64, 4, True), (torch.float32, 1, False)])
def test_opcheck(dtype, kt, save):
    u, v_g, du_dt, t, r = inputs(4, (3, 5), kt, dtype=dtype, requires_grad=save)
    torch.library.opcheck(torch.ops.mfkernels.meanflow_loss.default, (u, v_g, du_dt, t, r, 0.75, 1e-3, save))
    residual, weight = torch.randn(4, 3, 5, dtype=dtype), torch.rand(4, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.mfkernels.meanflow_loss_backward.default,
                          (torch.tensor(2.0, dtype=weight.dtype), residual, weight))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    def step(u, v_g, du_dt, t, r):
        loss, per_sample, weight = mt.meanflow_loss(u, v_g * 1.0, du_dt, t, r, 0.75, 1e-3)
        return loss * 2.0, per_sample.sum(), weight

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    u, v_g, du_dt, t, r = inputs(6, (4, 6, 6), 2)
    u2 = u.detach().clone().requires_grad_(True)
    eager = step(u, v_g, du_dt, t, r)
    eager[0].backward()
    got = compiled(u2, v_g, du_dt, t, r)
    got[0].backward()
    for name, a, b in zip(("loss", "per_sample sum", "weight", "grad_u"), (*got, u2.grad), (*eager, u.grad)):
        close(a, b, torch.float32, f"compiled ({backend}) {name}")


# ------------------------------------------------------------------------------------------------------ bad input
def _bad(**overrides):
    args = dict(zip(("u", "v_g", "du_dt", "t", "r"), inputs(4, (3, 5), 2)))
    args.update(overrides)
    return args


BAD_INPUTS = [
    ("v_g shape", lambda: _bad(v_g=torch.randn(4, 3, 6)), ValueError,
     r"v_g has shape \(4, 3, 6\) but u has shape \(4, 3, 5\)"),
    ("du_dt trailing shape", lambda: _bad(du_dt=torch.randn(2, 5, 3)), ValueError,
     r"du_dt has shape \(2, 5, 3\); expected \('kt', 3, 5\)"),
    ("du_dt rank", lambda: _bad(du_dt=torch.randn(2, 15)), ValueError, r"du_dt has shape \(2, 15\)"),
    ("kt > B", lambda: _bad(du_dt=torch.randn(5, 3, 5)), ValueError, r"tangent batch 5 > primal batch 4.*\[0, 4\]"),
    ("t shape", lambda: _bad(t=torch.rand(5)), ValueError, r"t must have shape \(B,\) = \(4,\).*shape \(5,\)"),
    ("r shape", lambda: _bad(r=torch.zeros(4, 1)), ValueError, r"r must have shape \(B,\) = \(4,\).*shape \(4, 1\)"),
    ("integer u", lambda: _bad(u=torch.ones(4, 3, 5, dtype=torch.int64)), TypeError,
     r"u must be a floating tensor .*dtype torch.int64"),
    ("integer t", lambda: _bad(t=torch.ones(4, dtype=torch.int32)), TypeError, r"t must be a floating tensor"),
    ("v_g dtype", lambda: _bad(v_g=torch.randn(4, 3, 5, dtype=torch.float64)), TypeError,
     r"v_g has dtype torch.float64 but u has dtype torch.float32"),
    ("du_dt dtype", lambda: _bad(du_dt=torch.randn(2, 3, 5, dtype=torch.bfloat16)), TypeError,
     r"du_dt has dtype torch.bfloat16 but u has dtype torch.float32"),
    ("r dtype", lambda: _bad(r=torch.zeros(4, dtype=torch.float64)), TypeError,
     r"r has dtype torch.float64 but t has dtype torch.float32"),
    ("t < r", lambda: _bad(t=torch.tensor([0.9, 0.8, 0.3, 0.5]), r=torch.tensor([0.1, 0.2, 0.4, 0.5])), ValueError,
     r"t < r in row 2 \(t\[2\] = 0.3, r\[2\] = 0.4\)"),
    ("v_g device", lambda: _bad(v_g=torch.randn(4, 3, 5, device="meta")), ValueError,
     r"v_g is on meta but u is on cpu"),
    ("t device", lambda: _bad(t=torch.rand(4, device="meta")), ValueError, r"t is on meta but u is on cpu"),
    ("0-d u", lambda: _bad(u=torch.tensor(1.0)), ValueError, r"u must have a batch dim"),
    ("not a tensor", lambda: _bad(v_g=[1.0, 2.0]), TypeError, r"v_g must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_named(case, backend):
    _, make, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        mt.meanflow_loss(**make(), backend=backend)


def test_bad_scalars_and_backend():
    args = _bad()
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0; got -0.1"):
        mt.meanflow_loss(**args, eps=-0.1)
    with pytest.raises(ValueError, match=r"p must be a finite number; got nan"):
        mt.meanflow_loss(**args, p=float("nan"))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'native', 'torch'\); got 'triton'"):
        mt.meanflow_loss(**args, backend="triton")


C_BAD = [  # the C++ checks, for direct calls of torch.ops.mfkernels.meanflow_loss
    (lambda: _bad(v_g=torch.randn(4, 3, 6)), r"v_g has shape \[4, 3, 6\] but u has shape \[4, 3, 5\]"),
    (lambda: _bad(du_dt=torch.randn(2, 5, 3)), r"du_dt has shape \[2, 5, 3\]; expected \(kt, \[3, 5\]\)"),
    (lambda: _bad(du_dt=torch.randn(5, 3, 5)), r"du_dt has tangent batch 5 > batch 4 of u"),
    (lambda: _bad(t=torch.rand(3)), r"t must have shape \(B,\) = \(4,\); got shape \[3\]"),
    (lambda: _bad(u=torch.ones(4, 3, 5, dtype=torch.int32)), r"u must be a floating tensor"),
    (lambda: _bad(v_g=torch.randn(4, 3, 5).half()), r"v_g has dtype Half but u has dtype Float"),
    (lambda: _bad(r=torch.zeros(4).double()), r"r has dtype Double but t has dtype Float"),
    (lambda: _bad(t=torch.tensor([0.9, 0.8, 0.3, 0.5]), r=torch.tensor([0.1, 0.2, 0.4, 0.5])),
     r"t < r in row 2 \(t\[2\] = 0.3, r\[2\] = 0.4"),
]  # (mixed cpu / meta tensors cannot reach the C++ device check: the dispatcher sends them to the fake kernel)


@pytest.mark.parametrize("i", range(len(C_BAD)))
def test_cpp_checks(i):
    make, pattern = C_BAD[i]
    a = make()
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mfkernels.meanflow_loss(a["u"], a["v_g"], a["du_dt"], a["t"], a["r"], 1.0, 0.01)


# --------------------------------------------------------------------------------------------- CUDA (or CPU) run
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch,shape,kt", [(8, (4, 32, 32), 2), (5, (3, 5, 7), 5), (3, (2, 100, 91), 0),
                                            (4, (9,), 1), (2, (3, 128, 130), 1)])
def test_device_kernel_matches_reference(device, dtype, batch, shape, kt):
    """On CUDA: the CUDA kernel (vector path for aligned shapes, scalar path for 3x5x7 and 9, several blocks per
    sample for the large ones). On CPU: the CPU kernel."""
    args = inputs(batch, shape, kt, dtype=dtype, device=device)
    loss, per_sample, weight, grad = run(*args)
    f_loss, f_L, f_w, f_grad = formula_f64(*(a.cpu() for a in args), 1.0, 0.01)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.device.type == per_sample.device.type == grad.device.type == torch.device(device).type
    for name, a, b in (("loss", loss, f_loss), ("per_sample", per_sample, f_L), ("weight", weight, f_w)):
        close(a, b, acc, f"{device} {name}")
    close(grad, f_grad, dtype, f"{device} grad_u")
    if dtype != torch.float64:
        ref = run(*args, backend="torch")
        close(loss, ref[0], torch.float32, f"{device} loss vs reference")
        close(grad, ref[3], dtype, f"{device} grad_u vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_clip_of_t_minus_r(device, backend):
    """u_tgt = v_g - clip(t - r, 0, 1) du_dt, both bounds hit: rows with t - r > 1 (t > 1 or r < 0) get h = 1, a row
    with t - r = 1 exactly, and (where t < r is not refused: the reference, and the CUDA kernel without check_times)
    a row with t < r gets h = 0. Without the clip these rows' targets differ by (t - r - 1) du_dt: checked below."""
    batch, kt = 7, 6
    u, v_g, du_dt, _, _ = inputs(batch, (3, 5), kt, device=device)
    t = torch.tensor([1.0, 1.5, 0.7, 1.0, 0.6, 0.5, 0.4], device=device)
    r = torch.tensor([-0.5, 0.2, -0.6, 0.0, 0.1, 0.5, 0.4], device=device)  # h: 1.5, 1.3, 1.3, 1, 0.5, 0; r = t after kt
    lower = backend == "torch" or torch.device(device).type == "cuda"
    if lower:
        r[5] = 0.7  # t < r: h = clip(-0.2) = 0
    loss, per_sample, weight = mt.meanflow_loss(u, v_g, du_dt, t, r, backend=backend, check_times=False)
    f_loss, f_L, f_w, _ = formula_f64(*(a.cpu() for a in (u, v_g, du_dt, t, r)), 1.0, 0.01)
    close(per_sample, f_L, torch.float32, f"{backend} per_sample with clipped rows")
    close(loss, f_loss, torch.float32, f"{backend} loss with clipped rows")
    h = (t - r)[:kt].double().cpu().reshape(kt, 1, 1)
    diff = u.detach().double().cpu() - v_g.double().cpu()
    diff[:kt] += h * du_dt.double().cpu()
    unclipped = diff.square().sum((1, 2))  # the same loss without the clip
    clipped_rows = [i for i in range(batch) if not torch.isclose(unclipped[i], f_L[i], rtol=1e-3)]
    assert clipped_rows == ([0, 1, 2, 5] if lower else [0, 1, 2]), "the inputs must exercise the clip"


@pytest.mark.gpu
def test_device_misaligned_and_time_check(device):
    """Storage offsets that break 16-byte alignment take the scalar path; check_times=True refuses t < r."""
    def misaligned(*shape):  # contiguous, but 4 bytes past an aligned address (.contiguous() keeps it there)
        numel = 1
        for s in shape:
            numel *= s
        return torch.randn(numel + 1, device=device)[1:].view(shape)

    u = misaligned(4, 2, 64).requires_grad_(True)
    v_g, du_dt = misaligned(4, 2, 64), misaligned(3, 2, 64)
    assert u.data_ptr() % 16 != 0 and v_g.data_ptr() % 16 != 0
    t = torch.rand(4, device=device)
    r = t * 0.5
    loss, per_sample, weight = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
    loss.backward()
    u_ref = u.detach().clone().requires_grad_(True)
    ref = meanflow_loss_ref(u_ref, v_g, du_dt, t, r)
    ref[0].backward()
    for name, a, b in zip(("loss", "per_sample", "weight", "grad_u"), (loss, per_sample, weight, u.grad),
                          (*ref, u_ref.grad)):
        close(a, b, torch.float32, f"{device} misaligned {name}")
    r_bad = r.clone()
    r_bad[1] = t[1] + 0.1
    with pytest.raises(ValueError, match=r"t < r in row 1"):
        mt.meanflow_loss(u, v_g, du_dt, t, r_bad, backend="native", check_times=True)


# ------------------------------------------------------------------------------------------- loading + fallback
def test_fallback_warns_once_and_matches_reference(monkeypatch):
    broken = _ext.NativeStatus(False, None, False, "simulated: the JIT build failed (no compiler)")
    monkeypatch.setattr(_ext, "status", lambda: broken)
    monkeypatch.setattr(mt, "_warned", set())
    args = inputs(5, (3, 4), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(*args, backend="auto")
        got_again = run(*args, backend="auto")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "falling back to the pure-torch reference" in messages[0] and "simulated: the JIT build failed" in messages[0]
    assert not mt.native_available("cpu")
    want = run(*args, backend="torch")
    for a, b, c in zip(got, got_again, want):
        assert torch.equal(a, c) and torch.equal(b, c)
    with pytest.raises(RuntimeError, match=r"backend='native' is not available for cpu tensors: simulated"):
        mt.meanflow_loss(*args, backend="native")


def test_fallback_under_torch_compile(monkeypatch):
    broken = _ext.NativeStatus(False, None, False, "simulated: no extension")
    monkeypatch.setattr(_ext, "status", lambda: broken)
    monkeypatch.setattr(mt, "_warned", set())
    args = inputs(4, (3, 4), 2)
    compiled = torch.compile(lambda *a: mt.meanflow_loss(*a)[0], fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="simulated: no extension"):
        got = compiled(*args)
    torch.testing.assert_close(got, meanflow_loss_ref(*args)[0])


def test_loader_modes(monkeypatch):
    monkeypatch.setattr(_ext, "_status", None)
    monkeypatch.setenv("MFKERNELS_NATIVE", "off")
    status = _ext.status()
    assert not status.available and "MFKERNELS_NATIVE=off" in status.reason
    monkeypatch.setattr(_ext, "_status", None)
    monkeypatch.setenv("MFKERNELS_NATIVE", "sometimes")
    assert "is not one of auto, prebuilt, jit, off" in _ext.status().reason
    monkeypatch.setattr(_ext, "_status", None)
    monkeypatch.setenv("MFKERNELS_NATIVE", "auto")
    status = _ext.status()  # already registered in this process
    assert status.available and status.source == "preloaded"
    assert mt.native_available("cpu") and not mt.native_available("xpu")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.full
def test_import_is_lazy_and_jit_cache_loads():
    """Importing does not load the library; the first call loads the cached JIT build (MFKERNELS_NATIVE=jit)."""
    code = (
        "import torch, mfkernels, mfkernels.target as mt, mfkernels._ext as e\n"
        "assert not hasattr(torch.ops.mfkernels, 'meanflow_loss') and e._status is None, 'loaded at import'\n"
        "s = mt.native_status()\n"
        "print(s.source, s.available, s.path)\n"
    )
    out = _python(code, MFKERNELS_NATIVE="jit")
    assert out.returncode == 0, out.stderr[-3000:]
    source, available, path = out.stdout.split()
    assert (source, available) == ("jit", "True") and path.endswith("mfkernels_native_cpu.so")


def test_failed_jit_build_falls_back_with_one_warning(tmp_path):
    """A real failed build (a compiler that errors), no prebuilt module: one warning, the reference's results."""
    bad_cxx = tmp_path / "bad-cxx"
    bad_cxx.write_text('#!/bin/sh\necho "simulated compiler failure" >&2\nexit 1\n')
    bad_cxx.chmod(0o755)
    code = (
        "import warnings, torch, mfkernels.target as mt\n"
        "from mfkernels.reference import meanflow_loss_ref\n"
        "u, v, du = torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 3)\n"
        "t = torch.tensor([0.9, 0.8, 0.5, 0.5]); r = torch.tensor([0.1, 0.2, 0.5, 0.5])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = mt.meanflow_loss(u, v, du, t, r); b = mt.meanflow_loss(u, v, du, t, r)\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert torch.equal(a[0], meanflow_loss_ref(u, v, du, t, r)[0]) and torch.equal(a[0], b[0])\n"
        "print(msgs[0])\n"
    )
    out = _python(code, MFKERNELS_NATIVE="jit", MFKERNELS_BUILD_DIR=str(tmp_path / "build"), CXX=str(bad_cxx))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "falling back to the pure-torch reference" in out.stdout and "JIT build failed" in out.stdout


@pytest.mark.full
def test_jit_builds_from_scratch(tmp_path):
    out = _python("import mfkernels.target as mt; s = mt.native_status(); print(s.source, s.path)",
                  MFKERNELS_NATIVE="jit", MFKERNELS_BUILD_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    source, path = out.stdout.split()
    assert source == "jit" and Path(path).is_file() and Path(path).is_relative_to(tmp_path)


@pytest.mark.full
def test_setup_py_builds_the_prebuilt_module(tmp_path):
    """setup.py build_ext -> mfkernels/_C*.so, which the loader imports first (source 'prebuilt')."""
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    built = list((tmp_path / "lib" / "mfkernels").glob("_C*.so"))
    assert len(built) == 1, list((tmp_path / "lib").rglob("*"))
    shutil.copytree(ROOT / "mfkernels", tmp_path / "pkg" / "mfkernels", ignore=shutil.ignore_patterns("_build", "_C*"))
    shutil.copy(built[0], tmp_path / "pkg" / "mfkernels")
    code = "import mfkernels.target as mt; s = mt.native_status(); print(s.source, s.path)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "MFKERNELS_NATIVE": "prebuilt"})
    assert out.returncode == 0, out.stderr[-3000:]
    source, path = out.stdout.split()
    assert source == "prebuilt" and Path(path).parent == tmp_path / "pkg" / "mfkernels"


@pytest.mark.full
def test_setup_py_survives_a_failed_build(tmp_path):
    """A compiler that fails: the build warns and goes on without the extension (MFKERNELS_BUILD_EXT=1: it fails)."""
    bad_cxx = tmp_path / "bad-cxx"
    bad_cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-c" ] && { echo "simulated compile error" >&2; '
                       'exit 1; }; done\nexec g++ "$@"\n')
    bad_cxx.chmod(0o755)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
           str(tmp_path / "tmp")]
    env = {**os.environ, "CXX": str(bad_cxx)}
    try:
        soft = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        hard = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**env, "MFKERNELS_BUILD_EXT": "1"})
    finally:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert soft.returncode == 0, soft.stderr[-3000:]
    assert "WARNING: building the native extension failed" in soft.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))
    assert hard.returncode != 0


# ------------------------------------------------------------------------------------------------ nvcc check
NVCC = shutil.which("nvcc")
CHECK = ROOT / "tools" / "check_cuda_compile.sh"


@pytest.mark.full
@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc():
    out = subprocess.run(["bash", str(CHECK)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "NVCC_STD": "c++17", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr[-5000:]
    assert "ok" in out.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_nvcc_check_fails_on_a_syntax_error(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.0f }\n")  # missing ';'
    out = subprocess.run(["bash", str(CHECK), str(broken)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NVCC_STD": "c++17", "PYTHON": sys.executable})
    assert out.returncode != 0 and "FAIL" in out.stderr
