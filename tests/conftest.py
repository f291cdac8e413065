"""Test configuration shared by every test module.

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
Tests marked `gpu` run here on CPU through the interpreter and, on a GPU machine, on CUDA with the compiled kernels:
the GPU suite selects them with `-m gpu`.
"""
import os

# Inductor's AOTAutograd cache keys on the Dynamo graph, not on a custom op's Python autograd formula: after an edit of
# an op's backward it would replay the old one from a shared cache dir. Tests compile with it off.
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

if os.environ.get("MF_TEST_DEVICE", "") != "cuda":
    try:
        import torch as _torch

        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the long tests: every case of the kernel sweeps (`sweep`: the default run keeps "
                          "a covering subset) and the tests marked `full` (ahead-of-time compiles, multi-process "
                          "runs, learning checks, builds of the native op)")


def _value_key(value):
    """A parameter value as a set key (tensors and dicts by their repr)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return (type(value).__name__, value) if not isinstance(value, torch.Tensor) else repr(value)


def pytest_collection_modifyitems(config, items):
    """Without --full: tests marked `full` are deselected, and of each test function marked `sweep` only a covering
    subset of its cases stays, in collection order: a case is kept when it brings a parameter value (of any of its
    parameters) that no kept case had, so every dtype, shape, layout, kt ... of the sweep still runs at least once.
    Deselected, not skipped: they are not part of the default run at all."""
    if config.getoption("--full"):
        return
    kept, dropped, covered = [], [], {}
    for item in items:
        if item.get_closest_marker("full"):
            dropped.append(item)
            continue
        spec = getattr(item, "callspec", None)
        if spec is None or not item.get_closest_marker("sweep"):
            kept.append(item)
            continue
        seen = covered.setdefault(item.nodeid.split("[")[0], set())
        new = {(name, _value_key(value)) for name, value in spec.params.items()} - seen
        if new:
            seen |= new
            kept.append(item)
        else:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def device() -> str:
    """Where `gpu`-marked tests run: CUDA when present, else CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test gets its own seed derived from its id: inputs are fresh per test, yet a failure reproduces."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every Triton launcher allocates its outputs through mfkernels._runtime.new_output: NaN-filled during tests."""
    from mfkernels import _runtime

    _runtime.set_poison(True)
    yield
    _runtime.set_poison(False)
