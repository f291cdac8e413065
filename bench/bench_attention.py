"""Benchmark: fused attention forward + JVP, its backward and the tangent backward against torch's attention paths.

    python bench/bench_attention.py --out results.json [--quick] [--causal off|on|both] [--cases dense,keypad30,gqa]
        [--dims 64,128,72] [--variants default,padded,tma,persistent] [--providers fused_fwd_jvp,sdpa_flash_fwd,...]

On CUDA every provider is timed on the same fresh random inputs, in one run, with CUDA events around each call (L2
flushed before each, at least MIN_RUNS timed runs and about 200 ms of them): every row records n_runs, the median and
the 20th / 80th percentiles, min and max. Cases (`case` field; the provider name carries the case as a suffix):

  dense     (B, H, N, D), no mask (today's rows)
    fused_fwd_jvp     mfkernels attention_jvp with a tangent on every row (kt = B)        FLOPs 12 N^2 D a head
    fused_fwd         mfkernels attention_jvp with kt = 0 (plain flash forward)            4 N^2 D
    math_jvp          torch.func.jvp over F.scaled_dot_product_attention, MATH backend     12 N^2 D (OOM recorded)
    reference_jvp     mfkernels.reference.attention_jvp_ref (pure torch closed form)       12 N^2 D (OOM recorded)
    peer_fwd_jvp      jvp_flash_attention (PyPI) under torch.func.jvp, when importable     12 N^2 D
    sdpa_default_fwd  F.scaled_dot_product_attention, default backend (not forced)         4 N^2 D
    sdpa_flash_fwd    forced SDPBackend.FLASH_ATTENTION (FlashAttention-2)                 4 N^2 D
    sdpa_cudnn_fwd    forced SDPBackend.CUDNN_ATTENTION                                    4 N^2 D
    fused_bwd         mfkernels flash backward (from the saved LSE)                        10 N^2 D
    sdpa_flash_bwd    backward of the forced flash forward                                 10 N^2 D (2.5 x forward)
    sdpa_cudnn_bwd    backward of the forced cuDNN forward                                 10 N^2 D
    fused_tangent_bwd backward of a loss of (o, o_dot) (attention_jvp(tangent_grad=True))  30 N^2 D (useful)
    math_tangent_bwd  the same through torch.func.jvp over math SDPA (reverse-over-forward) 30 N^2 D (OOM recorded)
    tvm_fwd_jvp       TVM's own kernel (lumalabs/tvm jvp_utils.sdpa_jvp) under torch.func.jvp  12 N^2 D
    tvm_tangent_bwd   the backward of a loss of (o, o_dot) through TVM's kernels               30 N^2 D
  keypad30  a bool key-padding mask (B, 1, 1, N): the last 30% of each row's keys padded (FLOPs counted dense)
    fused_fwd_jvp, fused_fwd, math_jvp, peer_fwd_jvp (its mask must be a full (B, H, N, N) tensor: materialised),
    sdpa_default_fwd, sdpa_efficient_fwd / _bwd (forced EFFICIENT_ATTENTION: torch's masked fused kernel),
    sdpa_cudnn_fwd / _bwd, fused_bwd, fused_tangent_bwd
  gqa       k, v with H / 4 heads (enable_gqa=True)
    fused_fwd_jvp, fused_fwd, math_jvp, sdpa_flash_fwd / _bwd, sdpa_cudnn_fwd / _bwd, fused_bwd, fused_tangent_bwd

Variants (--variants) re-time the fused providers with one of the kernels' A/B switches on (environment
variables, read at each launch); a row's `variant` field names it and its provider name carries `_<variant>` before
the case suffix; fused_fwd_jvp rows of a variant add max_abs_diff_vs_default (o_dot against the default kernels):

  default     the kernels as they ship (head dims 72 / 80 / 96 / 112 split into power-of-two pieces in the forward
              kernels and the flash backward: _pieces.py)
  padded      MFKERNELS_ATTN_PAD_D=1: the head dim padded to a power of two (what the split replaces); only at
              head dims that are not powers of two (elsewhere the tiles are the same) -- every fused provider but
              fused_tangent_bwd (the tangent backward runs padded tiles anyway)
  tma         MFKERNELS_ATTN_TMA=1: K / V tiles through tensor descriptors (TMA) -- forward providers only
  persistent  MFKERNELS_ATTN_PERSISTENT=1: one program per SM walking the tiles -- forward providers only

The summary's split / padded ratios are the split's D = 72 target (forward + JVP <= 0.75x padded, backward no slower);
the lever ratios say whether a lever is worth turning on by default (mfkernels/attention/_levers.py). Head dims that do
not divide 2048 get H = 2048 // D heads (D = 72: 28 heads, model width 2016).

A backend that refuses a case (FA2 takes no mask, cuDNN's support depends on the version) is a row with its error.
Causal counts half of each (keypad30 is never causal: torch refuses a mask with is_causal). Every row also has the
peak memory the call adds (peak_mem_mb, CUDA only); fused_fwd_jvp rows add max_abs_diff_vs_math (o_dot against
math_jvp, a sanity check). The "summary" (in meta) lists the ratios: fused forward + JVP over SDPA flash and cuDNN
forward (target over flash <= 2.0; the Hopper targets: <= 1.75 at D 64, <= 1.85 at D 128), math JVP over fused
(>= 10 at N = 2048), fused backward over flash and cuDNN
backward (<= 1.2 over flash), the key-padding mask over the unmasked fused forward + JVP (<= 1.10), the tangent
backward over the flash backward, the peer over the fused kernel.

The peer kernel: `pip download jvp_flash_attention --no-deps -d .whl` (repo root, git-ignored) where pip works; this
script imports it from site-packages or straight from that wheel (pure Python). Not importable: one row per shape with
the reason, never silently absent.

TVM's kernel (the tvm_* providers): its license (CC BY-NC-SA 4.0) keeps it out of this repository; put a copy of
lumalabs/tvm's `jvp_utils/` folder at bench/external/tvm/jvp_utils/ (git-ignored; `carry` it to a GPU machine), e.g.
`git clone https://github.com/lumalabs/tvm /tmp/tvm && mkdir -p bench/external/tvm && cp -r /tmp/tvm/jvp_utils
bench/external/tvm/`. It takes no mask, no causal attention and no GQA (dense case only) and needs jaxtyping; its
table's shape is B 1, H 24, N 16384, D 128 (`--batch 1 --heads 24 --ns 16384 --dims 128`). Not importable: rows with
the reason.

Without CUDA it runs the Triton interpreter on tiny shapes (N 32 and 64; head dims 32 and 64 unless --dims is given),
timed with time.perf_counter over one run after a warm-up: a dry run of the code paths, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.common import is_oom, peak_memory_mb, write_results  # noqa: E402
from mfkernels import reference  # noqa: E402
from mfkernels.attention import attention_jvp  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CASES = ("dense", "keypad30", "gqa")
PAD_FRACTION = 0.3
GQA_GROUP = 4
FLOPS_PER_HEAD = {  # in units of N^2 D (non-causal; causal counts half)
    "fused_fwd_jvp": 12, "math_jvp": 12, "reference_jvp": 12, "peer_fwd_jvp": 12,
    "fused_fwd": 4, "sdpa_default_fwd": 4, "sdpa_flash_fwd": 4, "sdpa_cudnn_fwd": 4, "sdpa_efficient_fwd": 4,
    "fused_bwd": 10, "sdpa_flash_bwd": 10, "sdpa_cudnn_bwd": 10, "sdpa_efficient_bwd": 10,
    "fused_tangent_bwd": 30, "math_tangent_bwd": 30, "tvm_fwd_jvp": 12, "tvm_tangent_bwd": 30,
}
PROVIDERS = {
    "dense": ["fused_fwd_jvp", "fused_fwd", "math_jvp", "reference_jvp", "peer_fwd_jvp", "sdpa_default_fwd",
              "sdpa_flash_fwd", "sdpa_cudnn_fwd", "fused_bwd", "sdpa_flash_bwd", "sdpa_cudnn_bwd", "fused_tangent_bwd",
              "math_tangent_bwd", "tvm_fwd_jvp", "tvm_tangent_bwd"],
    "keypad30": ["fused_fwd_jvp", "fused_fwd", "math_jvp", "peer_fwd_jvp", "sdpa_default_fwd", "sdpa_efficient_fwd",
                 "sdpa_cudnn_fwd", "fused_bwd", "sdpa_efficient_bwd", "sdpa_cudnn_bwd", "fused_tangent_bwd"],
    "gqa": ["fused_fwd_jvp", "fused_fwd", "math_jvp", "sdpa_flash_fwd", "sdpa_cudnn_fwd", "fused_bwd",
            "sdpa_flash_bwd", "sdpa_cudnn_bwd", "fused_tangent_bwd"],
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
MIN_RUNS, TARGET_MS, MAX_RUNS = 10, 200.0, 500
CPU_RUNS = 1
# A/B switches of the fused kernels (read at each launch): environment, and which fused providers each one changes
VARIANTS = {"default": {}, "padded": {"MFKERNELS_ATTN_PAD_D": "1"}, "tma": {"MFKERNELS_ATTN_TMA": "1"},
            "persistent": {"MFKERNELS_ATTN_PERSISTENT": "1"}}
FORWARD_ONLY_VARIANTS = {"tma", "persistent"}  # levers of the forward kernel (_levers.py)
CPU_FIRST_SHAPE_ONLY = {"fused_tangent_bwd", "math_tangent_bwd", "peer_fwd_jvp", "reference_jvp", "tvm_fwd_jvp",
                        "tvm_tangent_bwd"}
TVM_DIR = os.path.join(REPO, "bench", "external", "tvm")  # git-ignored: a copy of lumalabs/tvm's jvp_utils/


# ------------------------------------------------------------------------------------------------------ timing
def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], "ms_min": min(times),
            "ms_max": max(times), "n_runs": len(times)}


def _time(fn, grad_to_none=None) -> dict:
    """Median and spread of fn() over n_runs timed runs (CUDA: events around each call, L2 flushed before each, at
    least MIN_RUNS runs and about TARGET_MS of them; CPU: CPU_RUNS runs after 1 warm-up)."""
    reset = lambda: [setattr(t, "grad", None) for t in grad_to_none or ()]  # noqa: E731
    if not CUDA:  # a dry run: the code path, not a measurement
        fn()
        times = []
        for _ in range(CPU_RUNS):
            reset()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return _stats(times)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        reset()
        fn()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) * 1e3 / 3
    n = int(min(MAX_RUNS, max(MIN_RUNS, TARGET_MS / max(estimate, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        reset()
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _stats([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _peak_mb(fn):
    """Peak memory a call adds on top of what is allocated before it (CUDA only)."""
    return peak_memory_mb(fn, DEVICE)


@contextlib.contextmanager
def _env(values: dict):
    """Set environment variables for the duration (the kernels' A/B switches are read at each launch)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variants_for(name: str, d: int, variants) -> list[str]:
    """The variants a provider is timed in at head dim d: non-fused providers once (default); padding only where it
    changes the tiles (d not a power of two); the forward levers on the forward providers."""
    if not name.startswith("fused_"):
        return ["default"]
    out = []
    for v in variants:
        if v == "padded" and (d & (d - 1) == 0 or name == "fused_tangent_bwd"):
            continue  # the same tiles (the tangent backward always runs padded ones: _pieces.py)
        if v in FORWARD_ONLY_VARIANTS and name.endswith("_bwd"):
            continue
        out.append(v)
    return out


# ------------------------------------------------------------------------------------------------ the peer kernel
def import_peer():
    """(JVPAttn, where it came from, None) or (None, None, why not): site-packages first, then the wheel in .whl/."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn

        return JVPAttn, "site-packages", None
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {e}"
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "jvp_flash_attention-*.whl")))
    if not wheels:
        return None, None, f"not installed ({reason}) and no .whl/jvp_flash_attention-*.whl in the checkout"
    sys.path.insert(0, wheels[-1])  # a pure-Python wheel is an importable zip
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn

        return JVPAttn, os.path.basename(wheels[-1]), None
    except Exception as e:  # noqa: BLE001
        return None, os.path.basename(wheels[-1]), f"import from the wheel failed: {type(e).__name__}: {e}"


def import_tvm():
    """(sdpa_jvp, None) or (None, why not): TVM's own JVP attention from bench/external/tvm (module docstring)."""
    if not os.path.isdir(os.path.join(TVM_DIR, "jvp_utils")):
        return None, f"no copy of lumalabs/tvm's jvp_utils/ at {os.path.relpath(TVM_DIR, REPO)}/jvp_utils"
    sys.path.insert(0, TVM_DIR)
    try:
        from jvp_utils.functional import sdpa_jvp

        return sdpa_jvp, None
    except Exception as e:  # noqa: BLE001
        return None, f"import failed: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------- providers
def _sdpa(backend, q, k, v, **kw):
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _tvm_kernel(causal, mask, gqa):
    """TVM's sdpa_jvp, or an error naming why it cannot run this case."""
    sdpa_jvp, why = import_tvm()
    if sdpa_jvp is None:
        raise RuntimeError(f"TVM's jvp_utils not importable: {why}")
    if causal or mask is not None or gqa:
        raise RuntimeError("TVM's kernel takes no mask, no causal attention and no GQA")
    return sdpa_jvp


def _forward_provider(name, q, k, v, q_dot, k_dot, v_dot, causal, mask, gqa, peer):
    """The callable for a forward provider (run under no_grad; forward mode needs no grad mode)."""
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    empty = [t[:0] for t in (q, k, v)]
    if name == "tvm_fwd_jvp":
        sdpa_jvp = _tvm_kernel(causal, mask, gqa)
        return lambda: torch.func.jvp(sdpa_jvp, (q, k, v), (q_dot, k_dot, v_dot))
    if name == "fused_fwd_jvp":
        return lambda: attention_jvp(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask, causal=causal, enable_gqa=gqa)
    if name == "fused_fwd":
        return lambda: attention_jvp(q, k, v, *empty, attn_mask=mask, causal=causal, enable_gqa=gqa)
    if name == "math_jvp":
        return lambda: torch.func.jvp(lambda a, b, c: _sdpa("math", a, b, c, **kw), (q, k, v), (q_dot, k_dot, v_dot))
    if name == "reference_jvp":
        return lambda: reference.attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask, causal=causal,
                                                   enable_gqa=gqa)
    if name == "peer_fwd_jvp":
        if peer is None:
            raise RuntimeError("peer kernel not importable")
        full = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).contiguous()
        return lambda: torch.func.jvp(lambda a, b, c: peer.fwd(a, b, c, attn_mask=full, causal=causal),
                                      (q, k, v), (q_dot, k_dot, v_dot))
    if name == "sdpa_default_fwd":
        return lambda: F.scaled_dot_product_attention(q, k, v, **kw)
    backend = name.split("_")[1]  # sdpa_<backend>_fwd
    return lambda: _sdpa(backend, q, k, v, **kw)


