"""Seeds: deterministic streams mixed from integers, and seeding every process-level RNG at once."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: different parts give independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (every CUDA device included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
