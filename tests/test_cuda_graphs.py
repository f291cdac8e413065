"""CUDAGraphModel: graph replays give the eager step's losses and weights; the rules it promises are enforced.

On CPU the wrapper must run the model eagerly (same results, same state_dict); the graph tests need CUDA.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from meanflow import CUDAGraphModel, MeanFlowLoss, build_dit, graphed_ddp, unwrap
from tests.utils import free_port, max_rel_err, randomize_

NUM_CLASSES = 3
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(device, backend="explicit"):
    torch.manual_seed(0)
    model = build_dit("DiT-Micro/2", input_size=(6, 10), in_channels=2, num_classes=NUM_CLASSES, backend=backend)
    model.check_inputs = False
    return randomize_(model, 0.1).to(device)


def _batches(device, steps, batch=8):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 2, 6, 10, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)) for _ in range(steps)]


def _train(model, call_model, batches, loss_fn, autocast, accum=1, no_sync=None):
    """AdamW steps with the objective's random draws seeded per step (identical for every run). no_sync (DDP's):
    entered for every micro-batch but the last, so gradients are all-reduced once per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            gen = torch.Generator(x.device).manual_seed(100 + i)
            with no_sync() if no_sync is not None and j < accum - 1 else contextlib.nullcontext():
                with autocast:
                    loss, _ = loss_fn(call_model, xs, ys, generator=gen)
                (loss / accum).backward()
            total += float(loss) / accum
        opt.step()
        losses.append(total)
    return losses


