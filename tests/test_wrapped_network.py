"""meanflow.models.wrap on diffusers transformers (DiT; SD3 and Flux: joint attention, Flux with RoPE; Wan: video;
PixArt: cross-attention, learned sigma):
the tangent call (torch.func.jvp with the fused attention, over the first kt rows) equals torch.func.jvp with torch's
math SDPA in float64; the wrapped model starts as the original one; MeanFlow and sCM train it (the objectives' checks
pass, the loss is finite, the weights move); the finite-difference tangent, the separate tangent pass, the autograd
backend, a user call, and compile (refused: compiled tangents are compared with eager ones)."""
import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfkernels.attention as fused_attention
from meanflow import MeanFlowLoss, SCMLoss
from meanflow.models import NetworkSpec, WrappedNetwork, wrap
from tests._diffusers_models import TINY
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)
from tests.utils import max_rel_err, randomize_

DT = torch.float64


def inputs(net, batch=3, kt=2, dtype=DT):
    z = torch.randn(batch, *net.data_shape, dtype=dtype)
    t = torch.rand(batch, dtype=dtype).clamp(0.05, 0.95)
    h = t * torch.rand(batch, dtype=dtype)
    y = torch.randint(0, net.num_classes, (batch,)) if net.num_classes else None
    tangents = (torch.randn(kt, *net.data_shape, dtype=dtype), torch.ones(kt, dtype=dtype),
                torch.rand(kt, dtype=dtype))
    return z, t, h, y, tangents


def math_reference(net, z, t, h, y, tangents):
    """torch.func.jvp over the wrapped network's plain call with torch's math SDPA, on the first kt rows."""
    kt = tangents[0].shape[0]
    yk = None if y is None else y[:kt]
    head = {"head": "u"} if len(net.heads) > 1 else {}
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda a, b, c: net._forward_plain(a, b, c, yk, **head), (z[:kt], t[:kt], h[:kt]),
                              tangents)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = fused_attention.scaled_dot_product_attention
    monkeypatch.setattr(fused_attention, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def wrapped(name, **options) -> WrappedNetwork:
    module, shape, classes = TINY[name]()
    return wrap(module, data_shape=shape, num_classes=classes, **options)


# ==================================================================================================== tangents
@pytest.mark.parametrize("name", list(TINY))
def test_tangent_call_equals_math_sdpa_jvp(name, fused_calls):
    net = randomize_(wrapped(name).double(), 0.2)      # also the zero-initialised h embedder: h's tangent counts
    z, t, h, y, tangents = inputs(net)
    u, u_dot = net(z, t, h, y, tangents=tangents)
    u_ref, u_dot_ref = math_reference(net, z, t, h, y, tangents)
    assert fused_calls, "no attention call reached the fused op"
    assert not u_dot.requires_grad and u.requires_grad
    assert max_rel_err(u[:2], u_ref) < 1e-12 and max_rel_err(u, net(z, t, h, y)) < 1e-12
    assert max_rel_err(u_dot, u_dot_ref) < 1e-11


@pytest.mark.parametrize("kt", [0, 1, 3])
def test_ragged_tangent_rows(kt):
    """kt = 0 (plain call only), 1 of a batch of 1 (kt = B), kt = B; batch 1 with a tangent."""
    net = randomize_(wrapped("DiT").double(), 0.2)
    batch = max(kt, 1)
    z, t, h, y, tangents = inputs(net, batch=batch, kt=kt)
    u, u_dot = net(z, t, h, y, tangents=tangents)
    assert u_dot.shape == (kt, *net.data_shape) and max_rel_err(u, net(z, t, h, y)) < 1e-12
    if kt:
        assert max_rel_err(u_dot, math_reference(net, z, t, h, y, tangents)[1]) < 1e-11


@pytest.mark.parametrize("options", [{"tangent_pass": "separate"}, {"backend": "autograd"},
                                     {"backend": "explicit"}])
def test_other_tangent_routes_agree(options):
    base = randomize_(wrapped("SD3").double(), 0.2)
    other = copy.deepcopy(base)
    for key, value in options.items():
        setattr(other, key, value)
    z, t, h, y, tangents = inputs(base)
    u0, d0 = base(z, t, h, y, tangents=tangents)
    u1, d1 = other(z, t, h, y, tangents=tangents)
    assert max_rel_err(u1, u0) < 1e-12 and max_rel_err(d1, d0) < 1e-11


def test_finite_difference_tangent_is_an_approximation_of_the_right_tangent():
    """tangent='fd': (u(x + eps x_dot) - u(x)) / eps, first order in eps (float64 here; the float32 / bf16 errors of
    the default eps are measured in bench/bench_wrapped.py)."""
    net = randomize_(wrapped("DiT", tangent="fd").double(), 0.2)
    z, t, h, y, (z_dot, t_dot, h_dot) = inputs(net)
    # no t tangent: diffusers embeds the timestep in float32 (get_timestep_embedding), which a difference would see
    tangents = (z_dot, torch.zeros_like(t_dot), h_dot)
    _, exact = math_reference(net, z, t, h, y, tangents)
    errors = []
    for eps in (1e-4, 1e-5):
        net.fd_eps = eps
        u, approx = net(z, t, h, y, tangents=tangents)
        errors.append(max_rel_err(approx, exact))
    assert errors[0] < 1e-3 and errors[1] < errors[0] / 5      # first order: 10x smaller eps, ~10x smaller error
    with pytest.raises(ValueError, match="fd_eps"):
        wrapped("DiT", tangent="fd", fd_eps=0.0)


# ================================================================================================ conventions
def direct_call(name, module, adapter, z, t, y):
    """The module called as its pipeline calls it (Flux: 2x2 patches packed as tokens, image ids [0, row, col]), the
    text-conditioned ones with the adapter's learned tokens for the labels: an independent spelling (einops) of the
    adapter's conventions."""
    from einops import rearrange

    if name == "DiT":
        return module(z, timestep=1000 * t, class_labels=y, return_dict=False)[0]
    b = z.shape[0]
    text = adapter.text(y).reshape(b, adapter.text_tokens, -1)
    pooled = adapter.pooled(y) if adapter.pooled is not None else None
    if name == "SD3":
        return module(z, encoder_hidden_states=text, pooled_projections=pooled, timestep=1000 * t,
                      return_dict=False)[0]
    if name == "Wan":
        return module(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    if name == "PixArt":                                         # learned sigma: the first C of 2 C channels
        return module(z, encoder_hidden_states=text, timestep=1000 * t, return_dict=False,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None})[0][:, :z.shape[1]]
    hh, ww = z.shape[2] // 2, z.shape[3] // 2                    # Flux: the pipeline passes timestep / 1000 = t
    ids = torch.tensor([[0.0, i, j] for i in range(hh) for j in range(ww)])
    out = module(rearrange(z, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2), encoder_hidden_states=text,
                 pooled_projections=pooled, timestep=t, img_ids=ids, txt_ids=torch.zeros(text.shape[1], 3),
                 return_dict=False)[0]
    return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=hh, p=2, q=2)


