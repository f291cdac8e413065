"""iMF's network (meanflow.models.imf_dit): the official architecture's sizes and parameter counts, its conditioning,
and forward_jvp equal to torch.func.jvp of the plain forward on every backend."""
import math
from types import SimpleNamespace

import pytest
import torch

from meanflow.models import IMF_MODELS, IMFDiT, build_imf_dit, build_model, count_parameters
from meanflow.models.imf_dit import IMF_PARAMETERS, build_imf_from_config
from mfkernels.nn import math_attention

from tests.utils import max_rel_err, randomize_

F64 = torch.float64


def official_count(hidden, depth, heads, *, head_depth=8, v_branch=True, patch=2, in_ch=4, classes=1000,
                   tokens=20, freq=256):
    """Parameters of the official imfDiT, counted from its modules (models/imfDiT.py, torch_models.py, embedder.py):
    per block q, k, v, out (no bias), norm1, norm2, q_norm, k_norm, SwiGLU w1, w3, w2 (no bias), attn_scale, mlp_scale;
    patch conv with bias; four TimestepEmbedders (Linear(256, C) + Linear(C, C), biases); the label table (classes + 1);
    the learned tokens; the u final layer (RMSNorm + Linear with bias) and the v final layer (kept in eval mode)."""
    c, dh, mlp = hidden, hidden // heads, int(hidden * 8 / 3)
    block = 4 * c * c + 2 * c + 2 * dh + 3 * c * mlp + 2 * c
    blocks = depth + (head_depth if v_branch else 0)
    out = patch * patch * in_ch
    embed = (in_ch * patch * patch * c + c) + 4 * (freq * c + c + c * c + c) + (classes + 1) * c + tokens * c
    final = c + c * out + out
    return blocks * block + embed + 2 * final


