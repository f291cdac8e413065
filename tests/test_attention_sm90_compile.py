"""The attention kernels' first configs (what runs with MFKERNELS_AUTOTUNE=0, and the autotuner's fallback) compile
for the H100/H200 (sm_90) and fit its shared memory, for bf16 and fp32, D = 64 and 128, with and without tangents.

An H200 run once failed here: the fp32 D = 128 forward + JVP config needed 233472 B of the 232448 available.
"""
import pytest

from tests._sm90_aot import HOPPER_SHARED_MEMORY, compile_for_sm90

BODY = r'''
from triton.runtime.autotuner import Autotuner

from mfkernels.attention import attention_bwd, attention_jvp_fwd


def first_config_run(self, *args, **kwargs):  # the autotuner would query a GPU driver: take the pruned list's first
    self.nargs = dict(zip(self.arg_names, args))
    config = self.prune_configs(kwargs)[0]
    return self.fn.run(*args, **kwargs, **config.all_kwargs())


Autotuner.run = first_config_run

for dtype in (torch.bfloat16, torch.float32):
    for d in (64, 128):
        q, k, v = (torch.randn(2, 2, 40, d, dtype=dtype) for _ in range(3))
        for kt in (2, 0):
            attention_jvp_fwd(q, k, v, q[:kt], k[:kt], v[:kt], None, False, d ** -0.5)
        lse = torch.zeros(2, 2, 40, dtype=torch.float32)
        attention_bwd(q, q, k, v, q, lse, None, False, d ** -0.5)
'''


@pytest.mark.slow
def test_attention_first_configs_fit_sm90():
    compiled = compile_for_sm90(BODY, MFKERNELS_AUTOTUNE="0")
    kernels = {r["kernel"] for r in compiled}
    assert {"_attn_jvp_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= kernels, kernels
    too_big = [r for r in compiled if r["shared"] > HOPPER_SHARED_MEMORY]
    assert not too_big, f"more shared memory than sm_90 has: {too_big}"
