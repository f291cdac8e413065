"""meanflow: a thin PyTorch training stack for MeanFlow (one-step generative models)."""
