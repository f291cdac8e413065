"""A wrapped diffusers DiT under DDP and FSDP2 (2 gloo ranks on CPU) trains as one process on the same global batch,
with the tangent pass joint (torch.func.jvp inside the wrapper's forward, with grad) and separate (no-grad tangent
pass, then the primal with grad: meanflow.models.wrapped); sCM under FSDP2 too (its logvar head lives on the root).
The control shows that the comparison can fail: the network called inside DDP instead of through it (what
torch.func.jvp on `ddp.module` amounts to) leaves each rank with its own half-batch gradient.

Compared: the gradient the optimizer gets at the first step (after the all-reduce / reduce-scatter, gathered), to
1e-5 of its largest entry (float summation order only), and the weights after 2 AdamW steps, to 2e-5 absolute (Adam
turns rounding noise in near-zero gradient entries into small steps; the control moves them by ~lr = 4e-3).
"""
import pytest
import torch

from meanflow.training.trainer import Trainer
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)
from tests._wrapped_dist_worker import (SCENARIOS, SEPARATE, record_first_gradients, register_separate, run,
                                        unregister_separate, wrapped_config)
from tests.utils import free_port

pytestmark = pytest.mark.full  # several processes, seconds each: --full

REFERENCES = {"single": [], "single_separate": [f"model.arch={SEPARATE}"], "single_scm": ["loss.objective=scm"]}
EXPECTED = {"ddp": "single", "fsdp": "single", "ddp_separate": "single_separate",
            "fsdp_separate": "single_separate", "scm_fsdp": "single_scm"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("wrapped_dist")
    torch.set_num_threads(1)
    register_separate()
    try:
        refs = {}
        for name, overrides in REFERENCES.items():
            trainer = Trainer(wrapped_config(*overrides), out / name)
            grads = record_first_gradients(trainer)
            trainer.train()
            refs[name] = {"model": {k: v.detach().clone() for k, v in trainer.net.state_dict().items()},
                          "grads": grads}
        try:
            mp.spawn(run, args=(2, free_port(), str(out)), nprocs=2, join=True)
        except Exception:
            errors = "\n".join(p.read_text() for p in out.glob("rank*.error.txt"))
            raise AssertionError(f"a rank failed:\n{errors}") from None
    finally:
        unregister_separate()
    results = {name: torch.load(out / f"{name}.result.pt", weights_only=True) for name in SCENARIOS}
    return refs, results


def gradient_error(got: dict, ref: dict) -> float:
    """max |g - g_ref| over all parameters, relative to the largest |g_ref| entry."""
    assert got.keys() == ref.keys()
    scale = max(float(g.abs().max()) for g in ref.values())
    return max(float((got[k] - ref[k]).abs().max()) for k in ref) / scale


def weight_error(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_ranks_equal_one_process(runs, name):
    refs, results = runs
    got, ref = results[name], refs[EXPECTED[name]]
    assert got["step"] == 2
    assert got["class"] == ("DistributedDataParallel" if name.startswith("ddp") else "FSDPWrappedNetwork")
    assert gradient_error(got["grads"], ref["grads"]) < 1e-5
    assert weight_error(got["model"], ref["model"]) < 2e-5


def test_the_comparison_catches_unsynchronised_gradients(runs):
    """Bypassing DDP (the loss calls the network inside it) leaves rank 0 with its own half-batch gradient."""
    refs, results = runs
    got, ref = results["ddp_bypassed"], refs["single"]
    assert gradient_error(got["grads"], ref["grads"]) > 1e-2
    assert weight_error(got["model"], ref["model"]) > 1e-3


def test_joint_and_separate_passes_compute_the_same_gradient(runs):
    """The primal from the jvp (joint) or from the plain call (separate): the same function, float rounding apart."""
    refs, _ = runs
    assert gradient_error(refs["single_separate"]["grads"], refs["single"]["grads"]) < 1e-5
