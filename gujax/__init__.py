"""gujax: gradient uniqueness (GNQ) for auditing and limiting per-example disclosure in JAX."""
from gujax.grads import batch_size, finite_rows, gram, per_example_grads
from gujax.gnq import disclosure, gnq, gnq_from_gram, regulariser

__version__ = "0.1.0"

__all__ = [
    "batch_size",
    "disclosure",
    "finite_rows",
    "gnq",
    "gnq_from_gram",
    "gram",
    "per_example_grads",
    "regulariser",
]
