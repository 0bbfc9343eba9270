"""A small GroupNorm convolutional network for CPU-sized image experiments."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from gujax.models.common import add_batch_axis, check_floating


class SmallCNN(nn.Module):
    """``[Conv3x3 -> GroupNorm -> ReLU -> 2x2 avg-pool]`` per width, global average pool, Dense.

    The pooling halves the spatial size after every stage but the last, so
    the default three stages take 32x32 to 8x8 (and digits' 8x8 to 2x2)
    before the global average. GroupNorm normalises each example on its own,
    so per-example gradients are exact.

    Input: images (H, W, C) float for one example or (B, H, W, C) for a batch.
    Output: logits (num_classes,) or (B, num_classes).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_floating(x, model="SmallCNN")
        x, single = add_batch_axis(x, 3, model="SmallCNN")
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME")(x)
            x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
            if i < len(self.widths) - 1:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes)(x)
        return logits[0] if single else logits
