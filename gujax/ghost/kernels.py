"""The Gram matrix of per-example gradients, and what else a step needs, from a Tape.

For a rule layer with factors x (B, T, G, d_in) and d (B, T, G, d_out) the
per-example weight gradient is X_jg^T D_jg per group g, so

    <gW_j, gW_k> = sum_g sum_{t,s} (x_jtg . x_ksg)(d_jtg . d_ksg)

(all t, s cross terms: flattening T would keep only t = s). That "ghost"
kernel costs ~ B^2 T^2 G (d_in + d_out); materialising gW_j and taking inner
products costs ~ B T G d_in d_out + B^2 G d_in d_out. Each layer takes the
cheaper route, decided from static shapes at trace time ("mixed ghost").
The bias adds (sum_t d_jt) . (sum_s d_ks) = sum_{t,s} d_jt . d_ks, which the
ghost kernel folds into sum_{t,s} (x_jt . x_ks + 1)(d_jt . d_ks).

Local-rule and fallback leaves arrive already materialised (see
``gujax.ghost.capture``) and add their plain Gram matrix.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gujax.ghost.capture import (LossFn, Tape, capture, direct_params,
                                 weighted_site_grad)
from gujax.ghost.rules import Factors
from gujax.uniqueness import gnq_from_gram

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def ghost_is_cheaper(factors: Factors, *, diagonal_only: bool = False) -> bool:
    """Whether the ghost kernel costs fewer multiply-adds than materialising.

    ``diagonal_only``: for squared norms (B entries) instead of the B x B Gram.
    """
    b, t, g, d_in = factors.x.shape
    d_out = factors.d.shape[-1]
    pairs = b if diagonal_only else b * b
    ghost = pairs * t * t * g * (d_in + d_out)
    materialise = b * t * g * d_in * d_out + pairs * g * d_in * d_out
    return ghost <= materialise


def _cast(a: jax.Array, dtype) -> jax.Array:
    return a if dtype is None else a.astype(dtype)


def _accumulation_dtype(tape: Tape, dtype):
    """``dtype``, or float32 where it is None and the tape holds floating
    arrays narrower than float32 (a float16/bfloat16 model): K and the
    squared norms are accumulated in float32, as ``gujax.gram`` does."""
    if dtype is not None:
        return dtype
    leaves = jax.tree_util.tree_leaves((tape.losses, tape.inputs, tape.out_grads,
                                        tape.local_grads, tape.fallback_grads))
    half = any(jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32
               for a in leaves)
    return jnp.float32 if half else None


def _materialised(factors: Factors, dtype) -> jax.Array:
    """(B, G, d_in, d_out) per-example weight gradients X_j^T D_j per group."""
    x, d = _cast(factors.x, dtype), _cast(factors.d, dtype)
    return jnp.einsum("btgi,btgo->bgio", x, d, precision=_HIGHEST)


def _bias(factors: Factors, dtype) -> jax.Array:
    """(B, G * d_out) per-example bias gradients sum_t d_jt."""
    d = _cast(factors.d, dtype)
    return jnp.reshape(jnp.sum(d, axis=1), (d.shape[0], -1))


def _row_blocks(n: int) -> int:
    """Blocks per side for a symmetric product of n rows: enough to save
    work, few enough that each block stays a decent-sized matmul."""
    for m in (4, 2):
        if n % m == 0 and n // m >= 32:
            return m
    return 1


def _self_gram(a: jax.Array) -> jax.Array:
    """(G, B, B) = a_g a_g^T for a (G, B, f): only the m(m+1)/2 upper blocks
    of an m x m block split are multiplied (the rest are their transposes),
    (m + 1) / 2m of the flops of the full product."""
    n = a.shape[1]
    m = _row_blocks(n)
    if m == 1:
        return jnp.einsum("gbf,gcf->gbc", a, a, precision=_HIGHEST)
    rows = jnp.split(a, m, axis=1)
    upper = {(i, j): jnp.einsum("gbf,gcf->gbc", rows[i], rows[j], precision=_HIGHEST)
             for i in range(m) for j in range(i, m)}
    return jnp.concatenate([
        jnp.concatenate([upper[(i, j)] if i <= j else jnp.swapaxes(upper[(j, i)], 1, 2)
                         for j in range(m)], axis=2) for i in range(m)], axis=1)


def _flat_gram(a: jax.Array) -> jax.Array:
    return _self_gram(a[None])[0]


def factors_gram(factors: Factors, *, dtype=None) -> jax.Array:
    """(B, B) contribution of one layer (weights and bias) to K."""
    # On the ghost branches the bias Gram sum_{t,s} d_jt . d_ks is the sum of
    # the d-products already formed, so it joins them as (xx + 1) * dd rather
    # than as a second B x B x d_out product.
    one = 1.0 if factors.has_bias else 0.0
    if ghost_is_cheaper(factors) and factors.x.shape[1] == 1:
        # One position: (X X^T + 1) * (D D^T) per group, two plain matmuls.
        x, d = _cast(factors.x[:, 0], dtype), _cast(factors.d[:, 0], dtype)
        return jnp.sum((_self_gram(jnp.swapaxes(x, 0, 1)) + one)
                       * _self_gram(jnp.swapaxes(d, 0, 1)), axis=0)
    if ghost_is_cheaper(factors):
        x, d = _cast(factors.x, dtype), _cast(factors.d, dtype)
        xx = jnp.einsum("btgi,csgi->bctsg", x, x, precision=_HIGHEST)
        dd = jnp.einsum("btgo,csgo->bctsg", d, d, precision=_HIGHEST)
        return jnp.sum((xx + one) * dd, axis=(2, 3, 4))
    return _materialised_gram(factors, _materialised(factors, dtype), dtype)


def _materialised_gram(factors: Factors, grads: jax.Array, dtype) -> jax.Array:
    """(B, B) Gram of a layer's weight gradients ``grads`` (B, ...) plus its bias."""
    k = _flat_gram(jnp.reshape(grads, (grads.shape[0], -1)))
    if factors.has_bias:
        k = k + _flat_gram(_bias(factors, dtype))
    return k


