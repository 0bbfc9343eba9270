"""One rule per layer type: a layer's per-example gradient as two factors.

Every supported layer computes, for each example j and each position t (a
token, a pixel of the output map, or the single position of a plain dense
layer), y_jt = x_jt W (+ b) with x_jt of size ``d_in``. Its per-example weight
gradient is then X_j^T D_j, where D_j holds d_jt = dLoss_j / dy_jt, so every
quantity ghost kernels need (Gram matrix, norms) is a function of the two
factors X and D. A rule turns a layer's captured input and output gradient
into those factors:

    x: (B, T, G, d_in)   input features per example, position and group
    d: (B, T, G, d_out)  output gradient per example, position and group

G is the number of weight blocks that do not share inputs (convolution
feature groups; 1 otherwise); group g's weight gradient is X_jg^T D_jg. The
order of features inside a factor does not matter to inner products, so rules
never need to reproduce the parameter layout.

A rule is registered in ``RULES`` under the exact Flax class it handles,
Linen (``nn.Dense``, ``nn.Conv``, ``nn.Embed``) or NNX (``nnx.Linear``,
``nnx.Conv``, ``nnx.Embed``): the two APIs configure a layer with the same
attribute names, so one ``factors`` function serves both and only
``supports`` (which options make a layer something other than x W + b)
differs. A layer whose class is absent, or whose configuration ``supports``
rejects, is handled by the generic local rule in ``gujax.ghost.capture``
instead.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

Array = jax.Array


class Factors(NamedTuple):
    """A layer's per-example gradient X_j^T D_j (+ bias sum_t d_jt), factored.

    x: (B, T, G, d_in); d: (B, T, G, d_out); has_bias: whether the layer adds
    a bias of size G * d_out whose gradient is sum over t of d_jt.
    """
    x: Array
    d: Array
    has_bias: bool


class Rule(NamedTuple):
    """supports(module) -> bool; factors(module, inputs, d) -> Factors;
    layout(module, w) -> {name: array} or None.

    ``inputs`` is the layer's first argument with a leading batch axis B
    (whatever per-example shape the model gave it); ``d`` the gradient of the
    batch loss with respect to the layer's output, same leading axis.
    ``layout`` turns a weight gradient in factor order, w = X^T D of shape
    (..., G, d_in, d_out), into the layer's weight parameter(s), shaped as
    the module holds them (leading axes kept); None where it does not know
    the layout (callers then take the layer's own VJP).
    """
    supports: Callable[[Any], bool]
    factors: Callable[[Any, Array, Array], Factors]
    layout: Callable[[Any, Array], dict | None] | None = None


def _positions(a: Array, features: int) -> Array:
    """(B, ..., features) -> (B, T, 1, features): every middle axis is a position."""
    return jnp.reshape(a, (a.shape[0], -1, 1, features))


def _dense_supports(module: nn.Dense) -> bool:
    # A custom dot_general (quantised, sparse) need not be x @ W.
    return module.dot_general is None and module.dot_general_cls is None


def _dense_factors(module: nn.Dense, inputs: Array, d: Array) -> Factors:
    return Factors(_positions(inputs, inputs.shape[-1]),
                   _positions(d, d.shape[-1]), module.use_bias)


def _dense_layout(module, w: Array) -> dict | None:
    return {"kernel": w[..., 0, :, :]} if w.shape[-3] == 1 else None


def _nnx_linear_supports(module: nnx.Linear) -> bool:
    return module.dot_general is jax.lax.dot_general


def _embed_supports(module: nn.Embed) -> bool:
    # With one row Flax broadcasts the table and ignores the ids.
    return module.num_embeddings > 1


def _embed_factors(module: nn.Embed, inputs: Array, d: Array) -> Factors:
    # A lookup is a dense layer applied to the one-hot ids: the table's
    # gradient is onehot_j^T D_j. Out-of-range ids give a zero row, as they
    # receive no gradient in jnp.take either.
    onehot = jax.nn.one_hot(inputs, module.num_embeddings, dtype=d.dtype)
    return Factors(_positions(onehot, module.num_embeddings),
                   _positions(d, d.shape[-1]), False)


def _embed_layout(module, w: Array) -> dict | None:
    return {"embedding": w[..., 0, :, :]}


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def _conv_supports(module: nn.Conv) -> bool:
    return (module.shared_weights and module.mask is None
            and module.conv_general_dilated is None
            and module.conv_general_dilated_cls is None)


def _nnx_conv_supports(module: nnx.Conv) -> bool:
    return module.mask is None and module.conv_general_dilated is jax.lax.conv_general_dilated


def _conv_factors(module: nn.Conv, inputs: Array, d: Array) -> Factors:
    """Unfold the input into patches: the convolution becomes a dense layer
    applied at every output position, with feature groups as blocks."""
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))
    n_spatial = len(kernel_size)
    batch = inputs.shape[0]
    # Flax folds every leading axis into one batch axis; so do we.
    x = jnp.reshape(inputs, (-1,) + inputs.shape[inputs.ndim - n_spatial - 1:])
    dilation = _tuple(module.kernel_dilation, n_spatial)
    padding = canonicalize_padding(module.padding, n_spatial)
    # Same explicit padding as flax.linen.Conv, then a VALID unfold.
    if padding in ("CIRCULAR", "REFLECT"):
        span = [(k - 1) * r + 1 for k, r in zip(kernel_size, dilation)]
        pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    spec = "N" + "HWD"[:n_spatial] + "C"
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_size, _tuple(module.strides, n_spatial), padding,
        lhs_dilation=_tuple(module.input_dilation, n_spatial),
        rhs_dilation=dilation,
        dimension_numbers=(spec, "HWD"[:n_spatial] + "IO", spec),
        precision=jax.lax.Precision.HIGHEST)
    # Patch features are ordered (channel, window offset), channel-major, so
    # feature group g is one contiguous slice.
    groups = module.feature_group_count
    return Factors(
        jnp.reshape(patches, (batch, -1, groups, patches.shape[-1] // groups)),
        jnp.reshape(d, (batch, -1, groups, d.shape[-1] // groups)),
        module.use_bias)


def _conv_layout(module, w: Array) -> dict | None:
    """Patch features are (channel, window offset), channel-major; the kernel
    is (*window, in, out). Feature groups are left to the layer's VJP."""
    if w.shape[-3] != 1:
        return None
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))
    lead, (d_in, d_out) = w.shape[:-3], w.shape[-2:]
    n = len(kernel_size)
    c_in = d_in // math.prod(kernel_size)
    k = jnp.reshape(w, lead + (c_in,) + kernel_size + (d_out,))
    return {"kernel": jnp.moveaxis(k, len(lead), len(lead) + n)}


RULES: dict[type, Rule] = {
    nn.Dense: Rule(_dense_supports, _dense_factors, _dense_layout),
    nn.Conv: Rule(_conv_supports, _conv_factors, _conv_layout),
    nn.Embed: Rule(_embed_supports, _embed_factors, _embed_layout),
    nnx.Linear: Rule(_nnx_linear_supports, _dense_factors, _dense_layout),
    nnx.Conv: Rule(_nnx_conv_supports, _conv_factors, _conv_layout),
    nnx.Embed: Rule(_embed_supports, _embed_factors, _embed_layout),
}


def rule_for(module) -> Rule | None:
    """The rule for this exact layer class and configuration, or None."""
    rule = RULES.get(type(module))
    if rule is None or not rule.supports(module):
        return None
    return rule
