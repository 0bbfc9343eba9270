"""Capture every parameterised layer's inputs and output gradients in one pass.

The batch loss is the sum of per-example losses, so its gradient with respect
to a layer's output y_j is example j's own d_j = dLoss_j / dy_j. We add a zero
``perturbation`` to the output of every layer that owns parameters (found by
``flax.linen.intercept_methods``, no change to the model) and take one
``jax.vjp`` of the batch loss with respect to those perturbations: it yields
every layer's d_j, and the forward pass hands back each layer's inputs. The
parameters themselves are not differentiated, so this backward pass does not
even form the batch weight gradient.

From the captured inputs and output gradients, each layer's per-example
gradients are available without materialising them for the whole model:

* rule layers (``gujax.ghost.rules``: Dense, Conv, Embed) as two factors, for
  ghost kernels;
* any other layer that owns its parameters directly (LayerNorm, GroupNorm,
  DenseGeneral, a custom layer) by re-running that layer alone, vmapped over
  examples, and pulling d_j back to its parameters (the "local rule"; cheap for
  the small leaves such layers usually hold);
* parameter leaves owned by nothing we can capture (a layer with child layers
  and its own parameters, shared leaves, layers with other variable
  collections or tuple outputs, parameters transformed before use) by an
  explicit ``vmap(grad)`` restricted to those leaves (the "fallback").

Assumption, as for ``gujax.per_example_grads``: ``loss_fn(params, example)``
is one example's loss and examples do not interact (no BatchNorm).
"""
from __future__ import annotations

import collections
import collections.abc
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gujax.ghost.rules import Rule, rule_for
from gujax.grads import batch_size, per_example_grads

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

# Methods that are not forward computations of a layer.
_SKIPPED_METHODS = ("setup", "__post_init__")


class Site(NamedTuple):
    """One outermost call of a layer's method, as seen at trace time.

    ``module`` is an unbound copy of the layer, so the call can be re-run on
    its own: ``module.apply({'params': p}, *args, method=method, **kwargs)``.
    The call's (args, kwargs) leaves are split into the arrays (captured per
    example, positions ``dynamic``) and everything else (``static``).
    """
    key: str
    module: nn.Module
    method: str
    args_treedef: Any
    static: tuple
    dynamic: tuple[int, ...]
    out: jax.ShapeDtypeStruct  # per example (no batch axis)

    def call_args(self, dynamic_leaves):
        leaves = list(self.static)
        for position, leaf in zip(self.dynamic, dynamic_leaves):
            leaves[position] = leaf
        return jax.tree_util.tree_unflatten(self.args_treedef, leaves)


class Layer(NamedTuple):
    """A module owning parameter leaves directly, with all its calls.

    params: (name inside the module, index among ``params``' flattened leaves).
    rule: the ghost rule, or None for the local rule.
    """
    path: str
    sites: tuple[Site, ...]
    params: tuple[tuple[str, int], ...]
    rule: Rule | None


class Plan(NamedTuple):
    """Static description of how each parameter leaf's per-example gradient is obtained."""
    layers: tuple[Layer, ...]
    fallback: tuple[int, ...]  # leaf indices handled by vmap(grad)
    treedef: Any  # of params

    def site_shapes(self):
        return {s.key: s.out for layer in self.layers for s in layer.sites}


class Tape(NamedTuple):
    """What one capture pass recorded for a batch of B examples.

    losses: (B,) per-example losses.
    inputs: site key -> list of the call's array arguments, each (B, ...).
    out_grads: site key -> (B, *out) gradient of example j's loss w.r.t. the
      call's output.
    local_grads: layer path -> {param name: (B, *param.shape)} per-example
      gradients of local-rule layers.
    fallback_grads: tuple of (B, *leaf.shape), one per ``plan.fallback`` leaf.
    plan: the static Plan (a Tape lives inside one traced function; return
      arrays computed from it, not the Tape itself, from a jitted function).
    """
    losses: jax.Array
    inputs: dict
    out_grads: dict
    local_grads: dict
    fallback_grads: tuple
    plan: Plan


def _key(path: tuple[str, ...], index: int) -> str:
    return "/".join(path) + f":{index}"


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def _make_interceptor(on_call):
    """Intercept each outermost call of a module (nested calls on the same
    module pass through), count calls per module path, and let
    ``on_call(key, context, args, kwargs, out)`` replace the output."""
    active, counts = set(), collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        path = context.module.path
        if path in active or context.method_name in _SKIPPED_METHODS:
            return next_fun(*args, **kwargs)
        active.add(path)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(path)
        key = _key(path, counts[path])
        counts[path] += 1
        return on_call(key, context, args, kwargs, out)

    return interceptor


class _Record:
    """Trace-time notes on one module (mutable, discovery only)."""

    def __init__(self, module, params, usable):
        self.module, self.params, self.usable, self.sites = module, params, usable, []