def factors_sq_norms(factors: Factors, *, dtype=None) -> jax.Array:
    """(B,) squared norms of one layer's per-example gradients (diagonal of
    ``factors_gram``, without the B x B cross terms)."""
    if ghost_is_cheaper(factors, diagonal_only=True):
        x, d = _cast(factors.x, dtype), _cast(factors.d, dtype)
        xx = jnp.einsum("btgi,bsgi->btsg", x, x, precision=_HIGHEST)
        dd = jnp.einsum("btgo,bsgo->btsg", d, d, precision=_HIGHEST)
        return jnp.sum((xx + (1.0 if factors.has_bias else 0.0)) * dd, axis=(1, 2, 3))
    sq = jnp.sum(jnp.square(_materialised(factors, dtype)), axis=(1, 2, 3))
    if factors.has_bias:
        sq = sq + jnp.sum(jnp.square(_bias(factors, dtype)), axis=1)
    return sq


def layer_factors(tape: Tape, layer) -> Factors:
    """A rule layer's factors, its calls concatenated along the position axis
    (a layer applied twice has gradient X_1^T D_1 + X_2^T D_2 = [X_1; X_2]^T [D_1; D_2])."""
    parts = [layer.rule.factors(site.module, tape.inputs[site.key][0],
                                tape.out_grads[site.key]) for site in layer.sites]
    if len(parts) == 1:
        return parts[0]
    return Factors(jnp.concatenate([p.x for p in parts], axis=1),
                   jnp.concatenate([p.d for p in parts], axis=1), parts[0].has_bias)


def _materialised_leaves(tape: Tape):
    """Every per-example gradient the tape holds explicitly, each (B, ...)."""
    for grads in tape.local_grads.values():
        yield from jax.tree_util.tree_leaves(grads)
    yield from tape.fallback_grads


def tape_gram(tape: Tape, *, dtype=None) -> jax.Array:
    """(B, B) Gram matrix K_jk = <g_j, g_k> over all parameters."""
    return tape_gram_keeping_grads(tape, dtype=dtype)[0]


