"""CUDAGraphModel with the objectives beyond MeanFlow (GPU; on CPU the wrapper runs eagerly, tested in
tests/test_objective_training.py): the graphed training call (iMF: three outputs and the conditions; sCM: every row
with a per-row time tangent and the logvar head; alpha-Flow: with and without tangents, the discrete rows' no-grad
forward left eager; TVM with a stop-gradient tangent: 2B rows, the first B with tangents, its teacher call eager) gives the eager steps' losses and weights, one capture per shape of the main call."""
import copy

import pytest
import torch

from meanflow import CUDAGraphModel
from meanflow.models import DiT
from meanflow.objectives import build_objective, default_config, network_spec
from tests.test_cuda_graphs import NUM_CLASSES, _batches, _train
from tests.utils import max_rel_err, randomize_

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
CASES = {
    "imf": {},
    "scm": {"label_dropout": 0.2},
    "alphaflow-0.5": {"alpha_schedule": "constant", "alpha_start": 0.5, "omega": 0.8, "kappa": 0.3},
    "alphaflow-0": {"alpha_schedule": "constant", "alpha_start": 0.0},
    "fm": {"sample_cfg": 2.0},
    # TVM's gradient through the JVP (tangent_grad) is refused by the wrapper's capture; its stop-gradient variant runs
    "tvm-detached": {"detach_jvp": True, "beta_sampler": "cfg_uniform"},
}


def _network(spec, backend):
    torch.manual_seed(0)
    net = DiT((6, 10), 2, 48, 2, 2, 2, num_classes=NUM_CLASSES, backend=backend,
              v_depth=1 if "v" in spec.heads else 0, logvar="logvar" in spec.heads, conditions=spec.conditions)
    net.check_inputs = False
    return randomize_(net, 0.1).to("cuda")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("backend", ["fused", "explicit"])
@pytest.mark.parametrize("case", list(CASES))
def test_graphed_training_equals_eager(case, backend):
    name = case.split("-")[0]
    cfg = default_config(name).replace(**CASES[case])
    spec = network_spec(cfg)
    model = _network(spec, backend)
    twin = copy.deepcopy(model)
    objective = build_objective(cfg, model=model)
    graphed = CUDAGraphModel(model)
    batches = _batches("cuda", 4)
    autocast = torch.autocast("cuda", enabled=False)
    eager = _train(twin, twin, batches, objective, autocast)
    replayed = _train(model, graphed, batches, objective, autocast)
    assert graphed.captures_made == 1
    for a, b in zip(eager, replayed):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (eager, replayed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert max_rel_err(p, q) < 1e-4
