"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

from meanflow import MeanFlowConfig, MeanFlowLoss, build_dit


@pytest.fixture
def model():
    return build_dit("DiT-Micro/4", input_size=8, in_channels=2, num_classes=3)


def _call(model, **over):
    args = dict(z=torch.randn(2, 2, 8, 8), t=torch.rand(2), h=torch.zeros(2), y=torch.tensor([0, 1]), tangents=None)
    args.update(over)
    return model(args["z"], args["t"], args["h"], args["y"], tangents=args["tangents"])


def test_tangent_shape_mismatch(model):
    with pytest.raises(ValueError, match=r"z_dot has shape \(1, 2, 4, 4\); expected \('kt', 2, 8, 8\)"):
        _call(model, tangents=(torch.randn(1, 2, 4, 4), torch.ones(1), torch.ones(1)))


def test_tangent_batch_larger_than_batch(model):
    with pytest.raises(ValueError, match="z_dot has tangent batch 3 > primal batch 2"):
        _call(model, tangents=(torch.randn(3, 2, 8, 8), torch.ones(3), torch.ones(3)))


def test_tangent_batches_differ(model):
    with pytest.raises(ValueError, match="tangent batches differ"):
        _call(model, tangents=(torch.randn(2, 2, 8, 8), torch.ones(1), torch.ones(2)))


def test_tangent_dtype(model):
    with pytest.raises(TypeError, match="z_dot has dtype torch.float64 but z has dtype torch.float32"):
        _call(model, tangents=(torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.ones(1), torch.ones(1)))


def test_t_outside_unit_interval(model):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        _call(model, t=torch.tensor([0.5, 1.5]))


def test_r_greater_than_t(model):
    with pytest.raises(ValueError, match="r > t"):
        _call(model, t=torch.tensor([0.5, 0.5]), h=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match=r"row 1 has r = 0.6 > t = 0.5"):
        MeanFlowLoss()(model, torch.randn(2, 2, 8, 8), torch.tensor([0, 1]), t=torch.tensor([0.5, 0.5]),
                       r=torch.tensor([0.1, 0.6]))


def test_label_range(model):
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\]"):
        _call(model, y=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 2\]"):
        MeanFlowLoss()(model, torch.randn(2, 2, 8, 8), torch.tensor([0, 3]))


def test_missing_labels_and_unconditional_labels(model):
    with pytest.raises(ValueError, match="class-conditional"):
        _call(model, y=None)
    uncond = build_dit("DiT-Micro/4", input_size=8, in_channels=2)
    with pytest.raises(ValueError, match="unconditional"):
        _call(uncond)


def test_non_float_data(model):
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        MeanFlowLoss()(model, torch.zeros(2, 2, 8, 8, dtype=torch.int64), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        _call(model, z=torch.zeros(2, 2, 8, 8, dtype=torch.uint8))


def test_data_shape(model):
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, 8, 8\)"):
        _call(model, z=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\)"):
        MeanFlowLoss()(model, torch.randn(2, 2, 4, 4), torch.tensor([0, 1]))


def test_bad_config_and_backend(model):
    with pytest.raises(ValueError, match="ratio must lie in"):
        MeanFlowConfig(ratio=1.5)
    with pytest.raises(ValueError, match="time_sampler must be one of"):
        MeanFlowConfig(time_sampler="beta")
    with pytest.raises(ValueError, match="backend must be one of"):
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.zeros(1), torch.tensor([0]), backend="jax")
    uncond = build_dit("DiT-Micro/4", input_size=8, in_channels=2)
    with pytest.raises(ValueError, match="guidance .* needs a class-conditional model"):
        MeanFlowLoss(omega=2.0)(uncond, torch.randn(2, 2, 8, 8))


def test_falling_back_to_the_references_is_said_once_per_process(monkeypatch):
    """A network on a CPU without the interpreter: its first op to fall back warns, naming itself and why; the other
    ops fall back silently (exactly their references)."""
    import warnings as _warnings

    from mfkernels import _runtime
    from mfkernels.activations import silu_jvp
    from mfkernels.norm import layernorm_modulate_jvp

    monkeypatch.setattr(_runtime, "interpreter_active", lambda: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mod = torch.randn(2, 8, dtype=torch.float64)
    with _warnings.catch_warnings(record=True) as seen:
        _warnings.simplefilter("always")
        silu_jvp(x, x[:1])
        layernorm_modulate_jvp(x, mod, mod, x[:1], mod[:1], mod[:1])
        silu_jvp(x, x[:1])
    ours = [w for w in seen if "mfkernels." in str(w.message)]
    assert len(ours) == 1 and "mfkernels.silu_jvp: falling back" in str(ours[0].message)
    assert "Every mfkernels op falls back the same way" in str(ours[0].message)