def _backward_provider(name, q, k, v, q_dot, k_dot, v_dot, causal, mask, gqa):
    """(run once, leaves): the forward graph is built once, the timed call is the backward alone."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    if name in ("fused_tangent_bwd", "math_tangent_bwd", "tvm_tangent_bwd"):
        leaves += [t.detach().clone().requires_grad_() for t in (q_dot, k_dot, v_dot)]
        if name == "fused_tangent_bwd":
            o, o_dot = attention_jvp(*leaves, attn_mask=mask, causal=causal, enable_gqa=gqa, tangent_grad=True)
        elif name == "tvm_tangent_bwd":  # its own forward + JVP, then its flash and tangent backward kernels
            o, o_dot = torch.func.jvp(_tvm_kernel(causal, mask, gqa), tuple(leaves[:3]), tuple(leaves[3:]))
        else:
            o, o_dot = torch.func.jvp(lambda a, b, c: _sdpa("math", a, b, c, **kw), tuple(leaves[:3]),
                                      tuple(leaves[3:]))
        grads = (torch.randn_like(o), torch.randn_like(o_dot))
        return (lambda: torch.autograd.backward((o, o_dot), grads, retain_graph=True)), leaves
    if name == "fused_bwd":
        o, _ = attention_jvp(*leaves, *[t[:0] for t in leaves], attn_mask=mask, causal=causal, enable_gqa=gqa)
    else:
        o = _sdpa(name.split("_")[1], *leaves, **kw)
    grad_o = torch.randn_like(o)
    return (lambda: o.backward(grad_o, retain_graph=True)), leaves


# ----------------------------------------------------------------------------------------------------- driver
def _shapes(quick: bool, dtypes=None, ns=None, dims=None, batch=None, heads=None):
    """(dtypes, head dims, sequence lengths, (N, D) -> (B, H)); batch / heads fix B / H (TVM's table: B 1, H 24)."""
    if not CUDA:
        dtypes, dims, ns, bh = ["bf16"], dims or [32, 64], [32, 64], (lambda n, d: (1, 4))
    else:
        dtypes = dtypes or (["bf16"] if quick else ["bf16", "fp16"])
        ns = ns or ([1024, 2048] if quick else [1024, 2048, 4096, 8192])
        # 16k tokens per batch and a model width of 2048 (the FlashAttention papers' setting).
        dims = dims or [64, 128]
        bh = (lambda n, d: (max(1, 16384 // n), 2048 // d))
    return dtypes, dims, ns, (lambda n, d: (batch or bh(n, d)[0], heads or bh(n, d)[1]))


def _case_inputs(case, b, h, n, d, dtype, gen):
    hkv = h // GQA_GROUP if case == "gqa" else h
    shapes = [(b, h, n, d), (b, hkv, n, d), (b, hkv, n, d)]
    prim = [torch.randn(s, device=DEVICE, dtype=dtype, generator=gen) for s in shapes]
    tan = [torch.randn(s, device=DEVICE, dtype=dtype, generator=gen) for s in shapes]
    mask = None
    if case == "keypad30":  # the last 30% of every batch row's keys are padding (True = attend)
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEVICE)
        mask[..., n - int(PAD_FRACTION * n):] = False
    return prim, tan, mask


def run(quick: bool, causal_modes, only=None, log=print, dtypes=None, ns=None, dims=None, cases=CASES,
        on_shape_done=None, peer=None, peer_error=None, variants=("default",), batch=None, heads=None):
    dtypes, dims, ns, bh = _shapes(quick, dtypes, ns, dims, batch, heads)
    rows = []
    first_shape = True
    for dname in dtypes:
        dtype = DTYPES[dname]
        for d in dims:
            for n in ns:
                b, h = bh(n, d)
                for case in cases:
                    if case != "dense" and not CUDA and not first_shape:
                        continue  # CPU dry run: the new cases at the first shape only
                    gen = torch.Generator(device=DEVICE).manual_seed(1000 + n + d)
                    (q, k, v), (q_dot, k_dot, v_dot), mask = _case_inputs(case, b, h, n, d, dtype, gen)
                    for causal in causal_modes:
                        if causal and mask is not None:
                            continue  # torch refuses attn_mask with is_causal (so does mfkernels)
                        rows += _run_case(case, dname, b, h, n, d, causal, (q, k, v), (q_dot, k_dot, v_dot), mask,
                                          only, log, peer, peer_error, first_shape, variants)
                        if on_shape_done is not None:
                            on_shape_done(rows)  # partial results survive a time limit
                    del q, k, v, q_dot, k_dot, v_dot, mask
                    if CUDA:
                        torch.cuda.empty_cache()
                first_shape = False
    return rows


def _run_case(case, dname, b, h, n, d, causal, prim, tan, mask, only, log, peer, peer_error, first_shape,
              variants=("default",)):
    gqa = case == "gqa"
    base = {"bench": "attention", "case": case, "dtype": dname, "B": b, "H": h, "N": n, "D": d, "causal": causal}
    if gqa:
        base["Hkv"] = h // GQA_GROUP
    if mask is not None:
        base["padded_keys"] = int(PAD_FRACTION * n)
    flops_unit = b * h * n * n * d * (0.5 if causal else 1.0)
    rows, outputs = [], {}
    for name in PROVIDERS[case]:
        if only and name not in only:
            continue
        if not CUDA and not first_shape and name in CPU_FIRST_SHAPE_ONLY:
            continue  # CPU dry run: proven once at the first shape
        for variant in variants_for(name, d, variants):
            rows.append(_run_provider(name, variant, case, base, flops_unit, prim, tan, causal, mask, gqa, peer,
                                      peer_error, outputs))
            log(_fmt(rows[-1]))
    if "fused_fwd_jvp" in outputs and "tvm_fwd_jvp" in outputs:  # the two kernels' o_dot must agree
        diff = (outputs["fused_fwd_jvp"] - outputs["tvm_fwd_jvp"]).abs().max().item()
        for row in rows:
            if row["base_provider"] == "tvm_fwd_jvp":
                row["max_abs_diff_vs_fused"] = diff
    if "fused_fwd_jvp" in outputs and "math_jvp" in outputs:
        diff = (outputs["fused_fwd_jvp"] - outputs["math_jvp"]).abs().max().item()
        for row in rows:
            if row["base_provider"] == "fused_fwd_jvp" and row["variant"] == "default":
                row["max_abs_diff_vs_math"] = diff
    return rows


def _run_provider(name, variant, case, base, flops_unit, prim, tan, causal, mask, gqa, peer, peer_error, outputs):
    """One timed row: provider `name` in `variant` (its environment set around the setup, the timing and the memory)."""
    label = name if variant == "default" else f"{name}_{variant}"
    row = dict(base, provider=label if case == "dense" else f"{label}_{case}", base_provider=name, variant=variant)
    try:
        with _env(VARIANTS[variant]):
            if name == "peer_fwd_jvp" and peer is None:
                raise RuntimeError(f"jvp_flash_attention not importable: {peer_error}")
            if name.endswith("_bwd"):
                fn, leaves = _backward_provider(name, *prim, *tan, causal, mask, gqa)
                row.update(_time(fn, grad_to_none=leaves))
                row["peak_mem_mb"] = _peak_mb(fn)
                del fn, leaves
            else:
                fn = _forward_provider(name, *prim, *tan, causal, mask, gqa, peer)
                with torch.no_grad():  # forward mode does not need grad mode
                    row.update(_time(fn))
                    row["peak_mem_mb"] = _peak_mb(fn)
                    if name in ("fused_fwd_jvp", "math_jvp", "tvm_fwd_jvp"):
                        result = fn()[1].float()
                        if variant == "default":
                            outputs[name] = result
                        elif "fused_fwd_jvp" in outputs:  # a switch must not change the answer beyond rounding
                            row["max_abs_diff_vs_default"] = (result - outputs["fused_fwd_jvp"]).abs().max().item()
        if name == "peer_fwd_jvp" and mask is not None:
            row["note"] = "mask materialised as a (B, H, N, N) tensor (the peer takes no broadcast mask)"
        row["tflops"] = FLOPS_PER_HEAD[name] * flops_unit / (row["ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        row.update(ms=None, ms_p20=None, ms_p80=None, tflops=None,
                   error="OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:300]}")
        if CUDA:
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------- summary
# (name, numerator (case, provider[, variant]), denominator (likewise), target: None, a string, or {D: string} with
# the string under key None for the other head dims)
FWD_JVP_OVER_FLASH_TARGET = {64: "<= 1.75 (Hopper target)", 128: "<= 1.85 (Hopper target)", None: "<= 2.0"}
RATIOS = [
    ("fused_fwd_jvp_over_flash_fwd", ("dense", "fused_fwd_jvp"), ("dense", "sdpa_flash_fwd"), FWD_JVP_OVER_FLASH_TARGET),
    ("fused_fwd_jvp_over_cudnn_fwd", ("dense", "fused_fwd_jvp"), ("dense", "sdpa_cudnn_fwd"), None),
    ("math_jvp_over_fused_fwd_jvp", ("dense", "math_jvp"), ("dense", "fused_fwd_jvp"), ">= 10 at N 2048"),
    ("fused_bwd_over_flash_bwd", ("dense", "fused_bwd"), ("dense", "sdpa_flash_bwd"), "<= 1.2"),
    ("fused_bwd_over_cudnn_bwd", ("dense", "fused_bwd"), ("dense", "sdpa_cudnn_bwd"), None),
    ("fused_tangent_bwd_over_fused_bwd", ("dense", "fused_tangent_bwd"), ("dense", "fused_bwd"), None),
    ("fused_tangent_bwd_over_flash_bwd", ("dense", "fused_tangent_bwd"), ("dense", "sdpa_flash_bwd"), None),
    ("math_tangent_bwd_over_fused_tangent_bwd", ("dense", "math_tangent_bwd"), ("dense", "fused_tangent_bwd"), None),
    ("peer_fwd_jvp_over_fused_fwd_jvp", ("dense", "peer_fwd_jvp"), ("dense", "fused_fwd_jvp"), None),
    ("tvm_fwd_jvp_over_fused_fwd_jvp", ("dense", "tvm_fwd_jvp"), ("dense", "fused_fwd_jvp"), None),
    ("tvm_tangent_bwd_over_fused_tangent_bwd", ("dense", "tvm_tangent_bwd"), ("dense", "fused_tangent_bwd"), None),
    ("fused_tangent_bwd_over_fused_fwd_jvp", ("dense", "fused_tangent_bwd"), ("dense", "fused_fwd_jvp"), None),
    ("keypad30_fused_fwd_jvp_over_dense", ("keypad30", "fused_fwd_jvp"), ("dense", "fused_fwd_jvp"), "<= 1.10"),
    ("keypad30_fused_fwd_jvp_over_efficient_fwd", ("keypad30", "fused_fwd_jvp"), ("keypad30", "sdpa_efficient_fwd"),
     None),
    ("keypad30_fused_fwd_jvp_over_cudnn_fwd", ("keypad30", "fused_fwd_jvp"), ("keypad30", "sdpa_cudnn_fwd"), None),
    ("keypad30_fused_bwd_over_efficient_bwd", ("keypad30", "fused_bwd"), ("keypad30", "sdpa_efficient_bwd"), None),
    ("keypad30_fused_bwd_over_cudnn_bwd", ("keypad30", "fused_bwd"), ("keypad30", "sdpa_cudnn_bwd"), None),
    ("keypad30_math_jvp_over_fused_fwd_jvp", ("keypad30", "math_jvp"), ("keypad30", "fused_fwd_jvp"), None),
    ("gqa_fused_fwd_jvp_over_flash_fwd", ("gqa", "fused_fwd_jvp"), ("gqa", "sdpa_flash_fwd"), None),
    ("gqa_fused_fwd_jvp_over_cudnn_fwd", ("gqa", "fused_fwd_jvp"), ("gqa", "sdpa_cudnn_fwd"), None),
    ("gqa_fused_bwd_over_flash_bwd", ("gqa", "fused_bwd"), ("gqa", "sdpa_flash_bwd"), None),
    ("gqa_fused_bwd_over_cudnn_bwd", ("gqa", "fused_bwd"), ("gqa", "sdpa_cudnn_bwd"), None),
    # a split head dim against padding, the Hopper levers against the default kernels
    ("split_over_padded_fwd_jvp", ("dense", "fused_fwd_jvp"), ("dense", "fused_fwd_jvp", "padded"),
     "<= 0.75 (Hopper target, D 72)"),
    ("split_over_padded_fwd", ("dense", "fused_fwd"), ("dense", "fused_fwd", "padded"), None),
    ("split_over_padded_bwd", ("dense", "fused_bwd"), ("dense", "fused_bwd", "padded"), "<= 1.0 (Hopper target)"),
    ("tma_over_default_fwd_jvp", ("dense", "fused_fwd_jvp", "tma"), ("dense", "fused_fwd_jvp"), None),
    ("tma_over_default_fwd", ("dense", "fused_fwd", "tma"), ("dense", "fused_fwd"), None),
    ("persistent_over_default_fwd_jvp", ("dense", "fused_fwd_jvp", "persistent"), ("dense", "fused_fwd_jvp"), None),
    ("persistent_over_default_fwd", ("dense", "fused_fwd", "persistent"), ("dense", "fused_fwd"), None),
]


def _ratio_key(side: tuple) -> tuple:
    return side if len(side) == 3 else side + ("default",)


def summarize(rows):
    """The ratios of RATIOS, one entry per (dtype, D, N, causal) where both sides ran (medians of each)."""
    by = {}
    for r in rows:
        if r.get("ms") is not None:
            key = (r.get("case", "dense"), r.get("base_provider", r["provider"]), r.get("variant", "default"))
            by[(r["dtype"], r["D"], r["N"], r["causal"]) + key] = r
    out = []
    for key in sorted({k[:4] for k in by}):
        entry = dict(zip(("dtype", "D", "N", "causal"), key))
        for name, num, den, target in RATIOS:
            a, b = by.get(key + _ratio_key(num)), by.get(key + _ratio_key(den))
            if a and b:
                entry[name] = a["ms"] / b["ms"]
                if isinstance(target, dict):
                    target = target.get(entry["D"], target[None])
                if target:
                    entry[name + "_target"] = target
        if len(entry) > 4:
            out.append(entry)
    return out


def _fmt(r):
    head = (f"{r['provider']:>36} {r['dtype']} B{r['B']} H{r['H']} N{r['N']:<5} D{r['D']:<3} "
            f"causal={int(r['causal'])}")
    if r.get("ms") is None:
        return f"{head}  {r.get('error')}"
    mem = f"{r['peak_mem_mb']:9.1f} MB" if r.get("peak_mem_mb") is not None else ""
    return (f"{head}  {r['ms']:9.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] n={r['n_runs']:<3} "
            f"{r['tflops']:8.2f} TFLOP/s {mem}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (always on without CUDA)")
    ap.add_argument("--causal", choices=("off", "on", "both"), default=None,
                    help="causal variants (default: both, or off with --quick / without CUDA)")
    every = sorted({p for ps in PROVIDERS.values() for p in ps})
    ap.add_argument("--providers", default=None, help="comma-separated subset of: " + ",".join(every))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of bf16,fp16 (CUDA)")
    ap.add_argument("--dims", default=None, help="comma-separated head dims (CUDA), default 64,128")
    ap.add_argument("--variants", default="default",
                    help="comma-separated A/B switches of the fused kernels: " + ",".join(VARIANTS)
                    + " (default first; see the module docstring)")
    ap.add_argument("--ns", default=None, help="comma-separated sequence lengths (CUDA), e.g. 1024,2048,4096,8192")
    ap.add_argument("--batch", type=int, default=None, help="fixed batch (default: 16k tokens per batch)")
    ap.add_argument("--heads", type=int, default=None, help="fixed heads (default: 2048 // D)")
    args = ap.parse_args(argv)
    mode = args.causal or ("off" if (args.quick or not CUDA) else "both")
    causal_modes = {"off": [False], "on": [True], "both": [False, True]}[mode]
    only = set(args.providers.split(",")) if args.providers else None
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}; choose from {','.join(CASES)}")
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")
    variants = sorted(set(variants), key=list(VARIANTS).index)  # default first: the others are checked against it
    t0 = time.time()
    dtypes = args.dtypes.split(",") if args.dtypes else None
    ns = [int(n) for n in args.ns.split(",")] if args.ns else None
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    peer, peer_source, peer_error = import_peer()
    peer_info = {"available": peer is not None, "source": peer_source, "error": peer_error}
    print(f"peer kernel jvp_flash_attention: {peer_info}")
    tvm_info = {"available": import_tvm()[0] is not None, "error": import_tvm()[1]}
    print(f"TVM's jvp_utils: {tvm_info}")
    timing = {"min_runs": MIN_RUNS, "target_ms": TARGET_MS, "max_runs": MAX_RUNS, "l2_flush": CUDA} if CUDA else \
        {"cpu_runs": CPU_RUNS, "warmup": 1}
    rows = run(args.quick or not CUDA, causal_modes, only, dtypes=dtypes, ns=ns, dims=dims, cases=cases,
               peer=peer, peer_error=peer_error, variants=variants, batch=args.batch, heads=args.heads,
               on_shape_done=lambda partial: _write(args.out, partial, t0, False, peer_info, timing, tvm_info))
    result = _write(args.out, rows, t0, True, peer_info, timing, tvm_info)
    for s in result["summary"]:
        print(s)
    print(f"wrote {len(rows)} rows to {args.out} in {result['wall_s']} s")


def _write(path, rows, t0, final, peer_info, timing, tvm_info=None):
    extra = {"wall_s": round(time.time() - t0, 1), "complete": final, "summary": summarize(rows),
             "peer_jvp_flash_attention": peer_info, "tvm_jvp_utils": tvm_info, "timing": timing}
    write_results(path, "attention", DEVICE, rows, **extra)
    return extra


if __name__ == "__main__":
    main()
