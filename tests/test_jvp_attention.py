"""mfkernels.jvp_attention: SDPA calls that carry a tangent (torch.func.jvp, torch.autograd.forward_ad) go to the fused
attention, plain calls stay torch's, refused arguments fall back to torch's math attention with one warning; the
function object is torch's own outside the context (after exit, after an exception), contexts nest, and a thread
outside the context keeps torch's behaviour. References: torch.func.jvp with sdpa_kernel(MATH), float64."""
import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfkernels
import mfkernels.attention as fused_attention
from mfkernels import jvp_routing
from tests.utils import max_rel_err

ORIGINAL = F.scaled_dot_product_attention
DT = torch.float64


@pytest.fixture(autouse=True)
def fresh_warnings():
    jvp_routing._WARNED.clear()
    yield
    jvp_routing._WARNED.clear()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach the fused drop-in."""
    calls = []
    real = fused_attention.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_attention, "scaled_dot_product_attention", spy)
    return calls


def qkv(b=2, h=2, nq=5, nk=7, d=8, dtype=DT):
    """q, k, v as the transposed (B, H, N, D) views attention modules pass, and tangents with other strides."""
    q, k, v = (torch.randn(b, n, h, d, dtype=dtype).transpose(1, 2) for n in (nq, nk, nk))
    dots = tuple(torch.randn_like(x.contiguous()) for x in (q, k, v))
    return (q, k, v), dots


def attention(q, k, v, **kwargs):
    # looked up at call time, as diffusers does
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def math_jvp(primals, tangents, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda q, k, v: ORIGINAL(q, k, v, **kwargs), primals, tangents)


# ============================================================================================ the function object
def test_torch_function_is_untouched_outside_after_exit_and_after_an_exception():
    assert F.scaled_dot_product_attention is ORIGINAL
    with mfkernels.jvp_attention():
        assert F.scaled_dot_product_attention is not ORIGINAL
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(KeyError):
        with mfkernels.jvp_attention():
            with mfkernels.jvp_attention():
                raise KeyError("inside")
    assert F.scaled_dot_product_attention is ORIGINAL and not jvp_routing.is_active()


def test_contexts_nest_and_the_decorator_routes():
    (q, k, v), dots = qkv()
    with mfkernels.jvp_attention():
        with mfkernels.jvp_attention():
            pass
        assert jvp_routing.is_active()
        _, inner = torch.func.jvp(attention, (q, k, v), dots)   # still routed after the inner exit
    assert F.scaled_dot_product_attention is ORIGINAL

    @mfkernels.jvp_attention()
    def decorated():
        return torch.func.jvp(attention, (q, k, v), dots)[1]

    assert max_rel_err(decorated(), math_jvp((q, k, v), dots)[1]) < 1e-12
    assert max_rel_err(inner, math_jvp((q, k, v), dots)[1]) < 1e-12
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(ValueError, match="attention"):
        mfkernels.jvp_attention("flash")


def test_plain_calls_stay_torchs(fused_calls):
    (q, k, v), _ = qkv()
    mask = torch.rand(5, 7) > 0.3
    want = ORIGINAL(q, k, v, attn_mask=mask)
    with mfkernels.jvp_attention():
        got = attention(q, k, v, attn_mask=mask)
        with torch.no_grad():
            got_ng = attention(q, k, v, attn_mask=mask)
        # inside torch.func.jvp, a call whose inputs do not depend on the jvp inputs carries no tangent
        _, out_dot = torch.func.jvp(lambda x: x * attention(q, k, v).sum(), (torch.ones(()),), (torch.ones(()),))
    assert torch.equal(got, want) and torch.equal(got_ng, want)
    assert torch.equal(out_dot, ORIGINAL(q, k, v).sum())
    assert fused_calls == []


# ============================================================================================== what is routed
def test_torch_func_jvp_is_routed_and_equals_the_math_tangent(fused_calls):
    (q, k, v), dots = qkv()
    with pytest.raises(NotImplementedError, match="forward AD"):      # what torch's own SDPA does here
        torch.func.jvp(attention, (q, k, v), dots)
    o_ref, o_dot_ref = math_jvp((q, k, v), dots, is_causal=True)
    with mfkernels.jvp_attention():
        o, o_dot = torch.func.jvp(lambda *a: attention(*a, is_causal=True), (q, k, v), dots)
    assert len(fused_calls) == 1
    assert max_rel_err(o, o_ref) < 1e-12 and max_rel_err(o_dot, o_dot_ref) < 1e-12


def test_a_tangent_on_one_input_only_is_routed(fused_calls):
    """torch.func.jvp over k alone: q and v are closed over (plain tensors, zero tangent)."""
    (q, k, v), (_, k_dot, _) = qkv()
    with mfkernels.jvp_attention():
        _, o_dot = torch.func.jvp(lambda k_: attention(q, k_, v), (k,), (k_dot,))
    _, ref = math_jvp((q, k, v), (torch.zeros_like(q), k_dot, torch.zeros_like(v)))
    assert len(fused_calls) == 1 and max_rel_err(o_dot, ref) < 1e-12


def test_forward_ad_duals_are_routed(fused_calls):
    (q, k, v), dots = qkv()
    mask = torch.randn(1, 1, 5, 7, dtype=DT)                                      # a constant additive mask
    _, ref = math_jvp((q, k, v), dots, attn_mask=mask)
    with mfkernels.jvp_attention(), fwAD.dual_level():
        duals = [fwAD.make_dual(x, d) for x, d in zip((q, k, v), dots)]
        o_dot = fwAD.unpack_dual(attention(*duals, attn_mask=mask)).tangent
    assert len(fused_calls) == 1 and max_rel_err(o_dot, ref) < 1e-12


def test_math_attention_mode_routes_tangents_to_torchs_math(fused_calls):
    (q, k, v), dots = qkv()
    with mfkernels.jvp_attention("math"):
        _, o_dot = torch.func.jvp(attention, (q, k, v), dots)
    assert fused_calls == [] and max_rel_err(o_dot, math_jvp((q, k, v), dots)[1]) < 1e-13


# ==================================================================================== refusals and fallbacks
@pytest.mark.parametrize("argument, kwargs", [
    ("scale", {"scale": -0.3}),                                     # torch takes a negative scale, the kernels not
    ("dropout_p", {"dropout_p": 0.25}),
    ("head dim", {}),                                               # D = 300 > 256
])
def test_a_refused_argument_falls_back_to_math_with_one_warning(fused_calls, argument, kwargs):
    shape = {"d": 300} if argument == "head dim" else {}
    (q, k, v), dots = qkv(**shape)
    torch.manual_seed(7)
    _, ref = math_jvp((q, k, v), dots, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mfkernels.jvp_attention():
            torch.manual_seed(7)                                    # the same dropout mask as the reference
            _, o_dot = torch.func.jvp(lambda *a: attention(*a, **kwargs), (q, k, v), dots)
            torch.func.jvp(lambda *a: attention(*a, **kwargs), (q, k, v), dots)   # a second call: no new warning
    ours = [w for w in caught if "jvp_attention" in str(w.message)]
    assert len(ours) == 1 and str(ours[0].message).startswith(f"mfkernels.jvp_attention: {argument} ")
    assert fused_calls == [] and max_rel_err(o_dot, ref) < 1e-13


def test_a_mask_with_a_tangent_falls_back_and_keeps_its_tangent(fused_calls):
    """The fused op treats a mask as a constant: a float mask computed from the jvp inputs goes to math attention,
    whose tangent includes the mask's."""
    (q, k, v), dots = qkv()
    bias, bias_dot = torch.randn(5, 7, dtype=DT), torch.randn(5, 7, dtype=DT)
    with sdpa_kernel(SDPBackend.MATH):
        _, ref = torch.func.jvp(lambda q_, b: ORIGINAL(q_, k, v, attn_mask=b), (q, bias), (dots[0], bias_dot))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mfkernels.jvp_attention():
            _, o_dot = torch.func.jvp(lambda q_, b: attention(q_, k, v, attn_mask=b), (q, bias), (dots[0], bias_dot))
    assert [str(w.message).split(" (")[0] for w in caught if "jvp_attention" in str(w.message)] == [
        "mfkernels.jvp_attention: attn_mask cannot go to the fused attention"]
    assert fused_calls == [] and max_rel_err(o_dot, ref) < 1e-13


