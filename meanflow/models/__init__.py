"""Networks and the protocol they share (JVPNetwork), the layers with a tangent, the op tables of the backends.

    network.py   JVPNetwork: the call every network shares, backends dispatch, input validation (validate.py)
    dit.py       DiT with adaLN-Zero and its registry (DIT_MODELS, build_dit)
    imf_dit.py   iMF's network: in-context conditioning, RMSNorm / SwiGLU / QK-norm + RoPE, u and v branches
    mlp_net.py   a small MLP for the 2-D toys
    layers.py    DiT layers with forward_jvp (timestep embedders, the adaLN-Zero block, the final layer)
    heads.py     what objectives beyond MeanFlow need: NetworkSpec, condition embedders (iMF, TVM), sCM's logvar head
    backends.py  autograd / explicit / fused: which op table a forward_jvp gets
    registry.py  build_model(cfg.model, ...): a network from a run's model config (ARCHS: arch -> builder)
    wrapped.py   wrap(module): any nn.Module as a network, its tangent by torch.func.jvp with the fused attention
    diffusers_adapters.py  how (z, t, h, y) enter diffusers transformers (DiT, SD3, Flux, Wan, PixArt)
"""
from .backends import BACKENDS, JVPOps, ops_for
from .dit import DIT_MODELS, DiT, build_dit
from .heads import IMF_CONDITIONS, TVM_CONDITIONS, LogVarHead, NetworkSpec
from .imf_dit import IMF_MODELS, IMFDiT, build_imf_dit
from .mlp_net import MLPNet
from .network import JVPNetwork, count_parameters, unwrap
from .registry import ARCHS, build_model, register_arch
from .wrapped import WrappedNetwork, wrap

__all__ = ["BACKENDS", "JVPOps", "ops_for", "DIT_MODELS", "DiT", "build_dit", "IMF_MODELS", "IMFDiT", "build_imf_dit",
           "MLPNet", "JVPNetwork", "count_parameters", "unwrap", "build_model", "ARCHS", "register_arch",
           "IMF_CONDITIONS", "TVM_CONDITIONS", "LogVarHead", "NetworkSpec", "WrappedNetwork", "wrap"]