def tape_gram_keeping_grads(tape: Tape, *, dtype=None) -> tuple[jax.Array, dict]:
    """(K (B, B), kept): K as ``tape_gram``, and ``kept`` = layer path ->
    (B, G, d_in, d_out) per-example weight gradients of the rule layers whose
    Gram was taken from them (where materialising is cheaper than the ghost
    kernel, e.g. transformer Dense layers at T = 64, convolutions). Hand
    ``kept`` to ``tape_weighted_grad`` so the update sums them instead of
    pulling the weighted output gradients back through those layers again.
    A half-precision model (float16, bfloat16) is accumulated in float32
    when ``dtype`` is None (``kept`` then holds float32 gradients)."""
    dtype = _accumulation_dtype(tape, dtype)
    n = tape.losses.shape[0]
    k = jnp.zeros((n, n), dtype or tape.losses.dtype)
    kept = {}
    for layer in tape.plan.layers:
        if layer.rule is None:
            continue
        factors = layer_factors(tape, layer)
        if ghost_is_cheaper(factors):
            k = k + factors_gram(factors, dtype=dtype)
        else:
            grads = _materialised(factors, dtype)
            k = k + _materialised_gram(factors, grads, dtype)
            kept[layer.path] = grads
    for leaf in _materialised_leaves(tape):
        k = k + _flat_gram(_cast(jnp.reshape(leaf, (n, -1)), dtype))
    return k, kept


def tape_sq_norms(tape: Tape, *, dtype=None) -> jax.Array:
    """(B,) squared per-example gradient norms ||g_j||^2 over all parameters
    (float32 for a half-precision model when ``dtype`` is None)."""
    dtype = _accumulation_dtype(tape, dtype)
    n = tape.losses.shape[0]
    sq = jnp.zeros((n,), dtype or tape.losses.dtype)
    for layer in tape.plan.layers:
        if layer.rule is not None:
            sq = sq + factors_sq_norms(layer_factors(tape, layer), dtype=dtype)
    for leaf in _materialised_leaves(tape):
        sq = sq + jnp.sum(jnp.square(_cast(jnp.reshape(leaf, (n, -1)), dtype)), axis=1)
    return sq


def _weigh_rows(weights: jax.Array, per_example: jax.Array) -> jax.Array:
    """weights[j] * per_example[j]; a zero weight gives zeros even where the
    row is NaN, so a weight of 0 really drops the example."""
    w = jnp.reshape(weights, weights.shape + (1,) * (per_example.ndim - 1))
    return jnp.where(w != 0, w * per_example, 0).astype(per_example.dtype)


def _weighted_sum(weights: jax.Array, per_example: jax.Array) -> jax.Array:
    """sum_j weights[j] * per_example[j], rows with weight 0 dropped (even NaN
    ones). A contraction over B, not a multiply then a reduction over the
    leading axis: on XLA:CPU the latter is several times slower for the
    (B, d_in, d_out) per-example weight gradients of materialised layers."""
    keep = jnp.reshape(weights != 0, weights.shape + (1,) * (per_example.ndim - 1))
    rows = jnp.where(keep, per_example, 0)
    return jnp.tensordot(weights.astype(rows.dtype), rows, axes=1, precision=_HIGHEST)


def _layer_weighted_grad(tape: Tape, layer, leaves: list, w: jax.Array) -> dict:
    """{name: sum_j w[j] * (layer's gradient for example j)}."""
    if layer.rule is None:
        return {name: _weighted_sum(w, g) for name, g in tape.local_grads[layer.path].items()}
    direct = direct_params(layer, leaves)
    part = None
    for site in layer.sites:
        # Zero-weight rows are zeroed in the inputs too: X^T (w D)
        # would still be NaN for a NaN input row.
        inputs = [_weigh_rows(w != 0, x) if jnp.issubdtype(x.dtype, jnp.inexact)
                  else x for x in tape.inputs[site.key]]
        g = weighted_site_grad(site, direct, inputs, _weigh_rows(w, tape.out_grads[site.key]))
        part = g if part is None else jax.tree_util.tree_map(jnp.add, part, g)
    return part


