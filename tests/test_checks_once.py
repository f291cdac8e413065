"""Checks run once: a network's tangent call validates its inputs in meanflow/models/validate.py and its layers call
the ops without validating again (mfkernels.ops.ops_table(..., checked=False)); a direct op call still checks.

Every call into a function of mfkernels/_checks.py is recorded with its caller's file (sys.setprofile). The Triton
kernels are stubbed (bench/bench_host.py's launch counter): only the Python around them runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.bench_host import triton_launches
from mfkernels import _checks
from mfkernels.ops import ops_table

CHECKS_FILE = Path(_checks.__file__).resolve()


def check_callers(fn) -> dict[str, int]:
    """{caller file name: calls} of the _checks functions entered from outside _checks.py while fn runs."""
    calls: dict[str, int] = {}

    def profile(frame, event, _arg):
        if event == "call" and Path(frame.f_code.co_filename).resolve() == CHECKS_FILE:
            caller = Path(frame.f_back.f_code.co_filename).resolve()
            if caller != CHECKS_FILE:
                name = "/".join(caller.parts[-3:])
                calls[name] = calls.get(name, 0) + 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _tangent_call(net, backend):
    z, t = torch.randn(4, *net.data_shape), torch.rand(4)
    y = torch.tensor([0, 1, 2, 0])
    return lambda: net(z, t, t * 0.5, y, tangents=(z[:2], torch.ones(2), torch.ones(2)), backend=backend)


@pytest.mark.parametrize("backend", ["explicit", "fused"])
def test_a_network_tangent_call_checks_in_validate_only(backend):
    from meanflow import DiT

    torch.manual_seed(0)
    net = DiT(input_size=4, in_channels=1, hidden=16, depth=2, heads=2, patch=2, num_classes=3, backend=backend)
    call = _tangent_call(net, backend)
    with triton_launches(stub=True):
        call()  # first-call setup (kernel wrappers, autotuner) outside the profiler: it is slow to profile
        callers = check_callers(call)
    assert set(callers) == {"meanflow/models/validate.py"}, callers


def test_the_checked_table_checks_and_the_unchecked_one_does_not():
    """The same op through both tables: the checked one validates (from its own module), the unchecked one does not,
    and both give the same result."""
    x, m = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    args = (x, m, m, x[:1], m[:1], m[:1])
    for impl in ("reference", "fused"):
        checked, unchecked = ops_table(impl), ops_table(impl, checked=False)
        assert checked.checked and not unchecked.checked
        for a, b in zip(checked.layernorm_modulate(*args), unchecked.layernorm_modulate(*args)):
            assert torch.equal(a, b)
        with triton_launches(stub=True):  # the Python around the kernel only
            assert check_callers(lambda: checked.layernorm_modulate(*args))  # noqa: B023
            assert not check_callers(lambda: unchecked.layernorm_modulate(*args))  # noqa: B023
    with pytest.raises(ValueError, match="shift must have shape"):
        ops_table("fused").layernorm_modulate(x, m[:1], m, x[:1], m[:1], m[:1])
