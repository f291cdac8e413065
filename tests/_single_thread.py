"""An autouse fixture for the training-stack tests: one torch thread per test, restored afterwards.

The tests' tensors are small, and on a shared 2-core machine two OpenMP threads waiting on each other at every
parallel region make CPU tests several times slower than one thread (see meanflow.runtime.host.set_threads).
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