def _assemble(tape: Tape, params: PyTree, parts: dict, w: jax.Array) -> PyTree:
    """Layer parts (layer path -> {name: grad}) plus fallback leaves, as params."""
    grads = [jnp.zeros_like(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    for layer in tape.plan.layers:
        for name, i in layer.params:
            grads[i] = grads[i] + parts[layer.path][name]
    for i, g in zip(tape.plan.fallback, tape.fallback_grads):
        grads[i] = grads[i] + _weighted_sum(w, g)
    return jax.tree_util.tree_unflatten(tape.plan.treedef, grads)


def tape_weighted_grad(tape: Tape, params: PyTree, weights: jax.Array, *,
                       kept: dict | None = None) -> PyTree:
    """sum_j weights[j] * g_j, shaped like ``params``, without materialising g_j.

    A rule layer pulls the weighted output gradients back through itself
    alone (one batched VJP, the weight-gradient half of a backward pass),
    unless ``kept`` (from ``tape_gram_keeping_grads`` on the same tape) holds
    its per-example weight gradients, which are then summed; materialised
    leaves are summed directly. Examples with weight 0 are left out even if
    their gradient is not finite.
    """
    leaves = jax.tree_util.tree_leaves(params)
    w = jnp.asarray(weights)
    parts = {}
    for layer in tape.plan.layers:
        part = None
        if kept and layer.path in kept:
            part = _reused_layer(layer, layer_factors(tape, layer),
                                 direct_params(layer, leaves), kept[layer.path], w)
        parts[layer.path] = (part if part is not None
                             else _layer_weighted_grad(tape, layer, leaves, w))
    return _assemble(tape, params, parts, w)


def _reused_layer(layer, factors: Factors, direct: dict, grads: jax.Array,
                  w: jax.Array) -> dict | None:
    """The weighted gradient of a materialised layer from its per-example
    weight gradients ``grads`` (B, G, d_in, d_out), when the rule knows the
    parameter layout and every shape matches; None otherwise."""
    if layer.rule.layout is None:
        return None
    part = layer.rule.layout(layer.sites[0].module, _weighted_sum(w, grads))
    if part is None:
        return None
    if factors.has_bias:
        part["bias"] = _weighted_sum(w, jnp.sum(factors.d, axis=1)).reshape(-1)
    if set(part) != set(direct) or any(part[k].shape != direct[k].shape for k in part):
        return None
    return {k: v.astype(direct[k].dtype) for k, v in part.items()}


def tape_gram_and_weighted_grad(tape: Tape, params: PyTree, weights: jax.Array, *,
                                dtype=None) -> tuple[jax.Array, PyTree]:
    """(``tape_gram(tape)``, ``tape_weighted_grad(tape, params, weights)``),
    the update reusing the per-example gradients the Gram materialised."""
    k, kept = tape_gram_keeping_grads(tape, dtype=dtype)
    return k, tape_weighted_grad(tape, params, weights, kept=kept)


def ghost_gram(loss_fn: LossFn, params: PyTree, batch: PyTree, *, dtype=None) -> jax.Array:
    """(B, B) Gram matrix of per-example gradients, without materialising them.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` (as for
        ``gujax.per_example_grads``).
      params: parameter pytree.
      batch: pytree with a common leading axis B.
      dtype: accumulate K in this dtype (``jnp.float64`` with x64 enabled).

    Returns:
      K with K_jk = <g_j, g_k>, equal to
      ``gujax.gram(gujax.per_example_grads(loss_fn, params, batch))`` to rounding.
    """
    return tape_gram(capture(loss_fn, params, batch), dtype=dtype)


def ghost_gram_and_grad(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                        dtype=None) -> tuple[jax.Array, PyTree, jax.Array]:
    """(K (B, B), sum_j g_j shaped like params, per-example losses (B,))."""
    tape = capture(loss_fn, params, batch)
    k, grad = tape_gram_and_weighted_grad(tape, params, jnp.ones_like(tape.losses), dtype=dtype)
    return k, grad, tape.losses


def ghost_gnq(loss_fn: LossFn, params: PyTree, batch: PyTree, *, reg, relative: bool = True,
        num_scored: int | None = None, dtype=None) -> jax.Array:
    """(num_scored,) leave-one-out GNQ from the ghost Gram matrix.

    Same contract as ``gujax.gnq_from_gram`` (``reg``, ``relative``,
    ``num_scored``: rows after ``num_scored`` are reference examples).
    """
    return gnq_from_gram(ghost_gram(loss_fn, params, batch, dtype=dtype),
                         reg=reg, relative=relative, num_scored=num_scored)


def describe(loss_fn: LossFn, params: PyTree, batch: PyTree) -> dict[str, str]:
    """How each layer's Gram contribution is computed: layer path ->
    'ghost' | 'materialise' | 'local'; the key 'fallback' lists the leaf
    paths handled by explicit vmap(grad) (trace only, nothing is computed)."""
    def trace():
        tape = capture(loss_fn, params, batch)
        kinds = {}
        for layer in tape.plan.layers:
            if layer.rule is None:
                kinds[layer.path] = "local"
            else:
                ghost = ghost_is_cheaper(layer_factors(tape, layer))
                kinds[layer.path] = "ghost" if ghost else "materialise"
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0]]
        kinds["fallback"] = ", ".join(paths[i] for i in tape.plan.fallback)
        result.update(kinds)
        return tape.losses

    result: dict[str, str] = {}
    jax.eval_shape(trace)
    return result
