"""The classifiers of Tramer & Boneh (ICLR 2021) on ScatterNet features.

Both take the channels-last scattering features of ``gujax.features``
((8, 8, 243) for CIFAR-10) and begin with a GroupNorm without scale or bias
over the feature channels: it normalises each example on its own, costs no
privacy (unlike a batch or data-set statistic) and has no parameters, so the
ghost kernels and DP-SGD see only the Dense and Conv layers after it.
Tramer & Boneh use 27 groups of 9 channels for 243 channels; ``groups``
must divide the channel count. ``groups=None`` leaves the inputs as they
are, for features standardised with (private) data-set statistics
beforehand (``gujax.features.private_standardizer``), Tramer & Boneh's best
CIFAR-10 setting.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from gujax.models.common import add_batch_axis, check_floating

# torch.nn.GroupNorm's epsilon, as in the published models.
_EPSILON = 1e-5


def _normalise(x: jax.Array, groups: int | None, model: str) -> jax.Array:
    if groups is None:      # inputs standardised beforehand (gujax.features.standardize)
        return x
    if x.shape[-1] % groups:
        raise ValueError(f"{model}: groups={groups} must divide the {x.shape[-1]} feature "
                         "channels")
    return nn.GroupNorm(num_groups=groups, use_scale=False, use_bias=False,
                        epsilon=_EPSILON)(x)


class ScatterLinear(nn.Module):
    """GroupNorm (no parameters) -> flatten -> Dense: a linear model on features.

    Input: features (H, W, C) float for one example or (B, H, W, C).
    Output: logits (num_classes,) or (B, num_classes).
    Parameters: one Dense layer, H W C x num_classes (155,530 for CIFAR-10).
    """

    num_classes: int = 10
    groups: int | None = 27

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_floating(x, model="ScatterLinear")
        x, single = add_batch_axis(x, 3, model="ScatterLinear")
        x = _normalise(x, self.groups, "ScatterLinear")
        logits = nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
        return logits[0] if single else logits


class ScatterCNN(nn.Module):
    """GroupNorm -> [Conv3x3 -> tanh] -> 2x2 max-pool -> [Conv3x3 -> tanh] ->
    flatten -> Dense: Tramer & Boneh's CIFAR-10 CNN on ScatterNet features
    (their configuration ``[64, 'M', 64]``).

    Input: features (H, W, C) float for one example or (B, H, W, C).
    Output: logits (num_classes,) or (B, num_classes).
    """

    num_classes: int = 10
    groups: int | None = 27
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_floating(x, model="ScatterCNN")
        x, single = add_batch_axis(x, 3, model="ScatterCNN")
        x = _normalise(x, self.groups, "ScatterCNN")
        x = jax.numpy.tanh(nn.Conv(self.width, (3, 3), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.numpy.tanh(nn.Conv(self.width, (3, 3), padding="SAME")(x))
        logits = nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
        return logits[0] if single else logits
