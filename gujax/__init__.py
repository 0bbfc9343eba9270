"""gujax: gradient uniqueness (GNQ) for auditing and limiting per-example disclosure in JAX.

Top level: the GNQ kernel and the optax transformations built on it.
Subpackages: ``gujax.privacy`` (DP accounting), ``gujax.train`` (the trainer),
``gujax.data``, ``gujax.models``, ``gujax.audit`` (attacks and memorisation
measures), ``gujax.ghost`` (GNQ without per-example gradients).
"""
from gujax import data, ghost, models, privacy
from gujax.dpsgd import dpsgd_aggregate
from gujax.gnq import disclosure, gnq, gnq_from_gram, regulariser
from gujax.grads import batch_size, finite_rows, gram, per_example_grads
from gujax.transforms import (
    GnqPolicy,
    GnqState,
    aggregate,
    censor_policy,
    clip_policy,
    gnq_censor,
    gnq_clip,
    gnq_monitor,
    mean_aggregate,
    monitor_policy,
    policy_transformation,
)

__version__ = "0.1.0"

__all__ = [
    "GnqPolicy",
    "GnqState",
    "aggregate",
    "batch_size",
    "censor_policy",
    "clip_policy",
    "data",
    "disclosure",
    "dpsgd_aggregate",
    "finite_rows",
    "ghost",
    "gnq",
    "gnq_censor",
    "gnq_clip",
    "gnq_from_gram",
    "gnq_monitor",
    "gram",
    "mean_aggregate",
    "models",
    "monitor_policy",
    "per_example_grads",
    "policy_transformation",
    "privacy",
    "regulariser",
]