def make_plan(loss_fn: LossFn, params: PyTree, example: PyTree) -> Plan:
    """Trace ``loss_fn`` once (shapes only) to find the layers and their calls.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: the parameter pytree.
      example: one example (arrays or ShapeDtypeStructs, no batch axis).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    records: dict[tuple, _Record] = {}

    def traced(leaves_in, ex):
        index_of = {id(leaf): i for i, leaf in enumerate(leaves_in)}

        def on_call(key, context, args, kwargs, out):
            module = context.module
            variables = module.variables
            own = variables.get("params", {})
            direct = {n: v for n, v in own.items()
                      if not isinstance(v, collections.abc.Mapping)}
            if not direct:
                return out
            record = records.get(module.path)
            if record is None:
                indices = {n: index_of.get(id(v)) for n, v in direct.items()}
                usable = (None not in indices.values()
                          and len(direct) == len(own)  # no child layers
                          and set(variables) == {"params"})
                record = records[module.path] = _Record(
                    module.clone(parent=None), indices, usable)
            flat, args_treedef = jax.tree_util.tree_flatten((args, kwargs))
            dynamic = tuple(i for i, leaf in enumerate(flat) if _is_array(leaf))
            static = tuple(None if i in dynamic else leaf for i, leaf in enumerate(flat))
            if not (isinstance(out, jax.Array) and jnp.issubdtype(out.dtype, jnp.inexact)):
                record.usable = False
                return out
            record.sites.append(Site(
                key, record.module, context.method_name, args_treedef, static,
                dynamic, jax.ShapeDtypeStruct(out.shape, out.dtype)))
            return out

        with nn.intercept_methods(_make_interceptor(on_call)):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves_in), ex)

    out = jax.eval_shape(traced, leaves, example)
    if out.shape != ():
        raise ValueError(
            "loss_fn(params, example) must return a scalar (one example's loss), "
            f"got shape {out.shape}")

    owners = collections.Counter(
        i for r in records.values() if r.usable for i in r.params.values())
    layers = []
    for path, record in records.items():
        if not record.usable or any(owners[i] > 1 for i in record.params.values()):
            continue  # shared leaves: left to the fallback
        rule = rule_for(record.module)
        if any(site.method != "__call__" for site in record.sites):
            rule = None
        layers.append(Layer("/".join(path), tuple(record.sites),
                            tuple(sorted(record.params.items())), rule))
    covered = {i for layer in layers for _, i in layer.params}
    fallback = tuple(i for i in range(len(leaves)) if i not in covered)
    return Plan(tuple(layers), fallback, treedef)


def _site_apply(site: Site, direct: dict, dynamic_leaves) -> jax.Array:
    """Re-run one captured call of a layer on its own with parameters ``direct``."""
    args, kwargs = site.call_args(dynamic_leaves)
    return site.module.apply({"params": direct}, *args, method=site.method, **kwargs)


def direct_params(layer: Layer, leaves: list) -> dict:
    return {name: leaves[i] for name, i in layer.params}


def local_per_example(layer: Layer, leaves: list, inputs: dict, out_grads: dict) -> dict:
    """{name: (B, *shape)}: the layer's per-example parameter gradients, from
    its captured calls (vmap over examples of the layer's own VJP)."""
    direct = direct_params(layer, leaves)
    total = None
    for site in layer.sites:
        def one(dynamic_leaves, d, site=site):
            _, pullback = jax.vjp(lambda p: _site_apply(site, p, dynamic_leaves), direct)
            return pullback(d)[0]
        grads = jax.vmap(one)(inputs[site.key], out_grads[site.key])
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
    return total


def weighted_site_grad(site: Site, direct: dict, dynamic_leaves, cotangent) -> dict:
    """sum_j of the call's parameter gradient for example j with output
    cotangent ``cotangent[j]``: one batched VJP of the layer alone."""
    def batched(p):
        return jax.vmap(lambda dyn: _site_apply(site, p, dyn))(dynamic_leaves)
    _, pullback = jax.vjp(batched, direct)
    return pullback(cotangent)[0]


def _forward(plan: Plan, loss_fn: LossFn, params: PyTree, perturbations: dict, example):
    """One example's loss with zero perturbations added to every captured
    call's output; also returns each call's array arguments."""
    sites = plan.site_shapes()
    captured = {}

    def on_call(key, context, args, kwargs, out):
        if key not in sites:
            return out
        flat = jax.tree_util.tree_leaves((args, kwargs))
        captured[key] = [leaf for leaf in flat if _is_array(leaf)]
        return out + perturbations[key]

    with nn.intercept_methods(_make_interceptor(on_call)):
        loss = loss_fn(params, example)
    return loss, captured


def capture(loss_fn: LossFn, params: PyTree, batch: PyTree) -> Tape:
    """Run the batch forward and one backward pass, recording per-example factors.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the same function
        ``gujax.per_example_grads`` takes (``example`` has no batch axis; the
        model is applied to it under ``jax.vmap``).
      params: parameter pytree (Flax ``variables['params']``).
      batch: pytree of arrays with a common leading axis B.

    Returns:
      A ``Tape`` (see its docstring).
    """
    n = batch_size(batch)
    example = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), batch)
    plan = make_plan(loss_fn, params, example)
    zeros = {key: jnp.zeros((n,) + s.shape, s.dtype) for key, s in plan.site_shapes().items()}

    def batch_losses(perturbations):
        return jax.vmap(lambda p, ex: _forward(plan, loss_fn, params, p, ex))(
            perturbations, batch)

    losses, pullback, inputs = jax.vjp(batch_losses, zeros, has_aux=True)
    (out_grads,) = pullback(jnp.ones_like(losses))
    leaves = jax.tree_util.tree_leaves(params)
    local = {layer.path: local_per_example(layer, leaves, inputs, out_grads)
             for layer in plan.layers if layer.rule is None}
    fallback = ()
    if plan.fallback:
        def restricted(fallback_leaves, ex):
            full = list(leaves)
            for i, leaf in zip(plan.fallback, fallback_leaves):
                full[i] = leaf
            return loss_fn(jax.tree_util.tree_unflatten(plan.treedef, full), ex)
        fallback = per_example_grads(
            restricted, tuple(leaves[i] for i in plan.fallback), batch)
    return Tape(losses, inputs, out_grads, local, tuple(fallback), plan)
