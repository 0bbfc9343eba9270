"""A multi-layer perceptron on flattened inputs."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from gujax.models.common import add_batch_axis, check_floating


class MLP(nn.Module):
    """Flatten, then ``Dense -> ReLU`` for each hidden width, then a Dense head.

    Input: one example, a vector (D,) or an image (H, W, C); or a batch of
    them, (B, D) or (B, H, W, C). Rank 1 or 3 is one example, rank 2 or 4 a
    batch (images always carry a channel axis). Output: logits (num_classes,)
    for one example, (B, num_classes) for a batch.
    """

    hidden: Sequence[int] = (512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_floating(x, model="MLP")
        example_ndim = 1 if x.ndim in (1, 2) else 3
        x, single = add_batch_axis(x, example_ndim, model="MLP")
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        logits = nn.Dense(self.num_classes)(x)
        return logits[0] if single else logits