def test_three_dimensional_inputs_fall_back(fused_calls):
    q, k, v = (torch.randn(2, n, 8, dtype=DT) for n in (5, 7, 7))
    dots = tuple(torch.randn_like(x) for x in (q, k, v))
    _, ref = math_jvp((q, k, v), dots)
    with pytest.warns(RuntimeWarning, match="query/key/value cannot go to the fused attention"):
        with mfkernels.jvp_attention():
            _, o_dot = torch.func.jvp(attention, (q, k, v), dots)
    assert fused_calls == [] and max_rel_err(o_dot, ref) < 1e-13


def test_vmap_inside_jvp_falls_back_to_math(fused_calls):
    (q, k, v), dots = qkv()
    per_row = torch.func.vmap(lambda a, b, c: attention(a[None], b[None], c[None])[0])
    _, ref = math_jvp((q, k, v), dots)
    with pytest.warns(RuntimeWarning, match="functorch transform cannot go to the fused attention"):
        with mfkernels.jvp_attention():
            _, o_dot = torch.func.jvp(per_row, (q, k, v), dots)
    assert fused_calls == [] and max_rel_err(o_dot, ref) < 1e-13


# ==================================================================================================== threads
def test_a_thread_outside_the_context_keeps_torchs_behaviour():
    """Thread A holds the context open while thread B runs torch.func.jvp over SDPA: B gets torch's own error (the
    flash CPU kernel has no forward AD) and torch's plain output; A is routed meanwhile."""
    (q, k, v), dots = qkv()
    inside, b_done, results = threading.Event(), threading.Event(), {}

    def a():
        with mfkernels.jvp_attention():
            inside.set()
            b_done.wait(30)
            results["a"] = torch.func.jvp(attention, (q, k, v), dots)[1]

    def b():
        inside.wait(30)
        try:
            torch.func.jvp(attention, (q, k, v), dots)
            results["b"] = "routed"
        except NotImplementedError:
            results["b"] = "torch's error"
        results["b_plain"] = attention(q, k, v)
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["b"] == "torch's error" and torch.equal(results["b_plain"], ORIGINAL(q, k, v))
    assert max_rel_err(results["a"], math_jvp((q, k, v), dots)[1]) < 1e-12
    assert F.scaled_dot_product_attention is ORIGINAL