def test_cpu_runs_eagerly_and_keeps_the_network_state():
    model = _model("cpu")
    graphed = CUDAGraphModel(model)
    assert unwrap(graphed) is model
    assert graphed.state_dict().keys() == model.state_dict().keys()
    loss_fn = MeanFlowLoss(ratio=0.5, omega=0.8, kappa=0.3, loss_op="torch")
    batches = _batches("cpu", 2)
    twin = copy.deepcopy(model)
    eager = _train(twin, twin, batches, loss_fn, torch.autocast("cpu", enabled=False))
    wrapped = _train(model, graphed, batches, loss_fn, torch.autocast("cpu", enabled=False))
    assert eager == wrapped
    assert graphed.captures_made == 0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_refuses_what_it_cannot_graph():
    with pytest.raises(TypeError, match="JVPNetwork"):
        CUDAGraphModel(nn.Linear(3, 3))

    class FSDPDiT(nn.Module):  # the class name FSDP2's fully_shard gives a sharded DiT
        _forward_jvp = None

    with pytest.raises(ValueError, match="DDP / FSDP"):
        CUDAGraphModel(FSDPDiT())


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("backend", ["fused", "explicit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_equals_eager(backend, precision):
    model = _model("cuda", backend)
    twin = copy.deepcopy(model)
    graphed = CUDAGraphModel(model)
    loss_fn = MeanFlowLoss(ratio=0.5, omega=0.8, kappa=0.3, t_start=0.1, t_end=0.9, loss_op="torch")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = _batches("cuda", 4)
    eager = _train(twin, twin, batches, loss_fn, autocast)
    replayed = _train(model, graphed, batches, loss_fn, autocast)
    assert graphed.captures_made == 1  # one key: the main call (the guidance call is no-grad, eager)
    tol = 1e-4 if precision == "fp32" else 2e-2
    for a, b in zip(eager, replayed):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (eager, replayed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert max_rel_err(p, q) < tol


@pytest.mark.gpu
@cuda_only
def test_gradient_accumulation_and_flow_matching():
    """Two micro-batches per step: the parameter gradients handed out are copies, so they accumulate."""
    for loss_fn in (MeanFlowLoss(ratio=0.25, loss_op="torch"), MeanFlowLoss(flow_matching=True, loss_op="torch")):
        model = _model("cuda", "fused")
        twin = copy.deepcopy(model)
        graphed = CUDAGraphModel(model)
        batches = _batches("cuda", 3)
        off = torch.autocast("cuda", enabled=False)
        eager = _train(twin, twin, batches, loss_fn, off, accum=2)
        replayed = _train(model, graphed, batches, loss_fn, off, accum=2)
        assert graphed.captures_made == 1
        assert max(abs(a - b) for a, b in zip(eager, replayed)) < 1e-4
        for p, q in zip(model.parameters(), twin.parameters()):
            assert max_rel_err(p, q) < 1e-4


@pytest.mark.gpu
@cuda_only
def test_backward_after_a_later_call_raises_and_new_shapes_recapture():
    model = _model("cuda", "fused")
    graphed = CUDAGraphModel(model, warmup=1)
    z = torch.randn(4, 2, 6, 10, device="cuda")
    t = torch.rand(4, device="cuda")
    y = torch.randint(0, NUM_CLASSES, (4,), device="cuda")
    ones = torch.ones(2, device="cuda")
    tangents = (torch.randn(2, 2, 6, 10, device="cuda"), ones, ones)
    u1, _ = graphed(z, t, t * 0, y, tangents=tangents)
    u2, du2 = graphed(z + 1, t, t * 0, y, tangents=tangents)
    assert not du2.requires_grad and u2.requires_grad
    with pytest.raises(RuntimeError, match="before the next call"):
        u1.sum().backward()
    u2.sum().backward()  # the latest call is fine
    eager_u, eager_du = model(z + 1, t, t * 0, y, tangents=tangents)
    assert max_rel_err(u2, eager_u) < 1e-4 and max_rel_err(du2, eager_du) < 1e-4
    graphed(z[:3], t[:3], t[:3] * 0, y[:3], tangents=tangents)  # a new batch size: a second graph
    assert graphed.captures_made == 2
    with torch.no_grad():  # no-grad calls never capture
        graphed(z, t, t * 0, y)
    assert graphed.captures_made == 2


def test_trainer_option(tmp_path):
    from meanflow.training.trainer import Trainer
    from tests.test_train import digits_config

    cfg = digits_config("train.steps=2", "train.cuda_graphs=true")
    if torch.cuda.is_available():  # the real thing: same losses as the eager run
        graphed = Trainer(cfg, tmp_path / "graphed")
        assert isinstance(graphed.model, CUDAGraphModel)
        eager = Trainer(digits_config("train.steps=2"), tmp_path / "eager")
        for _ in range(2):
            a, b = graphed.train_step(), eager.train_step()
            assert abs(a["loss"] - b["loss"]) < 2e-2 * max(1.0, abs(b["loss"]))
    else:
        with pytest.warns(RuntimeWarning, match="CUDA graphs need a GPU"):
            trainer = Trainer(cfg, tmp_path / "cpu")
        assert isinstance(trainer.model, CUDAGraphModel) and unwrap(trainer.model) is trainer.net
        trainer.train_step()
        assert trainer.model.captures_made == 0  # CPU calls pass through


@pytest.mark.parametrize("backend", ["explicit", "fused"])
@pytest.mark.parametrize("tangent_rows", [0, 2])
def test_training_call_has_no_host_sync(monkeypatch, backend, tangent_rows):
    """What a CUDA graph needs, checked on CPU: with the value checks off, the network call (forward, and backward
    of the main call) never reads a tensor's value on the host (no bool(), .item(), .tolist(), .nonzero())."""
    model = _model("cpu", backend)
    z, t = torch.randn(4, 2, 6, 10), torch.rand(4)
    y = torch.tensor([0, 1, 2, NUM_CLASSES])
    ones = torch.ones(tangent_rows)
    tangents = (torch.randn(tangent_rows, 2, 6, 10), ones, ones) if tangent_rows else None

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync in the training call")

    for name in ("__bool__", "item", "tolist", "nonzero", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = model(z, t, t * 0.5, y, tangents=tangents)
    u = out[0] if tangents is not None else out
    u.float().square().sum().backward()
    monkeypatch.undo()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------- under DDP (GPU)
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: the same 3 steps (2 micro-batches each, no_sync on the first) through DDP(net) and through
    DDP(CUDAGraphModel(net)), each rank on its half of the global batch; both ranks share cuda:0 (gloo)."""
    import os
    import traceback
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {}
        loss_fn = MeanFlowLoss(ratio=0.5, omega=0.8, kappa=0.3, t_start=0.1, t_end=0.9, loss_op="torch")
        for graphed in (False, True):
            model = _model("cuda", "fused")  # same seed on every rank
            ddp = graphed_ddp(model, device_ids=[0]) if graphed else DDP(model, device_ids=[0])
            shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches("cuda", 3)]
            off = torch.autocast("cuda", enabled=False)
            losses = _train(model, ddp, shard, loss_fn, off, accum=2, no_sync=ddp.no_sync)
            results[graphed] = {"losses": losses, "params": [p.detach().cpu() for p in model.parameters()],
                                "captures": ddp.module.captures_made if graphed else None}
        torch.save(results, f"{out}/rank{rank}.pt")
    except BaseException:
        with open(f"{out}/rank{rank}.error.txt", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.gpu
@cuda_only
def test_ddp_around_the_graphed_network(tmp_path):
    """graphed_ddp(net) = DDP(CUDAGraphModel(net)) on 2 ranks: the same losses and weights as eager DDP, and the
    ranks' weights agree although each saw different rows (the gradients were all-reduced: the replay hands them to autograd, whose
    accumulation fires DDP's hooks), with gradient accumulation under no_sync."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in tmp_path.glob("rank*.error.txt"))
        raise AssertionError(f"a rank failed:\n{errors}")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in ranks:
        assert res[True]["captures"] == 1
        eager, replayed = res[False]["losses"], res[True]["losses"]
        assert max(abs(a - b) for a, b in zip(eager, replayed)) < 1e-4, (eager, replayed)
        for p, q in zip(res[True]["params"], res[False]["params"]):
            assert max_rel_err(p, q) < 1e-4
    assert ranks[0][True]["losses"] != ranks[1][True]["losses"]  # the ranks did see different rows
    for p, q in zip(ranks[0][True]["params"], ranks[1][True]["params"]):
        assert torch.equal(p, q)  # all-reduced gradients: identical updates on both ranks
