"""Test-suite settings: no plotting window, a throw-away data cache so tests
never read or write the user's ~/.cache/gujax, and one LAPACK thread."""
import os
import tempfile

# GNQ's B x B Cholesky runs in OpenBLAS, whose spinning worker threads make a
# 1 ms solve take tens of ms on a loaded 2-core machine (docs/performance.md).
# Effective only if numpy/scipy are not loaded yet, hence first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["GUJAX_CACHE"] = tempfile.mkdtemp(prefix="gujax-test-cache-")
