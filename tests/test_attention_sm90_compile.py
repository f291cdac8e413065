"""The attention kernels compile for the H100/H200 (sm_90) and fit: every kernel (forward + JVP with and without
tangent rows, the flash backward, the tangent backward with and without G) with each mask kind (none, 2-D additive,
key padding bool and additive), mu saved, Dv != D, bf16 and fp32, D = 64 and 128, with each autotune list's first
config (what runs with MFKERNELS_AUTOTUNE=0, and the autotuner's fallback). bf16 must not spill registers; nothing may
exceed Hopper's shared memory. MFKERNELS_AOT_ALL_CONFIGS=1 compiles every config of every list instead (minutes; run
before changing a list).

An H200 run once failed here: the fp32 D = 128 forward + JVP config needed 233472 B of the 232448 available.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests._sm90_aot import HOPPER_SHARED_MEMORY, compile_for_sm90

BODY = r'''
from triton.runtime.autotuner import Autotuner

from mfkernels.attention import attention_bwd, attention_jvp_bwd, attention_jvp_fwd

ALL = os.environ.get("MFKERNELS_AOT_ALL_CONFIGS") == "1"


def first_config_run(self, *args, **kwargs):  # the autotuner would query a GPU driver: take the pruned list's first
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs)[:None if ALL else 1]:
        seen.clear()  # the prelude's de-duplication ignores num_stages
        n = len(out)
        self.fn.run(*args, **kwargs, **config.all_kwargs())
        for rec in out[n:]:
            rec["config"] = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            rec["variant"] = {k: str(kwargs[k]) for k in ("BLOCK_D", "BLOCK_DV", "MASK_KIND", "HAS_GO", "STORE_MU",
                                                          "HAS_TANGENT") if k in kwargs}


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


for d in (64, 128):
    run(DTYPE, d, d, light=False)
if DTYPE == torch.bfloat16:
    run(DTYPE, 64, 128, light=True)  # Dv != D: the wider tile picks the configs
'''


@pytest.mark.slow
def test_attention_kernels_fit_sm90():
    env = {"MFKERNELS_AUTOTUNE": "0"} if os.environ.get("MFKERNELS_AOT_ALL_CONFIGS") != "1" else {}
    # one compiler process per dtype, side by side (the compiles are independent; CI has two cores)
    bodies = [f"DTYPE = torch.{dtype}\n" + BODY for dtype in ("bfloat16", "float32")]
    with ThreadPoolExecutor(2) as pool:
        compiled = [r for records in pool.map(lambda body: compile_for_sm90(body, **env), bodies) for r in records]
    kernels = {r["kernel"] for r in compiled}
    expected = {"_attn_jvp_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_tbwd_dkdv_kernel",
                "_attn_tbwd_dq_kernel", "_attn_bwd_preprocess_kernel", "_attn_tbwd_preprocess_kernel"}
    assert expected <= kernels, kernels
    too_big = [r for r in compiled if r["shared"] > HOPPER_SHARED_MEMORY]
    assert not too_big, f"more shared memory than sm_90 has: {too_big}"
    spills = [r for r in compiled if "*bf16" in r["dtypes"] and r["spill"]]
    assert not spills, f"bf16 kernels that spill registers: {spills}"
