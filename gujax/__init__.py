"""gujax: gradient uniqueness (GNQ) for auditing and limiting per-example disclosure in JAX.

Top level: the GNQ kernel, the policies that act on it, the two gradient
engines and the stage that joins an engine to a policy, and the optax
transformations (thin adapters of the policies over per-example gradients).
Subpackages: ``gujax.privacy`` (DP accounting), ``gujax.train`` (the trainer),
``gujax.data``, ``gujax.models``, ``gujax.audit`` (attacks and memorisation
measures), ``gujax.ghost`` (GNQ without per-example gradients).
See docs/architecture.md for how the code is organised.
"""
from gujax import data, ghost, models, privacy
from gujax.dpsgd import dpsgd_aggregate, dpsgd_monitor
from gujax.engine import (Engine, GradientPass, Stage, explicit_engine, ghost_engine,
                          make_engine, make_stage, per_example_stage)
from gujax.grads import batch_size, finite_rows, gram, per_example_grads
from gujax.noise import Noise
from gujax.policies import (BatchStats, DpsgdState, GnqState, Ledger, Policy, StepInfo,
                            censor_policy, clip_policy, dpsgd_policy, mean_policy,
                            monitor_policy)
from gujax.transforms import (gnq_censor, gnq_clip, gnq_monitor, mean_aggregate,
                              policy_transformation)
from gujax.uniqueness import disclosure, gnq, gnq_from_gram, regulariser

__version__ = "0.1.0"

__all__ = [
    "BatchStats", "DpsgdState", "Engine", "GnqState", "GradientPass", "Ledger", "Noise",
    "Policy", "Stage", "StepInfo", "batch_size", "censor_policy", "clip_policy", "data",
    "disclosure", "dpsgd_aggregate", "dpsgd_monitor", "dpsgd_policy", "explicit_engine",
    "finite_rows", "ghost", "ghost_engine", "gnq", "gnq_censor", "gnq_clip", "gnq_from_gram",
    "gnq_monitor", "gram", "make_engine", "make_stage", "mean_aggregate", "mean_policy",
    "models", "monitor_policy", "per_example_grads", "per_example_stage",
    "policy_transformation", "privacy", "regulariser",
]
