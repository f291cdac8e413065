"""The interface every objective shares (meanflow.objectives.base / registry): configs by name and their round trip,
draws (an objective's own draws equal `objective.draw(...)` passed in, which is what distributed training relies on),
row-order invariance of given draws, and clear errors at construction for networks that lack what an objective needs."""
import dataclasses

import pytest
import torch

from meanflow.models import IMF_CONDITIONS, DiT, MLPNet
from meanflow.objectives import OBJECTIVES, IMFLoss, MeanFlowConfig, MeanFlowLoss, SCMLoss, build_objective, \
    config_from_dict, default_config, network_spec
from meanflow.objectives.base import Objective
from tests._objective_util import NUM_CLASSES, data, small_mlp

CONDITIONAL = {"fm": dict(sample_cfg=2.0), "meanflow": dict(omega=2.0), "imf": dict(), "scm": dict(),
               "alphaflow": dict(omega=2.0, alpha_end_step=10), "tvm": dict(beta_sampler="cfg_uniform")}


def net_for(name: str, num_classes: int = NUM_CLASSES):
    spec = network_spec(default_config(name))
    return small_mlp(num_classes, v_depth=1 if "v" in spec.heads else 0, logvar="logvar" in spec.heads,
                     conditions=spec.conditions, backend="explicit")


def step_kw(obj):
    return {"step": 5} if obj.uses_step else {}


def test_registry_names_configs_and_round_trip():
    assert list(OBJECTIVES) == ["fm", "meanflow", "imf", "scm", "alphaflow", "tvm"]
    for name in OBJECTIVES:
        cfg = default_config(name)
        assert cfg.objective == name and isinstance(build_objective(cfg), OBJECTIVES[name])
        assert config_from_dict(dataclasses.asdict(cfg)) == cfg
    # a loss section saved before objectives existed has no 'objective': MeanFlow
    old = {k: v for k, v in dataclasses.asdict(MeanFlowConfig(omega=3.0)).items() if k != "objective"}
    assert config_from_dict(old) == MeanFlowConfig(omega=3.0)
    with pytest.raises(ValueError, match="unknown keys \\['omega_max'\\] for objective 'meanflow'"):
        config_from_dict({"omega_max": 2.0})
    with pytest.raises(ValueError, match="unknown objective 'ddpm'; choose one of fm, meanflow, imf, scm, alphaflow, "
                                         "tvm"):
        default_config("ddpm")
    with pytest.raises(ValueError, match="MeanFlowConfig is the config of objective 'meanflow'"):
        MeanFlowConfig(objective="imf")
    with pytest.raises(TypeError, match="IMFLoss takes a IMFConfig; got MeanFlowConfig"):
        IMFLoss(MeanFlowConfig())


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_own_draws_equal_draws_passed_in(name, conditional):
    """objective(model, x, y, generator=g) == objective(model, x, y, **objective.draw(B, x, ..., generator=g'))."""
    cfg = default_config(name)
    if conditional:
        cfg = cfg.replace(**CONDITIONAL[name])
    elif name == "imf":
        cfg = cfg.replace(omega_max=1.0, sample_omega=1.0)
    elif name == "alphaflow":
        cfg = cfg.replace(alpha_end_step=10)
    elif name == "tvm":
        cfg = cfg.replace(cfg=1.0, sample_cfg=1.0)
    obj = build_objective(cfg)
    net = net_for(name, NUM_CLASSES if conditional else 0)
    x, y = data(net, conditional=conditional)
    own = obj(net, x, y, generator=torch.Generator().manual_seed(7), **step_kw(obj))[0]
    draws = obj.draw(8, x, conditional=conditional, generator=torch.Generator().manual_seed(7))
    assert set(draws) == {n for n in obj.draw_names if n != "drop" or conditional}
    assert all(v.shape[0] == 8 for v in draws.values())
    passed = obj(net, x, y, **draws, **step_kw(obj))[0]
    assert abs(own.item() - passed.item()) < 1e-12


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_row_order_of_given_draws_does_not_matter(name):
    cfg = default_config(name).replace(**CONDITIONAL[name])
    obj = build_objective(cfg)
    net = net_for(name)
    x, y = data(net)
    d = obj.draw(8, x, conditional=True, generator=torch.Generator().manual_seed(3))
    loss = obj(net, x, y, **d, **step_kw(obj))[0]
    perm = torch.randperm(8)
    permuted = obj(net, x[perm], y[perm], **{k: v[perm] for k, v in d.items()}, **step_kw(obj))[0]
    assert abs(loss.item() - permuted.item()) < 1e-12