@pytest.mark.parametrize("name", list(TINY))
def test_starts_as_the_original_model(name):
    """The added h / condition embedders are zero-initialised: the wrapped call is the module's own call."""
    module, shape, classes = TINY[name]()
    net = wrap(module, data_shape=shape, num_classes=classes, spec=NetworkSpec(conditions=("omega", "t_min",
                                                                                            "t_max")))
    z, t, h, y, _ = inputs(net, dtype=torch.float32)
    cond = {"omega": torch.full((3,), 2.0), "t_min": torch.zeros(3), "t_max": torch.ones(3)}
    u = net(z, t, h, y, **cond)
    assert torch.equal(u, direct_call(name, module, net.adapter, z, t, y))
    randomize_(net.h_embedder, 0.2)
    assert not torch.allclose(net(z, t, h, y, **cond), u)       # h does enter, once its embedder is trained


def test_dit_conventions():
    """DiT: timestep 1000 t, class_labels, the null class = num_classes, no random label dropout in training mode."""
    module, shape, classes = TINY["DiT"]()
    net = wrap(module, data_shape=shape, num_classes=classes).train()
    z, t, h, _, _ = inputs(net, dtype=torch.float32)
    y = torch.tensor([0, 2, 3])                                  # 3 = the null class
    want = module(z, timestep=1000 * t, class_labels=y, return_dict=False)[0]
    assert torch.equal(net(z, t, h, y), want) and torch.equal(net(z, t, h, y), want)
    assert all(m.dropout_prob == 0.0 for m in module.modules() if type(m).__name__ == "LabelEmbedding")


def test_refusals():
    module, shape, classes = TINY["DiT"]()
    with pytest.raises(ValueError, match="no diffusers adapter for Linear"):
        wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pass data_shape"):
        wrap(module, call=lambda m, z, t, h, y: z)
    with pytest.raises(ValueError, match="conditions .* enter through time_embedders"):
        wrap(module, call=lambda m, z, t, h, y, **c: z, data_shape=shape,
             spec=NetworkSpec(conditions=("omega",)))
    net = wrap(module, call=lambda m, z, t, h, y: z[:, :1], data_shape=shape)
    with pytest.raises(ValueError, match="shaped like z"):
        net(*inputs(net, dtype=torch.float32)[:3])
    from diffusers import DiTTransformer2DModel

    no_null = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, num_layers=1,
                                    sample_size=4, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=1)
    for m in no_null.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.embedding_table = torch.nn.Embedding(3, 16)
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        wrap(no_null)


