"""Flax linen models that give exact per-example gradients.

No model mixes examples (GroupNorm / LayerNorm, never BatchNorm), and every
parameter belongs to a standard ``nn.Dense``, ``nn.Conv``, ``nn.Embed``,
``nn.LayerNorm`` or ``nn.GroupNorm`` layer, so per-layer gradient rules can
intercept them by type. Each model takes one example (no batch axis) or a
batch and answers in kind; see docs/models.md.
"""
from gujax.models.cnn import SmallCNN
from gujax.models.common import param_count
from gujax.models.mlp import MLP
from gujax.models.nnx import to_nnx
from gujax.models.scatter import ScatterCNN, ScatterLinear
from gujax.models.transformer import TransformerLM
from gujax.models.wrn import WideResNet

__all__ = ["MLP", "ScatterCNN", "ScatterLinear", "SmallCNN", "TransformerLM", "WideResNet", "param_count", "to_nnx"]