def test_partial_or_unknown_draws_are_refused():
    net = net_for("imf")
    x, y = data(net)
    with pytest.raises(ValueError, match=r"pass all of the draws .* or none of them .* missing \['omega', 't_min', "
                                          r"'t_max'\]"):
        IMFLoss()(net, x, y, t=torch.full((8,), 0.5, dtype=x.dtype), r=torch.full((8,), 0.2, dtype=x.dtype),
                  drop=torch.zeros(8, dtype=torch.bool), noise=torch.randn_like(x))
    with pytest.raises(TypeError, match="unknown draw"):
        Objective._draw_missing(SCMLoss(), {"r": torch.ones(8)}, 8, x, True, None)


# ------------------------------------------------------------------------------------------------ bad networks
def test_imf_without_a_v_head_fails_at_construction():
    with pytest.raises(ValueError, match=r"the imf objective needs a network with head\(s\) \['v'\] .* MLPNet has "
                                         r"heads \('u',\).*instantaneous-velocity head.*model.v_depth"):
        IMFLoss(model=MLPNet(2, 8, 2, num_classes=3, conditions=IMF_CONDITIONS))
    with pytest.raises(ValueError, match=r"imf objective passes the condition\(s\) \['omega', 't_min', 't_max'\]; "
                                         r"MLPNet lacks \['omega', 't_min', 't_max'\]"):
        IMFLoss(model=MLPNet(2, 8, 2, num_classes=3, v_depth=1))


def test_scm_without_a_logvar_head_fails_at_construction():
    with pytest.raises(ValueError, match=r"the scm objective needs a network with head\(s\) \['logvar'\] .*DiT has "
                                         r"heads \('u',\).*learned loss weighting logvar\(t\)"):
        SCMLoss(model=DiT(8, 1, 16, 1, 2, 4))


def test_guidance_with_an_unconditional_network_fails_at_construction():
    uncond = MLPNet(2, 8, 2)
    with pytest.raises(ValueError, match=r"guidance \(omega = 2.0, kappa = 0.0\) needs a class-conditional model.*"
                                         r"MLPNet is unconditional"):
        MeanFlowLoss(omega=2.0, model=uncond)
    with pytest.raises(ValueError, match=r"iMF guidance \(omega_max = 8.0, sample_omega = 8.0\) needs a "
                                         r"class-conditional model"):
        IMFLoss(model=MLPNet(2, 8, 2, v_depth=1, conditions=IMF_CONDITIONS))
    with pytest.raises(ValueError, match=r"sampling-time guidance \(fm sample_cfg = 3.0\) needs a class-conditional"):
        build_objective(default_config("fm").replace(sample_cfg=3.0), model=uncond)
    with pytest.raises(ValueError, match="guidance .* needs a class-conditional model"):
        build_objective(default_config("alphaflow").replace(kappa=0.5), model=uncond)
    IMFLoss(omega_max=1.0, sample_omega=1.0, model=MLPNet(2, 8, 2, v_depth=1, conditions=IMF_CONDITIONS))


def test_single_head_objectives_refuse_extra_heads_and_non_networks():
    with pytest.raises(ValueError, match=r"the meanflow objective calls the network with heads \('u',\); MLPNet has "
                                         r"heads \('u', 'logvar'\) \(build it without the extra head\(s\) "
                                         r"\['logvar'\]\)"):
        MeanFlowLoss(model=MLPNet(2, 8, 2, logvar=True))
    with pytest.raises(TypeError, match="trains a meanflow JVPNetwork"):
        build_objective(default_config("fm"), model=torch.nn.Linear(2, 2))


def test_specs():
    assert network_spec(default_config("imf")).heads == ("u", "v")
    assert network_spec(default_config("imf")).conditions == IMF_CONDITIONS
    assert network_spec(default_config("scm")).heads == ("u", "logvar")
    for name in ("fm", "meanflow", "alphaflow", "tvm"):
        assert network_spec(default_config(name)).heads == ("u",)
    assert network_spec(default_config("tvm")).conditions == ("beta",)
    with pytest.raises(ValueError, match=r"tvm objective passes the condition\(s\) \['beta'\]; MLPNet lacks "
                                         r"\['beta'\] \(TVM conditions the network on beta = 1 / cfg"):
        build_objective(default_config("tvm"), model=MLPNet(2, 8, 2, num_classes=3))
