"""The GNQ policies as optax transformations over per-example gradients.

Each transformation is an ``optax.GradientTransformationExtraArgs`` whose
``update`` takes per-example gradients (a pytree whose leaves carry a leading
batch axis B) and the keyword ``example_ids`` (B,), and returns the aggregated
update (no batch axis), so it heads an ``optax.chain``:

    tx = optax.chain(gnq_censor(budget=2.0, num_examples=n, reg=1e-2),
                     optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params, example_ids=ids)

They are thin adapters: the decision is a ``gujax.policies.Policy`` that sees
only the Gram matrix (``monitor_policy``, ``censor_policy``, ``clip_policy``),
and ``policy_transformation`` applies any policy to gradients you computed
yourself. The trainer uses the same policies through
``gujax.engine.make_stage``, with either engine.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import optax

from gujax import checks
from gujax.engine import gradients_pass, policy_step
from gujax.grads import batch_size
from gujax.policies import Policy, batch_stats, censor_policy, clip_policy, mean_policy, monitor_policy

__all__ = ["Thresholds", "gnq_censor", "gnq_clip", "gnq_monitor", "mean_aggregate",
           "policy_transformation", "propose_thresholds"]


def policy_transformation(policy: Policy, *, dtype: Any = None
                          ) -> optax.GradientTransformationExtraArgs:
    """Wrap a policy as an optax transformation on per-example gradients.

    update(per_example_grads, state, params=None, *, example_ids, mask=None,
           reference_grads=None, gram=None, **ignored)
      per_example_grads: pytree, leaves (B, *param.shape).
      example_ids: (B,) int in [0, num_examples) (optional for a policy that
        keeps no per-example state).
      mask: (B,) bool, False = padding row (not scored, not aggregated, not in
        anyone's S_-j, no ledger change).
      reference_grads: pytree, leaves (R, *param.shape); they enter every S_-j
        but are neither scored nor aggregated.
      gram: optional precomputed (B + R, B + R) Gram matrix of the batch rows
        followed by the reference rows (skips the Gram computation).
      Returns the aggregated update (leaves *param.shape) and the new state.
    dtype: dtype of the Gram matrix and solve when computed here
      (``jnp.float64`` with x64 enabled).
    """
    def init(params):
        del params
        return policy.init()

    def update(updates, state, params=None, *, example_ids=None, mask=None,
               reference_grads=None, gram=None, **extra):
        del params, extra
        b = batch_size(updates, name="per-example gradients")
        if policy.num_examples is not None:
            checks.example_ids(example_ids, b, policy.num_examples)
        checks.mask(mask, b)
        grad_pass = gradients_pass(updates, reference=reference_grads)
        stats = None if gram is None else batch_stats(gram, b)
        update, state, _ = policy_step(grad_pass, policy, state, example_ids=example_ids,
                                       mask=mask, stats=stats, dtype=dtype)
        return update, state

    return optax.GradientTransformationExtraArgs(init, update)


def gnq_monitor(*, num_examples: int, reg, relative: bool = True, dtype: Any = None
                ) -> optax.GradientTransformationExtraArgs:
    """Mean of the per-example gradients (plain SGD), with a GNQ ledger
    (``GnqState``) per training example. See ``monitor_policy``."""
    return policy_transformation(
        monitor_policy(num_examples=num_examples, reg=reg, relative=relative), dtype=dtype)


def gnq_censor(*, budget, num_examples: int, reg, relative: bool = True,
               policy: str = "retire", dtype: Any = None
               ) -> optax.GradientTransformationExtraArgs:
    """Sum of the admitted per-example gradients / n (n real rows): example j
    is admitted while its disclosure D_j (nats) stays within ``budget``.
    See ``censor_policy``."""
    return policy_transformation(
        censor_policy(budget=budget, num_examples=num_examples, reg=reg,
                      relative=relative, policy=policy), dtype=dtype)


def gnq_clip(*, max_step, num_examples: int, reg, relative: bool = True,
             dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """Per-example gradients scaled so that no step discloses more than
    ``max_step`` nats about any example, then averaged over the n real rows.
    See ``clip_policy``."""
    return policy_transformation(
        clip_policy(max_step=max_step, num_examples=num_examples, reg=reg,
                    relative=relative), dtype=dtype)


def mean_aggregate() -> optax.GradientTransformationExtraArgs:
    """Plain SGD's mean gradient: sum over the real rows (``mask``) / their
    number, with no state; the non-private baseline. Like the GNQ
    transformations it leaves out a row whose gradient is not finite (the
    denominator still counts it). See ``mean_policy``."""
    return policy_transformation(mean_policy())


class Thresholds(NamedTuple):
    """Budgets for the GNQ defenses (nats), as ``propose_thresholds`` gives them."""
    budget: float    # gnq_censor(budget=): per-example total D_j
    max_step: float  # gnq_clip(max_step=): per-step d_j


def propose_thresholds(ledger, *, censor_quantile: float = 0.9, clip_quantile: float = 0.5
                       ) -> Thresholds:
    """A censor budget and a clip cap from the ledger of a monitor run.

    D_j has no fixed scale (it grows with the steps and depends on the data,
    the model, the batch size and ``reg``), so a budget is best read off a
    plain run with the ``gnq_monitor`` ledger, trained as the defended run
    will be (same epochs, batch size, sampling, ``reg`` and ``relative``):

      budget   = the ``censor_quantile`` quantile of D_j: under plain training
                 about 1 - censor_quantile of the examples would overrun it;
      max_step = the ``clip_quantile`` quantile of D_j / steps_used_j, the
                 mean per-step disclosure.

    Both are over the examples the run used at least once. Under the censor
    the fraction retired is usually *larger* than 1 - censor_quantile:
    leaving an example out shrinks everyone else's S_-j and raises their GNQ
    (docs/training.md, "Choosing the censor's budget and reg", measures it).

    Args:
      ledger: the ``Ledger`` (or a ``GnqState``, e.g. ``opt_state[0]`` of an
        ``optax.chain(gnq_monitor(...), ...)``, or anything with
        ``disclosure`` and ``steps_used`` per example).
      censor_quantile, clip_quantile: in [0, 1].
    """
    for name, q in (("censor_quantile", censor_quantile), ("clip_quantile", clip_quantile)):
        if not isinstance(q, (int, float, np.floating)) or not 0 <= q <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {q!r}")
    ledger = getattr(ledger, "ledger", ledger) if not hasattr(ledger, "steps_used") else ledger
    if not (hasattr(ledger, "disclosure") and hasattr(ledger, "steps_used")):
        raise ValueError("propose_thresholds takes a GNQ ledger (gujax.Ledger or GnqState, "
                         f"with disclosure and steps_used), got {type(ledger).__name__}")
    used = np.asarray(ledger.steps_used)
    total = np.asarray(ledger.disclosure, np.float64)
    if used.shape != total.shape or used.ndim != 1:
        raise ValueError(f"the ledger must hold one D_j and steps_used_j per example, got "
                         f"shapes {total.shape} and {used.shape}")
    seen = used > 0
    if not seen.any():
        raise ValueError("the ledger has used no example yet: train the monitor run first")
    total = total[seen]
    return Thresholds(float(np.quantile(total, censor_quantile)),
                      float(np.quantile(total / used[seen], clip_quantile)))
