"""Flax NNX versions of the gujax models, by bridge: one source of truth.

Import ``to_nnx`` from ``gujax.models`` (its public path); this module is
where it is implemented.

Each gujax model is written once, in Linen (``gujax.models``);
``to_nnx(model, example)`` wraps it as an ``nnx.Module``
(``flax.nnx.bridge.ToNNX``, parameters initialised from ``seed``), which
``nnx.split`` / ``nnx.merge`` and every ``gujax.ghost`` entry point take like
a native NNX model (its layers are still the Linen layers the ghost rules
know, so nothing falls back to vmap(grad)). Native NNX models built from
``nnx.Linear``, ``nnx.Conv``, ``nnx.Embed``, ``nnx.LayerNorm`` and
``nnx.GroupNorm`` need no bridge.

    model = to_nnx(SmallCNN(num_classes=10), x[0])
    graphdef, state = nnx.split(model)
    def loss(state, example):                       # one example, no batch axis
        logits = nnx.merge(graphdef, state)(example["x"])
        return -jax.nn.log_softmax(logits)[example["y"]]
    scores = gujax.ghost.ghost_gnq(loss, state, batch, reg=1e-2)
"""
from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge


def to_nnx(model: nn.Module, example: jax.Array, *, seed: int = 0) -> nnx.Module:
    """``model`` (a Linen module) as an initialised NNX module.

    Args:
      model: a gujax model (or any Linen module with only "params").
      example: an input it accepts (one example or a batch; shapes only).
      seed: seeds the parameter initialisation (deterministic, though not
        the same draw as ``model.init(jax.random.key(seed), ...)``).

    Returns:
      an ``nnx.Module`` whose ``__call__(x)`` is ``model.apply(variables, x)``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_nnx takes a Flax Linen module, got {type(model).__name__}")
    wrapped = bridge.ToNNX(model, rngs=nnx.Rngs(params=seed))
    bridge.lazy_init(wrapped, example)
    # The models draw no randomness after init (no dropout), and a stream
    # left in the state would be mutated inside vmap, which NNX refuses.
    wrapped.to_nnx__rngs = None
    return wrapped
