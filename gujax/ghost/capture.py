"""Capture every parameterised layer's inputs and output gradients in one pass.

The batch loss is the sum of per-example losses, so its gradient with respect
to a layer's output y_j is example j's own d_j = dLoss_j / dy_j. We add a zero
``perturbation`` to the output of every layer that owns parameters (found by
``flax.linen.intercept_methods`` for Linen; for NNX, which has no
interception of its own, by wrapping the methods of the nnx.Module classes
while the loss is traced; no change to the model) and take one
``jax.vjp`` of the batch loss with respect to those perturbations: it yields
every layer's d_j, and the forward pass hands back each layer's inputs. The
parameters themselves are not differentiated, so this backward pass does not
even form the batch weight gradient.

From the captured inputs and output gradients, each layer's per-example
gradients are available without materialising them for the whole model:

* rule layers (``gujax.ghost.rules``: Dense, Conv, Embed and their NNX
  twins Linear, Conv, Embed) as two factors, for ghost kernels;
* any other layer that owns its parameters directly (LayerNorm, GroupNorm,
  DenseGeneral, a custom layer) by re-running that layer alone, vmapped over
  examples, and pulling d_j back to its parameters (the "local rule"; cheap for
  the small leaves such layers usually hold);
* parameter leaves owned by nothing we can capture (a layer with child layers
  and its own parameters, shared leaves, layers with other variable
  collections or tuple outputs, parameters transformed before use) by an
  explicit ``vmap(grad)`` restricted to those leaves (the "fallback").

An NNX model enters as for ``gujax.per_example_grads``: ``graphdef, state =
nnx.split(model)`` and ``loss_fn(state, example)`` calls
``nnx.merge(graphdef, state)``; its layers are found through the parameter
arrays they hold, so their paths are the state's (e.g. "blocks/0/mlp").

Assumption, as for ``gujax.per_example_grads``: ``loss_fn(params, example)``
is one example's loss and examples do not interact (no BatchNorm).
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
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

    ``module`` holds the layer's configuration for its rule (an unbound Linen
    copy, or an NNX copy whose parameters are shape-only), and
    ``apply(direct, method, args, kwargs)`` re-runs the call on its own with
    parameters ``direct`` ({name: array}). The call's (args, kwargs) leaves
    are split into the arrays (captured per example, positions ``dynamic``)
    and everything else (``static``).
    """
    key: str
    module: Any
    method: str
    args_treedef: Any
    static: tuple
    dynamic: tuple[int, ...]
    out: jax.ShapeDtypeStruct  # per example (no batch axis)
    apply: Callable[[dict, str, tuple, dict], jax.Array]

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


class _Call(NamedTuple):
    """A framework-neutral view of one intercepted method call.

    path: the module's place in the model, stable across traces (Linen's
      module path; for NNX, found from the parameter leaves it holds, None
      when it holds none of ``params``' leaves).
    direct: {name: array} the parameters the module owns directly.
    usable: whether those are all its variables and all leaves of ``params``
      (no child layers with parameters, no other collections).
    """
    path: tuple | None
    module: Any
    method: str
    direct: dict
    usable: bool
    unbound: Callable[[], tuple[Any, Callable]]  # -> (config copy, apply(p, method, args, kwargs))


def _linen_call(context, index_of) -> _Call:
    module = context.module
    variables = module.variables
    own = variables.get("params", {})
    direct = {n: v for n, v in own.items() if not isinstance(v, collections.abc.Mapping)}
    usable = (all(id(v) in index_of for v in direct.values())
              and len(direct) == len(own) and set(variables) == {"params"})
    def unbound():
        copy = module.clone(parent=None)
        return copy, lambda p, method, args, kwargs: copy.apply({"params": p}, *args,
                                                                method=method, **kwargs)
    return _Call(module.path, module, context.method_name, direct, usable, unbound)


def _nnx_call(module, method, index_of, leaf_paths) -> _Call:
    direct = {n: v.get_value() for n, v in vars(module).items() if isinstance(v, nnx.Param)}
    direct = {n: v for n, v in direct.items() if _is_array(v)}
    matched = [n for n, v in direct.items() if id(v) in index_of]
    path = None
    if matched:
        # The module's path is its parameter's path in the state, up to the
        # parameter's own name.
        leaf = leaf_paths[index_of[id(direct[matched[0]])]]
        names = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in leaf]
        cut = max(i for i, n in enumerate(names) if n == matched[0])
        path = tuple(str(n) for n in names[:cut])
    everything = jax.tree_util.tree_leaves(nnx.state(module))
    usable = (len(matched) == len(direct) == len(everything)
              and len(jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))) == len(everything))

    def unbound():
        graphdef, state = nnx.split(module)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        order = [str(getattr(p[0], "key", p[0])) for p, _ in flat]
        # A copy with shape-only parameters: the rule reads its configuration
        # and no tracer of this trace outlives it.
        copy = nnx.merge(graphdef, jax.tree_util.tree_unflatten(
            treedef, [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for _, a in flat]))

        def apply(p, method, args, kwargs):
            layer = nnx.merge(graphdef, jax.tree_util.tree_unflatten(
                treedef, [p[name] for name in order]))
            return getattr(layer, method)(*args, **kwargs)
        return copy, apply
    return _Call(path, module, method, direct, usable, unbound)


