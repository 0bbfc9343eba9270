"""Wide ResNet with GroupNorm (no BatchNorm), as used for DP-SGD on CIFAR-10."""
from __future__ import annotations

import flax.linen as nn
import jax

from gujax.models.common import add_batch_axis, check_floating


class WideBlock(nn.Module):
    """Pre-activation residual block: GN-ReLU-Conv3x3-GN-ReLU-Conv3x3 + shortcut.

    The shortcut is a 1x1 convolution when the width or stride changes, the
    identity otherwise.
    """

    width: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            # The projection reads the normalised activation, as in the
            # original pre-activation WRN.
            shortcut = nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False)(h)
        h = nn.Conv(self.width, (3, 3), strides=self.stride, padding="SAME", use_bias=False)(h)
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(h))
        h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(h)
        return shortcut + h


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016) with GroupNorm in place of BatchNorm.

    depth = 6 n + 4: a 3x3 stem convolution with 16 channels, three stages
    of n blocks with widths 16, 32 and 64 times ``width`` (strides 1, 2, 2),
    then GroupNorm-ReLU, global average pooling and a Dense head. WRN-16-4
    (the default) is the network De et al. (2022) train with DP-SGD on
    CIFAR-10; they add weight standardisation and augmentation multiplicity,
    which this model leaves out so that every layer is a plain ``nn.Conv`` /
    ``nn.Dense`` / ``nn.GroupNorm``.

    Input: images (H, W, C) float for one example or (B, H, W, C).
    Output: logits (num_classes,) or (B, num_classes).
    """

    depth: int = 16
    width: int = 4
    num_classes: int = 10
    groups: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1; got {self.depth}")
        check_floating(x, model="WideResNet")
        x, single = add_batch_axis(x, 3, model="WideResNet")
        blocks_per_stage = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(blocks_per_stage):
                x = WideBlock(16 * 2**stage * self.width, stride if i == 0 else 1,
                              self.groups)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        x = x.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes)(x)
        return logits[0] if single else logits
