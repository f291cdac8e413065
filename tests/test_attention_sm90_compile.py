"""The attention kernels compile for the H100/H200 (sm_90) and fit: every kernel (forward + JVP with and without
tangent rows, the flash backward, the tangent backward with and without G) with each mask kind (none, 2-D additive,
key padding bool and additive), mu saved, Dv != D, bf16 and fp32, D = 64 and 128, with each autotune list's first
config (what runs with MFKERNELS_AUTOTUNE=0, and the autotuner's fallback). bf16 must not spill registers; nothing may
exceed Hopper's shared memory. MFKERNELS_AOT_ALL_CONFIGS=1 compiles every config of every list instead (minutes; run
before changing a list).

Split head dims (mfkernels/attention/_pieces.py): D = 72 (DiT-XL/2, pieces 64 + 16) in every kernel and
mask kind; 96 (64 + 32), 112 (64 + 32 + 16) and a Dv split differently from D in the heaviest variants (80 has 72's
pieces); fp32 at 112 (the widest split: shared memory). The opt-in Hopper levers of the forward (_levers.py: tensor
descriptors, persistent programs) compile at D = 72 and 128 (the persistent one spills a little: KNOWN_SPILLS). Warp
specialisation is not a lever: Triton 3.6 ignores it on sm_90 at 8 warps (test_warp_specialize_is_a_no_op_on_sm90
notices a Triton that starts to honour it).

An H200 run once failed here: the fp32 D = 128 forward + JVP config needed 233472 B of the 232448 available.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests._sm90_aot import HOPPER_SHARED_MEMORY, compile_for_sm90

pytestmark = pytest.mark.full  # long: runs with --full (CI runs it)

BODY = r'''
from triton.runtime.autotuner import Autotuner

from mfkernels.attention.backward import attention_bwd
from mfkernels.attention.forward import attention_jvp_fwd
from mfkernels.attention.tangent_backward import attention_jvp_bwd

ALL = os.environ.get("MFKERNELS_AOT_ALL_CONFIGS") == "1"


def first_config_run(self, *args, **kwargs):  # the autotuner would query a GPU driver: take the pruned list's first
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs)[:None if ALL else 1]:
        seen.clear()  # the prelude's de-duplication ignores num_stages
        n = len(out)
        self.fn.run(*args, **kwargs, **config.all_kwargs())
        for rec in out[n:]:
            rec["config"] = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            rec["variant"] = {k: str(kwargs[k]) for k in ("HEAD_D", "HEAD_DV", "D_PIECES", "DV_PIECES", "MASK_KIND",
                                                          "HAS_GO", "STORE_MU", "HAS_TANGENT", "USE_TMA", "PERSISTENT")
                              if k in kwargs}


Autotuner.run = first_config_run


def run(dtype, d, dv, light):
    """Every kernel at (d, dv): bf16 in every mask kind (spills depend on them); fp32 only with the 2-D additive mask,
    the variant with the most shared memory (fp32 may spill, its shared memory must fit); light: the heaviest only."""
    b, h, n, kt = 2, 2, 40, 2
    q, k = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, dtype=dtype)
    o = torch.randn(b, h, n, dv, dtype=dtype)
    bias = torch.randn(b, 1, n, n, dtype=dtype)  # 2-D additive: the heaviest mask (MASK_KIND 2)
    keep = torch.rand(b, 1, 1, n) > 0.3  # key padding (MASK_KIND 3)
    key_bias = torch.randn(b, 1, 1, n, dtype=dtype)  # additive key padding (MASK_KIND 4)
    tangents = (q[:kt], k[:kt], v[:kt])
    lse, lse2 = torch.zeros(b, h, n), torch.zeros(2, b, h, n)  # lse2: (m, log2 l) rows of an additive mask
    mu = torch.zeros(kt, h, n)
    every_mask = dtype == torch.bfloat16 and not light
    for mask in (bias, key_bias, keep) if every_mask else (bias,):
        attention_jvp_fwd(q, k, v, *tangents, mask, False, d ** -0.5, True)
    attention_jvp_bwd(o, o[:kt], q, k, v, *tangents, o, o[:kt], lse2, mu, bias, False, d ** -0.5)
    if light:
        return
    attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], bias, False, d ** -0.5)
    attention_bwd(o, q, k, v, o, lse2, bias, False, d ** -0.5)
    if every_mask:
        attention_jvp_fwd(q, k, v, *tangents, None, False, d ** -0.5, False)
        attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], None, False, d ** -0.5)
        attention_bwd(o, q, k, v, o, lse, keep, False, d ** -0.5)
        attention_bwd(o, q, k, v, o, lse, None, False, d ** -0.5)
        attention_jvp_bwd(None, o[:kt], q, k, v, *tangents, o, o[:kt], lse, mu, keep, False, d ** -0.5)


def forward_only(d):
    """The bf16 forward + JVP and plain forward, without a mask."""
    q, k, v = (torch.randn(2, 2, 40, d, dtype=torch.bfloat16) for _ in range(3))
    attention_jvp_fwd(q, k, v, q[:2], k[:2], v[:2], None, False, d ** -0.5, False)
    attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], None, False, d ** -0.5)


# Two processes of about equal work (CI has two cores): bf16 at today's dims and D = 72 (DiT-XL/2's, split) in every
# variant; fp32, the other splits (80 has 72's pieces), a Dv split differently from D, and the forward's levers.
if PART == "bf16":
    for d in (64, 128):
        run(torch.bfloat16, d, d, light=False)
    run(torch.bfloat16, 64, 128, light=True)  # Dv != D: the wider tile picks the configs
    run(torch.bfloat16, 72, 72, light=False)
else:
    for d in (64, 128):
        run(torch.float32, d, d, light=False)
    run(torch.float32, 112, 112, light=True)  # the widest split: shared memory
    for d in (96, 112):
        run(torch.bfloat16, d, d, light=True)
    run(torch.bfloat16, 72, 112, light=True)  # D and Dv split differently
    for lever in ("MFKERNELS_ATTN_TMA", "MFKERNELS_ATTN_PERSISTENT"):
        os.environ[lever] = "1"
        for d in (72, 128):
            forward_only(d)
        del os.environ[lever]
'''


# Known bf16 spills, in bytes, each a bound (more fails): what they are and why they are allowed.
#  - the persistent lever (opt-in, off by default) carries the tile loop around the whole program: at the first config
#    (128, 32, 8, 3) it spilled 24 B at D = 72 and 212 B at D = 128 (255 registers); a GPU timing decides its fate.
#  - the tangent backward's dK/dV kernel with D = 72 and Dv = 112 (both padded to 128), a 2-D additive mask and G:
#    24 B (255 registers). The same tiles compiled without a spill before the head-dim split reorganised the kernel
#    code; without the stride-alignment hints 8 B remain. A rare shape (Dv != D, D not a power of two).
KNOWN_SPILLS = {("_attn_jvp_fwd_kernel", "persistent", "72"): 32, ("_attn_jvp_fwd_kernel", "persistent", "128"): 256,
                ("_attn_tbwd_dkdv_kernel", "72", "112"): 32}


def _allowed_spill(r: dict) -> int:
    variant = r.get("variant", {})
    if variant.get("PERSISTENT") == "True":
        return KNOWN_SPILLS.get((r["kernel"], "persistent", variant.get("HEAD_D")), 0)
    return KNOWN_SPILLS.get((r["kernel"], variant.get("HEAD_D"), variant.get("HEAD_DV")), 0)


@pytest.mark.full
def test_attention_kernels_fit_sm90():
    env = {"MFKERNELS_AUTOTUNE": "0"} if os.environ.get("MFKERNELS_AOT_ALL_CONFIGS") != "1" else {}
    # two compiler processes side by side (the compiles are independent; CI has two cores)
    bodies = [f"PART = {part!r}\n" + BODY for part in ("bf16", "fp32 and the rest")]
    with ThreadPoolExecutor(2) as pool:
        compiled = [r for records in pool.map(lambda body: compile_for_sm90(body, **env), bodies) for r in records]
    kernels = {r["kernel"] for r in compiled}
    expected = {"_attn_jvp_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_tbwd_dkdv_kernel",
                "_attn_tbwd_dq_kernel", "_attn_bwd_preprocess_kernel", "_attn_tbwd_preprocess_kernel"}
    assert expected <= kernels, kernels
    too_big = [r for r in compiled if r["shared"] > HOPPER_SHARED_MEMORY]
    assert not too_big, f"more shared memory than sm_90 has: {too_big}"
    spills = [r for r in compiled if "*bf16" in r["dtypes"] and r["spill"] and r["spill"] > _allowed_spill(r)]
    assert not spills, f"bf16 kernels that spill registers: {spills}"
    # the new configurations really compiled: every split of _pieces.py, and each lever on
    pieces = {r["variant"].get("D_PIECES") for r in compiled if "variant" in r}
    assert {"(64, 16)", "(64, 32)", "(64, 32, 16)"} <= pieces, pieces
    levers = {(r["variant"].get("USE_TMA"), r["variant"].get("PERSISTENT")) for r in compiled
              if r["kernel"] == "_attn_jvp_fwd_kernel"}
    assert {("True", "False"), ("False", "True"), ("False", "False")} <= levers, levers


WS_BODY = r'''
from tests._sm90_ws_probe import _ws_probe_kernel

for ws in (False, True):
    a, b, c = torch.empty(64, 256, dtype=torch.bfloat16), torch.empty(256, 64, dtype=torch.bfloat16), torch.empty(64, 64)
    n = len(out)
    _ws_probe_kernel[(1,)](a, b, c, 256, WS=ws, BLOCK=64, num_warps=8, num_stages=3)
    for rec in out[n:]:
        rec["ws"] = ws
'''


@pytest.mark.full
def test_warp_specialize_is_a_no_op_on_sm90():
    """Triton 3.6 compiles tl.range(..., warp_specialize=True) at 8 warps (the warps of every bf16 attention config)
    to the same sm_90 PTX as without it (its automatic partitioning runs only for compute capability >= 10), which is
    why _levers.py offers no such lever. (At 4 warps, num_stages 1-3, the Hopper pass nvgpu-warp-specialization fails
    to compile this probe: "PassManager::run failed".) If this fails, a Triton upgrade started to specialise on
    Hopper: time it as a lever (bench_attention.py --variants)."""
    records = compile_for_sm90(WS_BODY)
    assert len(records) == 2, records
    plain, ws = sorted(records, key=lambda r: r["ws"])
    assert plain["ptx_sha256"] == ws["ptx_sha256"], (plain, ws)
