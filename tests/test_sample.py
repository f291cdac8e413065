"""Samplers: shapes, determinism with a seed, the 1-step formula, 2-step midpoints, schedules."""
import pytest
import torch

from meanflow import build_dit, draw_noise, euler_sample, make_schedule, sample
from tests.utils import randomize_


@pytest.fixture
def model():
    return randomize_(build_dit("DiT-Micro/4", input_size=8, in_channels=2, num_classes=3), 0.1).eval()


def test_one_step_is_e_minus_u(model):
    e, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 3])
    x = sample(model, e, y, steps=1)
    with torch.no_grad():
        expected = e - model(e, torch.ones(4), torch.ones(4), y)   # u(e, r = 0, t = 1): h = 1
    assert x.shape == e.shape and torch.allclose(x, expected, atol=1e-6, rtol=0)


def test_two_steps_with_midpoint(model):
    e, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 2])
    x = sample(model, e, y, steps=2, midpoint=0.3)
    with torch.no_grad():
        ones = torch.ones(3)
        z = e - 0.7 * model(e, ones, 0.7 * ones, y)
        expected = z - 0.3 * model(z, 0.3 * ones, 0.3 * ones, y)
    assert torch.allclose(x, expected, atol=1e-6, rtol=0)
    assert torch.allclose(sample(model, e, y, schedule=[1.0, 0.3, 0.0]), x)


def test_determinism_with_seed(model):
    y = torch.tensor([0, 2])
    a = sample(model, draw_noise(2, (2, 8, 8), seed=7), y)
    b = sample(model, draw_noise(2, (2, 8, 8), seed=7), y)
    c = sample(model, draw_noise(2, (2, 8, 8), seed=8), y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_schedules_and_errors(model):
    assert make_schedule(1) == [1.0, 0.0]
    assert make_schedule(2) == [1.0, 0.5, 0.0]
    assert make_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    e = torch.randn(1, 2, 8, 8)
    assert sample(model, e, torch.tensor([1]), steps=4).shape == e.shape
    with pytest.raises(ValueError, match="schedule must decrease strictly from 1.0 to 0.0"):
        sample(model, e, torch.tensor([1]), schedule=[1.0, 0.6, 0.7, 0.0])
    with pytest.raises(ValueError, match="midpoint only applies to 2-step"):
        make_schedule(3, midpoint=0.5)


def test_euler_uses_instantaneous_velocity(model):
    e, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 1])
    with torch.no_grad():
        expected = e - model(e, torch.ones(2), torch.zeros(2), y)
    assert torch.allclose(euler_sample(model, e, y, steps=1), expected, atol=1e-6)
