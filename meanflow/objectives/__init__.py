"""Training objectives on the same JVP machinery: today MeanFlow (flow matching as its ratio-0 baseline).

    meanflow.py       MeanFlowConfig, MeanFlowLoss: loss, stats = objective(model, x, y, **draws)
    guidance.py       classifier-free guidance folded into training, with the extra forwards kept small
    time_sampling.py  (t, r) samplers, rows ordered so that the tangent rows come first
"""
from .meanflow import MeanFlowConfig, MeanFlowLoss
from .time_sampling import num_jvp_rows, sample_t_r

__all__ = ["MeanFlowConfig", "MeanFlowLoss", "num_jvp_rows", "sample_t_r"]
