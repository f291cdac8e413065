"""Training objectives on the same JVP machinery, one module each, one interface (base.py):

    loss, stats = objective(model, x, y, **draws)       # every random draw can be passed in

    base.py           Objective / ObjectiveConfig: the interface, network checks, draws
    registry.py       objectives by name (loss.objective): build_objective, default_config, network_spec
    flow_matching.py  flow matching (the baseline)
    meanflow.py       MeanFlow (docs/design.md, 'The MeanFlow loss'), with MeanFlow's own ratio-0 flow-matching flag
    imf.py            improved MeanFlow (two heads, omega / interval conditioning)
    scm.py            sCM: continuous-time consistency training on TrigFlow, learned logvar(t)
    alphaflow.py      alpha-Flow: flow matching -> MeanFlow by training step
    tvm.py            Terminal Velocity Matching: gradients through the JVP, an EMA teacher, beta = 1/cfg condition
    guidance.py       classifier-free guidance folded into training, with the extra forwards kept small
    time_sampling.py  (t, r) samplers, rows ordered so that the tangent rows come first
"""
from .alphaflow import AlphaFlowConfig, AlphaFlowLoss, alpha_at
from .base import Objective, ObjectiveConfig
from .flow_matching import FlowMatchingConfig, FlowMatchingLoss
from .imf import IMFConfig, IMFLoss
from .meanflow import MeanFlowConfig, MeanFlowLoss
from .registry import OBJECTIVES, build_objective, config_from_dict, default_config, network_spec
from .scm import SCMConfig, SCMLoss
from .time_sampling import num_jvp_rows, sample_t_r
from .tvm import TVMConfig, TVMLoss

__all__ = ["Objective", "ObjectiveConfig", "MeanFlowConfig", "MeanFlowLoss", "FlowMatchingConfig", "FlowMatchingLoss",
           "IMFConfig", "IMFLoss", "SCMConfig", "SCMLoss", "AlphaFlowConfig", "AlphaFlowLoss", "alpha_at",
           "OBJECTIVES", "build_objective", "config_from_dict", "default_config", "network_spec", "num_jvp_rows",
           "sample_t_r", "TVMConfig", "TVMLoss"]
