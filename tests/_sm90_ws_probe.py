"""A small kernel with the attention kernels' loop shape (a tl.range loop of dots into one accumulator), compiled for
sm_90 with and without warp_specialize by tests/test_attention_sm90_compile.py (a @triton.jit function must live in a
Python file, not in the compile subprocess's script)."""
import triton
import triton.language as tl


@triton.jit
def _ws_probe_kernel(A, B, C, K, WS: tl.constexpr, BLOCK: tl.constexpr):
    """C = A B over K in BLOCK-wide steps (A: BLOCK x K, B: K x BLOCK, row-major)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK, warp_specialize=WS):
        a = tl.load(A + offs[:, None] * K + (k0 + offs)[None, :])
        b = tl.load(B + (k0 + offs)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)