_NNX_LOCK = threading.RLock()
_NNX_HANDLERS: list = []
_NNX_PATCHED: dict = {}


def _nnx_classes():
    """Every nnx.Module subclass defined so far (NNX has no method
    interception of its own, so capture wraps these classes' methods)."""
    seen, todo = [], list(nnx.Module.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def _wrap_nnx(name, fun):
    @functools.wraps(fun)
    def wrapped(self, *args, **kwargs):
        if not _NNX_HANDLERS:
            return fun(self, *args, **kwargs)
        handler = _NNX_HANDLERS[-1]
        return handler(lambda *a, **k: fun(self, *a, **k), args, kwargs, self, name)
    wrapped._gujax_original = fun
    return wrapped


@contextlib.contextmanager
def _intercept_nnx(handler):
    """While active, every public method (and ``__call__``) of every NNX
    module class calls ``handler(next_fun, args, kwargs, module, name)``.
    The classes are restored on exit; trace-time only, so the cost is nil."""
    with _NNX_LOCK:
        if not _NNX_HANDLERS:
            for cls in _nnx_classes():
                for name, fun in list(vars(cls).items()):
                    if (inspect.isfunction(fun) and (name == "__call__" or not name.startswith("_"))
                            and not hasattr(fun, "_gujax_original")):
                        _NNX_PATCHED[(cls, name)] = fun
                        setattr(cls, name, _wrap_nnx(name, fun))
        _NNX_HANDLERS.append(handler)
        try:
            yield
        finally:
            _NNX_HANDLERS.pop()
            if not _NNX_HANDLERS:
                for (cls, name), fun in _NNX_PATCHED.items():
                    setattr(cls, name, fun)
                _NNX_PATCHED.clear()


@contextlib.contextmanager
def _intercept(on_call, params_leaves, leaf_paths):
    """Intercept each outermost call of a module, Linen or NNX (nested calls
    on the same module pass through), count calls per module path, and let
    ``on_call(key, call, args, kwargs, out)`` replace the output."""
    active, counts = set(), collections.Counter()
    index_of = {id(leaf): i for i, leaf in enumerate(params_leaves)}

    def around(next_fun, args, kwargs, ident, method, describe):
        if ident in active or method in _SKIPPED_METHODS:
            return next_fun(*args, **kwargs)
        active.add(ident)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(ident)
        call = describe()
        if call.path is None:
            return out
        key = _key(call.path, counts[call.path])
        counts[call.path] += 1
        return on_call(key, call, args, kwargs, out)

    def linen(next_fun, args, kwargs, context):
        return around(next_fun, args, kwargs, ("linen", context.module.path),
                      context.method_name, lambda: _linen_call(context, index_of))

    def nnx_handler(next_fun, args, kwargs, module, method):
        return around(next_fun, args, kwargs, ("nnx", id(module)), method,
                      lambda: _nnx_call(module, method, index_of, leaf_paths))

    with nn.intercept_methods(linen), _intercept_nnx(nnx_handler):
        yield


class _Record:
    """Trace-time notes on one module (mutable, discovery only)."""

    def __init__(self, module, apply, params, usable):
        self.module, self.apply, self.params, self.usable = module, apply, params, usable
        self.sites = []


def make_plan(loss_fn: LossFn, params: PyTree, example: PyTree) -> Plan:
    """Trace ``loss_fn`` once (shapes only) to find the layers and their calls.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: the parameter pytree.
      example: one example (arrays or ShapeDtypeStructs, no batch axis).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in flat]
    leaf_paths = [path for path, _ in flat]
    records: dict[tuple, _Record] = {}

    def traced(leaves_in, ex):
        index_of = {id(leaf): i for i, leaf in enumerate(leaves_in)}

        def on_call(key, call, args, kwargs, out):
            if not call.direct:
                return out
            record = records.get(call.path)
            if record is None:
                module, apply = call.unbound()
                record = records[call.path] = _Record(
                    module, apply, {n: index_of.get(id(v)) for n, v in call.direct.items()},
                    call.usable)
            flat_args, args_treedef = jax.tree_util.tree_flatten((args, kwargs))
            dynamic = tuple(i for i, leaf in enumerate(flat_args) if _is_array(leaf))
            static = tuple(None if i in dynamic else leaf for i, leaf in enumerate(flat_args))
            if not (isinstance(out, jax.Array) and jnp.issubdtype(out.dtype, jnp.inexact)):
                record.usable = False
                return out
            record.sites.append(Site(
                key, record.module, call.method, args_treedef, static,
                dynamic, jax.ShapeDtypeStruct(out.shape, out.dtype), record.apply))
            return out

        with _intercept(on_call, leaves_in, leaf_paths):
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
    return site.apply(direct, site.method, args, kwargs)


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

    def on_call(key, call, args, kwargs, out):
        if key not in sites:
            return out
        flat = jax.tree_util.tree_leaves((args, kwargs))
        captured[key] = [leaf for leaf in flat if _is_array(leaf)]
        return out + perturbations[key]

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    with _intercept(on_call, [leaf for _, leaf in flat], [path for path, _ in flat]):
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
