"""Ghost kernels: GNQ and DP-SGD without materialising per-example gradients.

One forward pass and one backward pass of the batch loss capture every
layer's inputs and per-example output gradients (``capture``); from them
each layer's contribution to the B x B Gram matrix of per-example gradients
is computed by a per-layer rule (``rules``) either as a ghost kernel or by
materialising that layer alone, whichever costs less (``gram``). DP-SGD
needs only the diagonal (``clipping``). ``gujax.engine.ghost_engine`` plugs
them into training stages. Linen and NNX models alike (NNX: ``loss_fn(state,
example)`` merging ``nnx.split(model)``'s graphdef and state; see
docs/models.md), through one registry of rules. Every result equals the explicit
``gujax.gram(gujax.per_example_grads(...))`` path to rounding.
"""
from gujax.ghost.capture import Tape, capture
from gujax.ghost.clipping import ClipInfo, ghost_clipped_sum, ghost_dpsgd
from gujax.ghost.kernels import (describe, ghost_gram, ghost_gram_and_grad, ghost_gnq,
                              tape_gram, tape_gram_and_weighted_grad,
                              tape_gram_keeping_grads, tape_sq_norms, tape_weighted_grad)
from gujax.ghost.rules import RULES, Factors, Rule

__all__ = [
    "ClipInfo", "Factors", "RULES", "Rule", "Tape", "capture", "describe",
    "ghost_clipped_sum", "ghost_dpsgd", "ghost_gram", "ghost_gram_and_grad", "ghost_gnq",
    "tape_gram", "tape_gram_and_weighted_grad", "tape_gram_keeping_grads", "tape_sq_norms",
    "tape_weighted_grad",
]
