"""Sampling and evaluation.

    sampling.py    1 / 2 / k-step samplers, the Euler baseline, sampling at scale (ranks, .npz)
    evaluate.py    sample quality of a trained model: sliced Wasserstein (toys), digit classifier + FD, FID
    classifier.py  the small digit classifier used by the MNIST / digits evaluation
    metrics.py     sliced Wasserstein, Frechet distance
    plotting.py    sample grids, scatter plots, loss curves
"""
from .sampling import draw_noise, euler_sample, make_schedule, sample

__all__ = ["draw_noise", "euler_sample", "make_schedule", "sample"]