# ==================================================================================================== training
def train_steps(net, objective, steps=2, batch=4):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(steps):
        x = torch.randn(batch, *net.data_shape)
        y = torch.randint(0, net.num_classes, (batch,)) if net.num_classes else None
        loss, stats = objective(net, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()) and stats["jvp_rows"] > 0
    moved = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    return moved


# The Triton interpreter is slow on CPU: the fused attention trains DiT (both objectives) and SD3 (MeanFlow), the
# others train with the same jvp over torch's math attention (their fused tangents are checked above)
FUSED_TRAINING = {("DiT", "meanflow"), ("DiT", "scm"), ("SD3", "meanflow")}


@pytest.mark.parametrize("name, objective, backend", [
    (name, objective, "fused" if (name, objective) in FUSED_TRAINING else "explicit")
    for name in TINY for objective in ("meanflow", "scm")])
def test_objectives_train_the_wrapped_model(name, objective, backend, fused_calls):
    loss_fn = MeanFlowLoss(ratio=0.5) if objective == "meanflow" else SCMLoss(warmup_steps=0)
    net = wrapped(name, spec=loss_fn.network_spec(), backend=backend)
    loss_fn.check_network(net)
    moved = train_steps(net, loss_fn, batch=3 if objective == "meanflow" else 2)
    assert bool(fused_calls) == (backend == "fused")
    assert any(k.startswith("model.") for k in moved) and any(k.startswith("h_embedder.") for k in moved)
    if objective == "scm":
        assert net.heads == ("u", "logvar") and "logvar.linear.weight" in moved


def test_imf_trains_with_the_v_head_and_conditions():
    from meanflow import IMFLoss

    loss_fn = IMFLoss(omega_max=2.0)
    net = wrapped("DiT", spec=loss_fn.network_spec(), backend="explicit")
    moved = train_steps(net, loss_fn)
    assert net.heads == ("u", "v") and net.conditions == ("omega", "t_min", "t_max")
    assert any(k.startswith("cond_embedder.") for k in moved)


def test_objectives_refuse_a_wrapped_network_without_their_heads():
    net = wrapped("DiT")
    with pytest.raises(ValueError, match="logvar"):
        SCMLoss(model=net)


# ================================================================================================ a user call
class TinyAttentionNet(torch.nn.Module):
    """Not a diffusers model: tokens of 2 values, its own time embedding, F.scaled_dot_product_attention."""

    def __init__(self, width=16):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(2, width), torch.nn.Linear(width, 2)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.time = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.SiLU(), torch.nn.Linear(width, width))

    def forward(self, x, time):
        b, n, _ = x.shape
        a = self.inp(x) + self.time(time[:, None])[:, None]
        q, k, v = self.qkv(a).reshape(b, n, 3, 2, -1).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.out(a + o)


def test_a_user_call_with_time_embedders(fused_calls):
    module = TinyAttentionNet()
    net = wrap(module, call=lambda m, z, t, h, y: m(z, t), data_shape=(5, 2), time_embedders=[module.time],
               spec=NetworkSpec(heads=("u", "logvar")))
    net = randomize_(net.double(), 0.3)
    z, t, h, y, tangents = inputs(net)
    u, u_dot, logvar = net(z, t, h, y, tangents=tangents)
    assert fused_calls and logvar.shape == (3,)
    assert max_rel_err(u_dot, math_reference(net, z, t, h, y, tangents)[1]) < 1e-11


# ===================================================================================================== compile
def test_compile_is_refused_and_compiled_routing_equals_eager():
    """torch.compile over the routed jvp runs it eagerly (Dynamo cannot trace the routing inside the transform):
    the tangents equal the eager ones. The wrapped network refuses compilation of its tangent call with the reason
    (train.compile, and torch.compile with fullgraph where Dynamo traces into the call)."""
    import torch._dynamo

    from mfkernels import jvp_attention
    from meanflow.training.compile import compile_model

    net = randomize_(wrapped("DiT"), 0.2)
    z, t, h, y, tangents = inputs(net, dtype=torch.float32)

    def routed(z, t, h):
        with jvp_attention():
            return torch.func.jvp(lambda a, b, c: net._forward_plain(a, b, c, y[:2]), (z[:2], t[:2], h[:2]), tangents)

    eager = routed(z, t, h)
    torch._dynamo.reset()
    compiled = torch.compile(routed, backend="aot_eager")(z, t, h)
    torch._dynamo.reset()
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    with pytest.raises(ValueError, match="train.compile: the tangent call of a wrapped network"):
        compile_model(copy.deepcopy(net), backend="eager")
    net.check_inputs = False
    net.forward = torch.compile(net.forward, backend="eager", fullgraph=True)   # Dynamo reaches the jvp: refused
    with pytest.raises(Exception, match="the tangent call of a wrapped network"):
        net(z, t, h, y, tangents=tangents)
    torch._dynamo.reset()
