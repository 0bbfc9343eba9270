"""Runnable experiment modules (``python -m experiments.<name>``)."""
import os

# The B x B Cholesky solve of GNQ runs in LAPACK (OpenBLAS), whose worker
# threads spin-wait: on a shared 2-core machine a 1 ms solve then takes
# ~100 ms (docs/performance.md). One thread is plenty for B <= 1024, and
# XLA's own thread pool is unaffected. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