@pytest.mark.parametrize("name", list(IMF_PARAMETERS))
def test_parameter_counts_match_the_official_configuration(name):
    cfg = IMF_MODELS[name]
    with torch.device("meta"):  # no memory: XL/2 has 711M parameters
        train = build_imf_dit(name)
        infer = build_imf_dit(name, v_branch=False)
    assert (count_parameters(train), count_parameters(infer)) == IMF_PARAMETERS[name]
    assert count_parameters(train) == official_count(cfg.hidden, cfg.depth, cfg.heads)
    # the official eval mode keeps an unused v final layer; we drop it
    final = cfg.hidden + (cfg.hidden + 1) * 16
    assert count_parameters(infer) + final == official_count(cfg.hidden, cfg.depth, cfg.heads, v_branch=False)
    assert len(train.shared_blocks) == cfg.depth - 8 and len(train.u_blocks) == len(train.v_blocks) == 8
    assert train.prefix == 20 and train.rope_cos.shape == (20 + 256, cfg.hidden // cfg.heads // 2)
    swiglu_hidden = {768: 2048, 1024: 2730}[cfg.hidden]  # int(C * 8 / 3): the official truncation
    assert train.u_blocks[0].mlp.hidden == swiglu_hidden
    if name == "iMF-B/2":
        assert round(count_parameters(infer) / 1e6) == 89  # the paper's table: 89M


def tiny(backend="explicit", classes=3, **kw):
    """A small iMF: 1 shared + 1 u + 1 v block, 8x8x2 inputs, patch 4 (4 patches), one token per condition group
    (10 tokens: the fused attention kernels take seconds a call under the interpreter)."""
    kw = {**dict(input_size=8, in_channels=2, hidden=32, depth=2, num_heads=2, patch=4, num_classes=classes,
                 head_depth=1, tokens=(2, 1, 1, 1, 1), backend=backend), **kw}
    return randomize_(IMFDiT(**kw).double(), std=0.3)


def inputs(batch=3, classes=3):
    z = torch.randn(batch, 2, 8, 8, dtype=F64)
    t = torch.rand(batch, dtype=F64)
    h = t * torch.rand(batch, dtype=F64)
    y = torch.randint(0, classes + 1, (batch,))
    cond = {"omega": 1 + 7 * torch.rand(batch, dtype=F64), "t_min": 0.5 * torch.rand(batch, dtype=F64),
            "t_max": 0.5 + 0.5 * torch.rand(batch, dtype=F64)}
    return z, t, h, y, cond


@pytest.mark.sweep
@pytest.mark.parametrize("backend", ["autograd", "explicit", "fused"])
@pytest.mark.parametrize("kt", [0, 1, 3])
def test_forward_jvp_equals_func_jvp_on_every_backend(backend, kt):
    net = tiny(backend)
    z, t, h, y, cond = inputs()
    tangents = (torch.randn(kt, 2, 8, 8, dtype=F64), torch.randn(kt, dtype=F64), torch.randn(kt, dtype=F64))
    u_plain, v_plain = net(z, t, h, y, **cond)
    u, u_dot, v = net(z, t, h, y, tangents=tangents, **cond)
    assert max_rel_err(u, u_plain) < 1e-12 and max_rel_err(v, v_plain) < 1e-12
    assert u_dot.shape == (kt, 2, 8, 8) and not u_dot.requires_grad
    if kt:
        first = {k: c[:kt] for k, c in cond.items()}
        with math_attention():  # torch's SDPA kernels have no forward-mode rule
            _, ref = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, y[:kt], head="u", **first),
                                    (z[:kt], t[:kt], h[:kt]), tangents)
        assert max_rel_err(u_dot, ref) < 1e-10
    if kt == 3:  # u and v backpropagate like the plain forward
        params = list(net.parameters())
        grads = torch.autograd.grad(u.square().sum() + v.sum(), params)
        ref_grads = torch.autograd.grad(u_plain.square().sum() + v_plain.sum(), params)
        assert max(max_rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-10


def test_heads_and_inference_mode():
    net = tiny()
    z, t, h, y, cond = inputs()
    u, v = net(z, t, h, y, **cond)
    assert torch.equal(net(z, t, h, y, head="v", **cond), v) and torch.equal(net(z, t, h, y, head="u", **cond), u)
    tangents = (torch.randn(2, 2, 8, 8, dtype=F64), torch.randn(2, dtype=F64), torch.randn(2, dtype=F64))
    u1, u1_dot = net(z, t, h, y, tangents=tangents, head="u", **cond)
    u_jvp, u_dot, _ = net(z, t, h, y, tangents=tangents, **cond)
    assert torch.equal(u1, u_jvp) and torch.equal(u1_dot, u_dot) and max_rel_err(u1, u) < 1e-12

    infer = IMFDiT(input_size=8, in_channels=2, hidden=32, depth=2, num_heads=2, patch=4, num_classes=3, head_depth=1,
                   tokens=(2, 1, 1, 1, 1), v_branch=False).double()
    state = {k: p for k, p in net.state_dict().items() if not k.startswith(("v_blocks", "v_final"))}
    infer.load_state_dict(state)  # a training checkpoint without its v-branch loads into the inference network
    assert infer.heads == ("u",)
    assert torch.equal(infer(z, t, h, y, **cond), u)
    u2, u2_dot = infer(z, t, h, y, tangents=tangents, **cond)
    assert torch.equal(u2_dot, u_dot)


def test_t_is_ignored_and_the_conditions_enter_as_tokens():
    """Only h conditions on time (official forward); omega enters as 1 - 1/omega; the prefix is
    [class 8 | omega 4 | t_min 2 | t_max 2 | time 4]."""
    net = tiny(tokens=(8, 4, 2, 2, 4))  # the official token counts
    z, t, h, y, cond = inputs()
    u, v = net(z, t, h, y, **cond)
    u2, v2 = net(z, torch.rand_like(t), h, y, **cond)
    assert torch.equal(u, u2) and torch.equal(v, v2)
    tangents = (torch.zeros(3, 2, 8, 8, dtype=F64), torch.randn(3, dtype=F64), torch.zeros(3, dtype=F64))
    _, u_dot, _ = net(z, t, h, y, tangents=tangents, **cond)
    assert u_dot.abs().max() == 0  # a tangent along t alone changes nothing

    seq = net._sequence(z, h, y, **cond)
    emb = {"class": net.y_embedder(y), "omega": net.omega_embedder(1 - 1 / cond["omega"]),
           "t_min": net.t_min_embedder(cond["t_min"]), "t_max": net.t_max_embedder(cond["t_max"]),
           "time": net.h_embedder(h)}
    start = 0
    for name, n in (("class", 8), ("omega", 4), ("t_min", 2), ("t_max", 2), ("time", 4)):
        torch.testing.assert_close(seq[:, start:start + n], net.tokens[name][None] + emb[name][:, None])
        start += n
    torch.testing.assert_close(seq[:, 20:], net.patch_embed(net._patchify(z)))


def test_official_initialisation_gives_zero_outputs_and_unconditional_models():
    net = IMFDiT(input_size=8, in_channels=2, hidden=32, depth=2, num_heads=2, patch=4, num_classes=0, head_depth=1)
    z, t, h, _, cond = (x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs())
    cond = {k: c.float() for k, c in cond.items()}
    u, v = net(z, t, h, None, **cond)
    assert u.abs().max() == 0 and v.abs().max() == 0  # zero final layers (and zero vector gates)
    blk = net.shared_blocks[0]
    assert blk.attn_scale.abs().max() == 0 and blk.mlp_scale.abs().max() == 0
    std = blk.attn.qkv.weight.std().item()
    assert abs(std - 0.32 / math.sqrt(32)) < 0.02  # N(0, (0.32 / sqrt(fan_in))^2)
    with pytest.raises(ValueError, match="head_depth must be in"):
        IMFDiT(input_size=8, in_channels=2, hidden=32, depth=2, num_heads=2, head_depth=3)
    with pytest.raises(ValueError, match="even head dim"):
        IMFDiT(input_size=8, in_channels=2, hidden=30, depth=2, num_heads=2, head_depth=1)


def test_build_by_name_and_from_a_model_config():
    net = build_imf_dit("iMF-Micro/2", input_size=8, in_channels=2, num_classes=3)
    assert isinstance(net, IMFDiT) and len(net.shared_blocks) == 1 and len(net.v_blocks) == 1
    cfg = SimpleNamespace(arch="imf_dit", name="iMF-Tiny/4", hidden=0, depth=0, heads=0, patch=0, mlp_ratio=4.0,
                          backend="explicit")
    net = build_model(cfg, (2, 8, 8), 3, torch.device("cpu"))
    assert isinstance(net, IMFDiT) and net.hidden == 96 and net.patch == 4 and len(net.u_blocks) == 2
    with pytest.raises(ValueError, match="unknown iMF model"):
        build_imf_dit("iMF-S/2")
    with pytest.raises(ValueError, match="mlp_ratio"):
        build_model(SimpleNamespace(**{**vars(cfg), "mlp_ratio": 3.0}), (2, 8, 8), 3, torch.device("cpu"))
    # what an objective asks for (meanflow.models.heads.NetworkSpec's fields)
    spec = SimpleNamespace(heads=("u", "v"), conditions=("omega", "t_min", "t_max"))
    def build(**changes):
        return build_imf_from_config(cfg, (2, 8, 8), 3, "explicit", SimpleNamespace(**{**vars(spec), **changes}))

    assert build().heads == ("u", "v")
    assert build(heads=("u",)).v_final is None
    with pytest.raises(ValueError, match="asks for \\['logvar'\\]"):
        build(heads=("u", "logvar"))
    with pytest.raises(ValueError, match="takes the conditions"):
        build(conditions=())


def test_tiny_size_trains_on_cpu():
    """iMF-Micro/4 learns: 15 Adam steps on both heads (u with a tangent on half the rows) lower a regression loss."""
    torch.manual_seed(0)
    net = build_imf_dit("iMF-Micro/4", input_size=8, in_channels=2, num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    z, t, h, y, cond = inputs(8)
    z, t, h = z.float(), t.float(), h.float()
    cond = {k: c.float() for k, c in cond.items()}
    target = torch.randn(8, 2, 8, 8)
    losses = []
    for _ in range(15):
        u, u_dot, v = net(z, t, h, y, tangents=(z[:4], torch.ones(4), torch.ones(4)), **cond)
        loss = (v - target).square().mean() + (u + 0.1 * u_dot.mean() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
