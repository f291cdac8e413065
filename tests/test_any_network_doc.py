"""The README's any-network example, run from the page itself (so the documented code cannot rot): a plain diffusers
DiT wrapped and trained with MeanFlow through the public API, then sampled in one step; the command-line spelling of
the same network (model.arch=diffusers:<ClassName>, the mnist-diffusers preset) builds; the bench's dry run."""
import math
import re
from pathlib import Path

import pytest
import torch

from meanflow import apply_overrides, get_preset
from meanflow.models import WrappedNetwork, build_model
from meanflow.objectives import network_spec
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

DOC = Path(__file__).resolve().parents[1] / "README.md"


def doc_example() -> str:
    block = re.search(r"<!-- any-network-example:start -->\n```python\n(.*?)```\n<!-- any-network-example:end -->",
                      DOC.read_text(), re.S)
    assert block, "README.md lost its any-network example (markers any-network-example:start / end)"
    return block.group(1)


def test_the_doc_example_trains_a_diffusers_dit(fused_attention_calls):
    code = doc_example()
    # 2 steps of 4 rows with 1 block instead of 1500 of 32 with 3: the fused kernels run in the Triton interpreter
    assert "steps = 1500" in code and "data.sample(32," in code and "num_layers=3" in code
    code = code.replace("steps = 1500", "steps = 2").replace("data.sample(32,", "data.sample(4,")
    code = code.replace("num_layers=3", "num_layers=1")
    namespace = {"__name__": "any_network_doc_example"}
    exec(compile(code, f"{DOC}:any-network-example", "exec"), namespace)
    model, stats = namespace["model"], namespace["stats"]
    assert isinstance(model, WrappedNetwork) and type(model.model).__name__ == "DiTTransformer2DModel"
    assert namespace["step"] == 1 and math.isfinite(namespace["loss"].item()) and stats["jvp_rows"] > 0
    assert fused_attention_calls, "the tangent rows did not reach the fused attention"
    assert namespace["images"].shape == (40, 1, 8, 8) and torch.isfinite(namespace["images"]).all()


@pytest.fixture
def fused_attention_calls(monkeypatch):
    import mfkernels.attention as fused

    calls, real = [], fused.scaled_dot_product_attention
    monkeypatch.setattr(fused, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_command_line_spelling_builds_the_wrapped_network(tmp_path):
    cfg = get_preset("mnist-diffusers")
    net = build_model(cfg.model, (1, 32, 32), 10, torch.device("cpu"), spec=network_spec(cfg.loss))
    assert isinstance(net, WrappedNetwork) and net.model.config.num_layers == 4 and net.adapter.time_scale == 1.0
    config = tmp_path / "sd3.json"
    config.write_text('{"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, '
                      '"joint_attention_dim": 8, "pooled_projection_dim": 8}')
    cfg = apply_overrides(get_preset("mnist-scm"), ["model.arch=diffusers:SD3Transformer2DModel",
                                                    f"model.config={config}", "model.hidden=32", "model.patch=4"])
    net = build_model(cfg.model, (1, 32, 32), 10, torch.device("cpu"), spec=network_spec(cfg.loss))
    assert net.heads == ("u", "logvar") and net.model.config.attention_head_dim == 16
    assert net.model.config.caption_projection_dim == 32 and net.model.config.patch_size == 4
    with pytest.raises(ValueError, match="model.arch must be one of .*diffusers:<ClassName>"):
        apply_overrides(get_preset("mnist"), ["model.arch=timm:vit"])
    with pytest.raises(ValueError, match="diffusers:UNet2DModel: no adapter for it"):
        build_model(apply_overrides(get_preset("mnist"), ["model.arch=diffusers:UNet2DModel"]).model, (1, 32, 32),
                    10, torch.device("cpu"))


def test_the_bench_dry_run():
    """bench/bench_wrapped.py --dry-run: every table of the harness at tiny sizes (the GPU command's rehearsal)."""
    from bench.bench_wrapped import main

    rows = main(["--dry-run", "--tables", "step", "error", "--fd-time-scales", "1"])
    steps = {r["case"]: r for r in rows if r["bench"] == "wrapped_step"}
    assert len(steps) == 8 and all(r["ms"] > 0 for r in steps.values())
    assert steps["wrapped, fused"]["tangent_rows"] == steps["engine DiT, fused"]["tangent_rows"] > 0
    errors = [r for r in rows if r["bench"] == "wrapped_tangent_error"]
    exact = next(r for r in errors if r["method"].startswith("jvp"))
    assert exact["rel_max"] < 1e-4 and all(r["rel_max"] > exact["rel_max"] for r in errors if "fd_eps" in r)
